"""restic, run confined: one encrypted repository per sandbox.

Contract: every function runs ``/usr/bin/restic`` as root inside bubblewrap with its own mount,
pid, ipc and uts namespaces (and its own network namespace unless the repository is remote),
``--die-with-parent`` (a killed worker never leaves restic running), every capability dropped
but what the step needs (a backup reads any file: ``CAP_DAC_READ_SEARCH``; a restore sets
owners and modes: ``CAP_CHOWN``, ``CAP_FOWNER``, ``CAP_DAC_OVERRIDE``; nothing else needs any),
and a read-only root holding only /usr, /lib*, the TLS certificates (and name resolution for a
remote repository), a private /tmp, and:

* the source of a backup, read-only at ``/data`` (so every snapshot has the path ``/data``);
* the target of a restore, at ``/restore/data`` (restic restores ``/data`` below ``/restore``);
* a local repository at ``/repo``, writable only for the steps that write it.

So a symlink a sandbox planted in its data dir can make restic neither read nor write anything
outside it: restic stores links as links, and even a restic that followed one would find only
the mounts above. The password and S3 keys reach restic through its environment, never argv,
and are scrubbed from every error message.

Backups of a running sandbox take a ``pause`` (``backend.frozen``), which holds only while restic
reads the source: restic is held back once it has opened and locked the repository (see
``_Gate``), and the pause ends as soon as it reports its summary. By default they take two
passes: an unpaused one reads everything, then a paused one (at a higher CPU priority)
re-reads only what changed meanwhile, and the first pass's snapshot is forgotten. So the pause
lasts tens of milliseconds plus the reading of recent changes, whatever the sandbox's size.
The second pass trusts a file whose size, mtime,
ctime and inode are as the first pass saw them; only a same-size rewrite within one kernel
timestamp tick (a few ms) of the first pass's look at it escapes that (fine-grained
"multigrain" timestamps in recent kernels narrow even this).

The pause is bounded: if restic has not reported its summary ``HERMIT_BACKUP_MAX_PAUSE_SECONDS``
after the pause began (its reading or its uploads stall), restic is killed and the pause ended,
and the backup fails (``ResticError`` of kind ``timeout``); earlier snapshots are untouched.

Limits: restic 0.14 has no JSON progress for ``restore``; its progress is the restored size
polled against the snapshot's size. A run longer than ``HERMIT_BACKUP_TIMEOUT`` is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, BinaryIO

from sandboxes.backends import safefs

RESTIC = "/usr/bin/restic"
REPO_MOUNT = "/repo"
SOURCE_MOUNT = "/data"
RESTORE_MOUNT = "/restore"
PROGRESS_FPS = "2"  # restic's status lines per second
RESTORE_POLL_SECONDS = 0.5
GATE_MOUNT = "/gate"
GATE_NAME = "excludes"
GATE_FILE = f"{GATE_MOUNT}/{GATE_NAME}"
GATE_POLL_SECONDS = 0.001
GATE_PREFIX = "hermit-restic-gate-"  # + the pid of the process that made it
NICE = "/usr/bin/nice"
URGENT_NICENESS = -5  # the paused pass of a backup: a sandbox waits for it

BACKUP_CAPS = ("CAP_DAC_READ_SEARCH",)
RESTORE_CAPS = ("CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH")
_REMOTE_ETC = ("resolv.conf", "hosts", "nsswitch.conf", "gai.conf", "host.conf")
_TLS_ETC = ("ssl", "ca-certificates")

PREPASS_TAG = "hermit-first-pass"  # the unpaused first pass of a two-pass backup

ProgressFn = Callable[[float, str], None]
PauseFn = Callable[[], AbstractContextManager[None]]


@dataclass(frozen=True)
class Repo:
    """One restic repository: a directory (local) or ``s3:<endpoint>/<bucket>/<path>``."""

    location: str
    password: str = field(repr=False)
    env: dict[str, str] = field(default_factory=dict, repr=False)  # e.g. AWS_* for S3

    @property
    def is_local(self) -> bool:
        return self.location.startswith("/")


@dataclass(frozen=True)
class SnapshotInfo:
    id: str
    short_id: str
    time: datetime  # aware UTC
    tags: list[str]
    paths: list[str]
    host: str = ""
    parent: str | None = None


@dataclass(frozen=True)
class BackupSummary:
    snapshot_id: str  # restic's full id
    time: datetime  # aware UTC, the snapshot's own time
    files_new: int
    files_changed: int
    files_unmodified: int
    data_added: int  # bytes added to the repository (after dedup and compression)
    total_files: int
    total_bytes: int
    seconds: float
    errors: int = 0  # files restic could not read (the snapshot was still made)
    pause_seconds: float = 0.0  # how long ``pause`` held (0 without one)
    # The repository's snapshots once this one was made and first passes forgotten, oldest
    # first (as ``snapshots`` lists them): retention can start from it without listing again.
    listed: tuple[SnapshotInfo, ...] = ()


@dataclass(frozen=True)
class RepoStats:
    total_size: int  # bytes of stored (compressed, deduplicated) data
    blob_count: int
    snapshots_count: int


class ResticError(Exception):
    """restic failed; the message says why and never holds a secret.

    ``kind`` is one of ``password``, ``missing``, ``locked``, ``corrupt``, ``no_space``,
    ``timeout``, ``failed``; ``corrupt`` is True when the repository's data is damaged.
    """

    def __init__(self, message: str, *, kind: str = "failed") -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def corrupt(self) -> bool:
        return self.kind == "corrupt"


# -- public API --------------------------------------------------------------------------------


def init(repo: Repo) -> None:
    """Create the repository unless it exists (then check that the password opens it)."""
    if repo.is_local:
        Path(repo.location).mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        _run(repo, ["init"], write=True)
    except ResticError as exc:
        if "already" not in str(exc).lower() and "config file already exists" not in str(exc):
            raise
        _run(repo, ["cat", "config"])


def backup(
    repo: Repo,
    source: Path,
    *,
    tags: list[str],
    host: str,
    excludes: Iterable[str] = (),
    on_progress: ProgressFn | None = None,
    parent: str | None = None,
    pause: PauseFn | None = None,
    two_pass: bool = True,
) -> BackupSummary:
    """Back up the directory ``source`` as ``/data`` and return what the new snapshot holds.

    ``excludes`` are paths relative to ``source`` (restic patterns). ``parent`` names the
    snapshot to compare with (default: restic's latest of the same host and path).
    ``on_progress(percent 0-100, message)`` is called a few times a second. Unreadable files
    (say, deleted while being read) do not fail the backup; they are counted in ``errors``.

    ``pause`` (say ``lambda: backend.frozen(spec, state)``) makes the snapshot crash-consistent:
    restic reads ``source`` only while it holds, and it holds only while restic reads (not
    while restic starts, nor while it unlocks and exits). With ``two_pass`` (the default) a
    first pass reads everything unpaused, and the paused pass, with the first as its parent,
    re-reads only what changed meanwhile; the first pass's snapshot is then forgotten. So the
    pause lasts tens of milliseconds plus the reading of recent changes, whatever the sandbox's
    size; without ``two_pass`` it covers the reading of everything that changed since
    ``parent``. ``summary.pause_seconds`` is how long the pause held (freezing and thawing
    included). If entering the pause raises, restic is stopped and the error raised. A pause
    held longer than ``HERMIT_BACKUP_MAX_PAUSE_SECONDS`` is ended and restic stopped
    (ResticError of kind ``timeout``; no snapshot is made by that pass).
    """
    _check_source(source)
    if PREPASS_TAG in tags:
        raise ValueError(f"{PREPASS_TAG} is reserved for the first pass of a two-pass backup")
    if pause is None or not two_pass:
        made = _backup_pass(
            repo, source, tags, host, excludes, parent, on_progress, pause, find=False
        )
        return _settle(repo, made)
    started = time.monotonic()
    first = _backup_pass(
        repo,
        source,
        [PREPASS_TAG],
        host,
        excludes,
        parent,
        _scaled(on_progress, 0, 90),
        None,
        find=False,
    )
    second = _settle(
        repo,
        _backup_pass(
            repo,
            source,
            tags,
            host,
            excludes,
            first.snapshot_id,
            _scaled(on_progress, 90, 100),
            pause,
            find=False,
        ),
    )
    # Counted against ``parent`` over both passes; a file both passes saw change counts once
    # at most as far as the totals tell.
    new = min(first.files_new + second.files_new, second.total_files)
    changed = min(first.files_changed + second.files_changed, second.total_files - new)
    return replace(
        second,
        files_new=new,
        files_changed=changed,
        files_unmodified=second.total_files - new - changed,
        data_added=first.data_added + second.data_added,
        seconds=time.monotonic() - started,
        errors=first.errors + second.errors,
    )


def _backup_pass(
    repo: Repo,
    source: Path,
    tags: list[str],
    host: str,
    excludes: Iterable[str],
    parent: str | None,
    on_progress: ProgressFn | None,
    pause: PauseFn | None,
    *,
    find: bool = True,
) -> BackupSummary:
    """One restic backup run, reading ``source`` under ``pause``; with ``find``, the snapshot's
    full id and time are read back (else the summary's short id and the time of the call)."""
    patterns = [f"{SOURCE_MOUNT}/{pattern.strip('/')}" for pattern in excludes]
    args = ["backup", "--json", "--host", host]
    for tag in tags:
        args += ["--tag", tag]
    if pause is None:
        for pattern in patterns:
            args += ["--exclude", pattern]
    else:
        args += ["--exclude-file", GATE_FILE]
    if parent:
        args += ["--parent", parent]
    args.append(SOURCE_MOUNT)
    summary: dict[str, Any] = {}
    errors = 0
    gate = _Gate(pause, patterns, _max_pause()) if pause is not None else None

    def on_line(line: str) -> None:
        nonlocal errors
        message = _json_line(line)
        kind = message.get("message_type")
        if kind == "status" and on_progress:
            on_progress(*_backup_progress(message))
        elif kind == "summary":
            summary.update(message)
            if gate:  # restic has read everything; what is left is unlocking and exiting
                gate.release()
        elif kind == "error":
            errors += 1

    started = time.monotonic()
    taken = datetime.now(UTC)
    try:
        _run(
            repo,
            args,
            write=True,
            source=source,
            caps=BACKUP_CAPS,
            on_line=on_line,
            ok_codes=(0, 3),  # 3: snapshot made, some files unreadable
            gate=gate,
        )
    finally:
        if gate:
            gate.close()
    if "snapshot_id" not in summary:
        raise ResticError("restic backup finished without making a snapshot.")
    snapshot_id = str(summary["snapshot_id"])
    if find:
        made = _find_snapshot(repo, snapshot_id)
        snapshot_id, taken = made.id, made.time
    return BackupSummary(
        snapshot_id=snapshot_id,
        time=taken,
        files_new=int(summary.get("files_new", 0)),
        files_changed=int(summary.get("files_changed", 0)),
        files_unmodified=int(summary.get("files_unmodified", 0)),
        data_added=int(summary.get("data_added", 0)),
        total_files=int(summary.get("total_files_processed", 0)),
        total_bytes=int(summary.get("total_bytes_processed", 0)),
        seconds=time.monotonic() - started,
        errors=errors,
        pause_seconds=gate.held if gate else 0.0,
    )


class _Gate:
    """Holds restic back, once its repository is open, until ``pause`` holds.

    restic reads ``--exclude-file`` after it has opened and locked the repository (half a
    second of key derivation and lock checks) and before it looks at anything in the source.
    That file is a FIFO here: restic blocks opening it until the gate's thread opens the other
    end, which it does, then enters ``pause``, then writes the patterns and closes it. So the
    source is read only while the pause holds, and the pause does not cover restic's start.
    ``release`` (restic's summary is out) or ``close`` ends the pause.
    """

    def __init__(self, pause: PauseFn, patterns: list[str], max_pause: float) -> None:
        self.pause = pause
        self.patterns = patterns
        self.max_pause = max_pause
        self.overran = False  # the watchdog ended the pause and stopped restic
        self.watchdog: threading.Timer | None = None
        _sweep_gates()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{GATE_PREFIX}{os.getpid()}-"))
        os.mkfifo(self.dir / GATE_NAME, 0o600)
        self.stack = contextlib.ExitStack()
        self.began = 0.0
        self.held = 0.0
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def start(self, proc: subprocess.Popen[bytes]) -> None:
        self.thread = threading.Thread(target=self._open, args=(proc,), name="restic-gate")
        self.thread.start()

    def _open(self, proc: subprocess.Popen[bytes]) -> None:
        fifo = self.dir / GATE_NAME
        while True:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                break
            except OSError:  # ENXIO: restic has not opened it yet
                if proc.poll() is not None:
                    return
                time.sleep(GATE_POLL_SECONDS)
        try:
            with self.lock:
                self.began = time.monotonic()
                self.stack.enter_context(self.pause())
                self.watchdog = threading.Timer(self.max_pause, self._overrun, args=(proc,))
                self.watchdog.daemon = True
                self.watchdog.start()
        except BaseException as exc:
            self.error = exc
            proc.kill()
            os.close(fd)
            return
        try:
            os.set_blocking(fd, True)
            os.write(fd, "".join(f"{pattern}\n" for pattern in self.patterns).encode())
        except OSError:
            pass  # restic is gone; its exit status says why
        finally:
            os.close(fd)

    def join(self) -> None:
        """Wait for the gate's thread (once restic has exited). If pausing failed, ``error``
        holds why, and restic was stopped."""
        if self.thread:
            self.thread.join()

    def _overrun(self, proc: subprocess.Popen[bytes]) -> None:
        """The watchdog: the pause has held ``max_pause`` seconds and restic has not finished
        reading (a stalled storage, say): stop restic, before it can save a snapshot of a
        sandbox no longer paused, and end the pause."""
        with self.lock:
            if self.held:  # released meanwhile
                return
            self.overran = True
            proc.kill()
            self._end()

    def release(self) -> None:
        with self.lock:
            self._end()

    def _end(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
        self.stack.close()
        if self.began and not self.held:
            self.held = time.monotonic() - self.began  # freezing and thawing included

    def close(self) -> None:
        try:
            self.release()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def _sweep_gates() -> None:
    """Remove the gate dirs of processes that died (a killed worker leaves its own)."""
    base = Path(tempfile.gettempdir())
    for entry in base.glob(f"{GATE_PREFIX}*-*"):
        pid = entry.name.removeprefix(GATE_PREFIX).split("-", 1)[0]
        try:
            st = entry.lstat()
            if not pid.isdigit() or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue


def _scaled(on_progress: ProgressFn | None, low: float, high: float) -> ProgressFn | None:
    if on_progress is None:
        return None
    report = on_progress

    def scaled(percent: float, message: str) -> None:
        report(low + (high - low) * percent / 100.0, message)

    return scaled


def _forget_prepasses(repo: Repo) -> None:
    """Forget every first-pass snapshot (this backup's, and any a killed run left behind)."""
    out = _run(repo, ["snapshots", "--json", "--tag", PREPASS_TAG])
    ids = [str(item["id"]) for item in json.loads(_last_json(out) or "[]")]
    if ids:
        _run(repo, ["forget", *ids], write=True)


def _settle(repo: Repo, made: BackupSummary) -> BackupSummary:
    """After a backup run: list the repository once, for the new snapshot's full id and time
    and the list retention starts from, and forget every first-pass snapshot (this backup's,
    and any a killed run left behind)."""
    out = _run(repo, ["snapshots", "--json"])
    found = [_snapshot_info(item) for item in json.loads(_last_json(out) or "[]")]
    prepasses = [s.id for s in found if PREPASS_TAG in s.tags]
    # restic 0.14's summary gives the short id, later ones the full id: a prefix either way.
    matches = [s for s in found if s.id.startswith(made.snapshot_id)]
    if len(matches) != 1 or PREPASS_TAG in matches[0].tags:
        raise ResticError(f"restic made snapshot {made.snapshot_id} but does not list it.")
    if prepasses:
        _run(repo, ["forget", *prepasses], write=True)
    listed = sorted((s for s in found if PREPASS_TAG not in s.tags), key=lambda s: s.time)
    return replace(made, snapshot_id=matches[0].id, time=matches[0].time, listed=tuple(listed))


def snapshots(repo: Repo, ids: Iterable[str] = ()) -> list[SnapshotInfo]:
    """Return the repository's snapshots (or those of ``ids``), oldest first.

    The first passes of two-pass backups are no snapshots of their own and are left out.
    """
    out = _run(repo, ["snapshots", "--json", *ids])
    found = [_snapshot_info(item) for item in json.loads(_last_json(out) or "[]")]
    return sorted((s for s in found if PREPASS_TAG not in s.tags), key=lambda s: s.time)


def forget(
    repo: Repo,
    *,
    keep_last: int,
    keep_daily: int,
    keep_weekly: int,
    prune: bool = True,
    keep_tags: Iterable[str] = (),
    tags: Iterable[str] = (),
    listed: Iterable[SnapshotInfo] | None = None,
) -> list[str]:
    """Remove the snapshots the policy does not keep; return their ids.

    The policy covers the whole repository (whatever a snapshot's host or tags), days and weeks
    in UTC. At least the newest snapshot is always kept. With ``prune`` the data no snapshot
    uses any more is deleted too (in the same restic run, and only when a snapshot was
    removed). A snapshot holding any of ``keep_tags`` is kept too (restic ``--keep-tag``);
    with ``tags`` only the snapshots holding one of them are considered at all (restic
    ``--tag``), the others are neither counted nor removed.

    ``listed``: the repository's snapshots as they are now, first passes already forgotten
    (``BackupSummary.listed``, less what an earlier ``forget`` removed). With it restic is not
    asked to list them again, nor run at all when no more of them are considered than
    ``keep_last`` keeps, or than one (the newest, which every rule keeps): then nothing can be
    removed.
    """
    if max(keep_last, keep_daily, keep_weekly) <= 0:
        keep_last = 1
    if listed is None:
        _forget_prepasses(repo)  # a killed two-pass backup's first pass counts for nothing
    else:
        wanted = set(tags)
        considered = [s for s in listed if not wanted or wanted.intersection(s.tags)]
        if len(considered) <= max(keep_last, 1):  # every rule keeps the newest
            return []
    args = ["forget", "--json", "--group-by", ""]
    for tag in keep_tags:
        args += ["--keep-tag", tag]
    for tag in tags:
        args += ["--tag", tag]
    for flag, value in (
        ("--keep-last", keep_last),
        ("--keep-daily", keep_daily),
        ("--keep-weekly", keep_weekly),
    ):
        if value > 0:
            args += [flag, str(value)]
    if prune:
        args.append("--prune")  # restic prunes only if the policy removed a snapshot
    out = _run(repo, args, write=True)
    return [str(item["id"]) for group in _json_list(out) for item in group["remove"] or []]


def restore(
    repo: Repo, snapshot_id: str, target: Path, on_progress: ProgressFn | None = None
) -> None:
    """Restore ``snapshot_id`` into ``target`` and verify every restored file.

    ``target`` must be an empty, root-owned directory that is no symlink, outside every data
    dir; it ends up with the snapshot's ``/data`` in it (contents, owners and modes, and the
    top directory's own owner and mode). Owners are the uids stored in the snapshot; the
    caller hands the tree to the sandbox's uid (``safefs.chown_tree``) when they differ.
    """
    _check_target(target)
    total, _files = snapshot_size(repo, snapshot_id)
    done = threading.Event()

    def poll() -> None:
        while not done.wait(RESTORE_POLL_SECONDS):
            if on_progress and total:
                restored = safefs.disk_usage(target)
                percent = min(99.0, 100.0 * restored / total)
                on_progress(percent, f"Restored {_mb(restored)} of {_mb(total)}")

    watcher = threading.Thread(target=poll, name="restic-restore-progress", daemon=True)
    watcher.start()
    try:
        _run(
            repo,
            ["restore", snapshot_id, "--target", RESTORE_MOUNT, "--verify"],
            target=target,
            caps=RESTORE_CAPS,
        )
    finally:
        done.set()
        watcher.join()
    if on_progress:
        on_progress(100.0, f"Restored and verified {_mb(total)}")


def snapshot_size(repo: Repo, snapshot_id: str) -> tuple[int, int]:
    """Return (bytes, files) that restoring ``snapshot_id`` writes."""
    out = json.loads(_last_json(_run(repo, ["stats", "--json", snapshot_id])) or "{}")
    return int(out.get("total_size", 0)), int(out.get("total_file_count", 0))


def check(repo: Repo, *, read_data: bool = False, read_data_subset: str | None = None) -> None:
    """Check the repository's structure (and with ``read_data`` every byte of every pack, or
    with ``read_data_subset`` those of some packs: ``"10%"`` a random tenth, ``"2/7"`` the
    second of seven fixed groups; restic ``--read-data-subset``).

    Raises ResticError with ``corrupt=True`` if anything is damaged.
    """
    args = ["check"]
    if read_data:
        args.append("--read-data")
    elif read_data_subset:
        if not re.fullmatch(r"\d+(\.\d+)?%|\d+/\d+", read_data_subset.strip()):
            raise ValueError(f"not a subset restic reads: {read_data_subset!r} (say 10% or 1/10)")
        args.append(f"--read-data-subset={read_data_subset.strip()}")
    try:
        _run(repo, args)
    except ResticError as exc:
        if exc.kind == "failed":
            raise ResticError(f"The backup repository is damaged: {exc}", kind="corrupt") from None
        raise


def dump_archive(repo: Repo, snapshot_id: str, out: BinaryIO) -> None:
    """Write a tar of ``snapshot_id`` (entries under ``data/``) to ``out``."""
    _run(repo, ["dump", "--archive", "tar", snapshot_id, SOURCE_MOUNT], stdout=out)


def unlock(repo: Repo) -> None:
    """Remove every lock, stale or not: the caller holds Hermit's own lease on the repository,
    so no other restic may be working on it (restic alone cannot tell, every confined restic
    being pid 2 of its own namespace)."""
    _run(repo, ["unlock", "--remove-all"], write=True)


def stats(repo: Repo) -> RepoStats:
    """Return the repository's stored size (deduplicated, compressed) and counts."""
    out = json.loads(_last_json(_run(repo, ["stats", "--json", "--mode", "raw-data"])) or "{}")
    return RepoStats(
        total_size=int(out.get("total_size", 0)),
        blob_count=int(out.get("total_blob_count", 0)),
        snapshots_count=int(out.get("snapshots_count", 0)),
    )


# -- running restic ----------------------------------------------------------------------------


def command(
    repo: Repo,
    args: list[str],
    *,
    write: bool = False,
    source: Path | None = None,
    target: Path | None = None,
    caps: Iterable[str] = (),
    gate: Path | None = None,
) -> list[str]:
    """Return the argv that runs ``restic <args>`` confined (see the module docstring)."""
    argv = [
        _bwrap(),
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--hostname",
        "hermit-restic",
        "--die-with-parent",
        "--new-session",
        "--ro-bind",
        "/usr",
        "/usr",
    ]
    if repo.is_local:
        argv.insert(1, "--unshare-net")
    for top in ("bin", "sbin", "lib", "lib32", "lib64"):
        host = Path("/") / top
        if host.is_symlink():
            argv += ["--symlink", os.readlink(host), str(host)]
        elif host.is_dir():
            argv += ["--ro-bind", str(host), str(host)]
    for name in _TLS_ETC + (() if repo.is_local else _REMOTE_ETC):
        argv += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    argv += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]  # noqa: S108 - private
    if repo.is_local:
        argv += ["--bind" if write else "--ro-bind", repo.location, REPO_MOUNT]
    if source is not None:
        argv += ["--ro-bind", str(source), SOURCE_MOUNT]
    if target is not None:
        argv += ["--bind", str(target), f"{RESTORE_MOUNT}{SOURCE_MOUNT}"]
    if gate is not None:
        argv += ["--ro-bind", str(gate), GATE_MOUNT]
    argv += ["--remount-ro", "/", "--cap-drop", "ALL"]
    for cap in caps:
        argv += ["--cap-add", cap]
    location = REPO_MOUNT if repo.is_local else repo.location
    argv += ["--", RESTIC, "--repo", location, "--no-cache"]
    if not write:
        argv.append("--no-lock")
    return [*argv, *args]


def _env(repo: Repo) -> dict[str, str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/tmp",  # noqa: S108 - the private tmpfs
        "TMPDIR": "/tmp",  # noqa: S108
        "TZ": "UTC",
        "LANG": "C.UTF-8",
        "RESTIC_PROGRESS_FPS": PROGRESS_FPS,
    }
    env.update(repo.env)
    env["RESTIC_PASSWORD"] = repo.password
    return env


def _run(
    repo: Repo,
    args: list[str],
    *,
    write: bool = False,
    source: Path | None = None,
    target: Path | None = None,
    caps: Iterable[str] = (),
    on_line: Callable[[str], None] | None = None,
    stdout: BinaryIO | None = None,
    ok_codes: tuple[int, ...] = (0,),
    gate: _Gate | None = None,
) -> str:
    """Run restic confined; return its stdout (unless streamed to ``stdout`` or ``on_line``).

    With a ``gate`` (see ``_Gate``) restic runs at a higher CPU priority: a paused sandbox
    waits for it. Raises ResticError with a readable, secret-free message on a failure or a
    timeout, or what the gate's pause raised.
    """
    if repo.is_local and not Path(repo.location).is_dir():
        raise ResticError(f"There is no backup repository at {repo.location}.", kind="missing")
    argv = command(
        repo,
        args,
        write=write,
        source=source,
        target=target,
        caps=caps,
        gate=gate.dir if gate else None,
    )
    if gate:
        argv = [NICE, "-n", str(URGENT_NICENESS), *argv]
    timeout = _timeout()
    timed_out = threading.Event()

    def stop() -> None:
        timed_out.set()
        proc.kill()

    with _process(argv, _env(repo)) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        stderr_lines: list[str] = []
        reader = threading.Thread(target=_collect, args=(proc.stderr, stderr_lines), daemon=True)
        reader.start()
        killer = threading.Timer(timeout, stop)
        killer.start()
        if gate:
            gate.start(proc)
        try:
            output = _consume(proc.stdout, on_line, stdout)
            code = proc.wait()
        finally:
            killer.cancel()
            reader.join()
            if gate:
                gate.join()
    if gate and gate.error:
        raise gate.error
    if gate and gate.overran:
        raise ResticError(
            f"restic {args[0]}: the pause of the agent while restic read it took too long "
            f"(over {gate.max_pause:g} s, the storage may be slow or unreachable); the agent "
            "was resumed and this backup stopped. Earlier snapshots are intact.",
            kind="timeout",
        )
    if timed_out.is_set():
        raise ResticError(
            f"restic {args[0]} did not finish within {timeout:.0f} s and was stopped.",
            kind="timeout",
        )
    if code in ok_codes:
        return output
    error = "\n".join(stderr_lines)
    raise _error(repo, args[0], error)


@contextlib.contextmanager
def _process(argv: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:  # an exception in a callback: restic must not outlive us
            proc.kill()
            proc.wait()


def _consume(pipe: IO[bytes], on_line: Callable[[str], None] | None, out: BinaryIO | None) -> str:
    if out is not None:
        shutil.copyfileobj(pipe, out, 1024 * 1024)
        return ""
    if on_line is None:
        return pipe.read().decode(errors="replace")
    for raw in pipe:
        on_line(raw.decode(errors="replace").strip())
    return ""


def _collect(pipe: IO[bytes], lines: list[str]) -> None:
    for raw in pipe:
        line = raw.decode(errors="replace").rstrip()
        if line:
            lines.append(line)
            del lines[:-40]  # keep the end: that is where restic says why


_PATTERNS: tuple[tuple[str, str, str], ...] = (
    (
        r"wrong password|no key found",
        "password",
        "The backup repository's password does not "
        "open it (wrong password, or its keys are damaged).",
    ),
    (
        r"Is there a repository at the following location|repository does not exist|"
        r"unable to open config file|NoSuchBucket|bucket does not exist",
        "missing",
        "There is no backup repository at {location}.",
    ),
    (
        r"already locked|unable to create lock",
        "locked",
        "The backup repository is locked by "
        "another restic run; wait for it, or unlock it if that run is gone.",
    ),
    (
        r"no space left on device|quota exceeded|EntityTooLarge",
        "no_space",
        "The backup storage is out of space.",
    ),
    (
        r"ciphertext verification failed|hash does not match|invalid data returned|"
        r"pack .* contains \d+ errors|repository contains errors|Pack ID does not match|"
        r"unexpected end of file|wrong data returned|error for tree|decrypting blob .* failed",
        "corrupt",
        "The backup repository is damaged",
    ),
)


def _error(repo: Repo, step: str, stderr: str) -> ResticError:
    clean = _scrub(repo, stderr)
    detail = _detail(clean)
    verdict = _verdict(clean)
    for pattern, kind, message in _PATTERNS:
        if re.search(pattern, verdict, re.IGNORECASE):
            text = message.format(location=repo.location)
            if kind == "corrupt":
                text = f"{text} (restic {step}: {detail})."
            return ResticError(text, kind=kind)
    return ResticError(f"restic {step} failed: {detail}")


def _verdict(stderr: str) -> str:
    """The part of restic's stderr that may say why it failed.

    Lines that quote a path in the sandbox's data (``/data/...``, ``/restore/...``) may hold
    names the sandbox chose, newlines included, that could pass for "wrong password" or
    "repository is already locked". When any is there, only restic's last line counts, and
    only if it is its ``Fatal:`` verdict (printed as it exits, after every per-file error).
    """
    lines = [line for line in stderr.splitlines() if line.strip()]
    quoted = any(re.search(rf"(?:{SOURCE_MOUNT}|{RESTORE_MOUNT})/", line) for line in lines)
    if not quoted:
        return "\n".join(lines)
    return lines[-1] if lines and lines[-1].startswith("Fatal:") else ""


def _detail(stderr: str) -> str:
    """The lines of restic's stderr that say what went wrong (its last few)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    wanted = [line for line in lines if re.search(r"fatal|error|fail|denied|invalid", line, re.I)]
    return "; ".join((wanted or lines or ["no output"])[-3:])[:800]


def _scrub(repo: Repo, text: str) -> str:
    for secret in (repo.password, *repo.env.values()):
        if len(secret) >= 4 and secret in text:
            text = text.replace(secret, "[secret]")
    return text


# -- helpers -----------------------------------------------------------------------------------


def _bwrap() -> str:
    name = _setting("HERMIT_BWRAP", "bwrap")
    found = name if os.sep in name else shutil.which(name)
    if not found or not os.access(found, os.X_OK):
        raise ResticError(f"bubblewrap ({name}) was not found: install the bubblewrap package.")
    if not os.access(RESTIC, os.X_OK):
        raise ResticError(f"restic was not found at {RESTIC}: install the restic package.")
    return found


def _timeout() -> float:
    return float(_setting("HERMIT_BACKUP_TIMEOUT", 3600))


def _max_pause() -> float:
    return float(_setting("HERMIT_BACKUP_MAX_PAUSE_SECONDS", 10))


def _setting(name: str, default: Any) -> Any:
    from django.conf import settings

    if settings.configured or os.environ.get("DJANGO_SETTINGS_MODULE"):
        return getattr(settings, name, default)
    return default


def _check_source(source: Path) -> None:
    try:
        with safefs.opened_dir(source):
            pass
    except OSError as exc:
        raise ResticError(f"Cannot back up {source}: not a directory ({exc.strerror}).") from None


def _check_target(target: Path) -> None:
    try:
        with safefs.opened_dir(target) as fd:
            st = os.fstat(fd)
            entries = os.listdir(fd)
    except OSError as exc:
        raise ResticError(
            f"Cannot restore into {target}: not a directory ({exc.strerror})."
        ) from None
    if st.st_uid != 0 or entries:
        raise ResticError(f"Cannot restore into {target}: it must be empty and root's.")


def _find_snapshot(repo: Repo, snapshot_id: str) -> SnapshotInfo:
    found = snapshots(repo, [snapshot_id])
    if not found:
        raise ResticError(f"restic made snapshot {snapshot_id} but does not list it.")
    return found[0]


def _snapshot_info(item: dict[str, Any]) -> SnapshotInfo:
    return SnapshotInfo(
        id=str(item["id"]),
        short_id=str(item.get("short_id") or item["id"][:8]),
        time=_parse_time(str(item["time"])),
        tags=list(item.get("tags") or []),
        paths=list(item.get("paths") or []),
        host=str(item.get("hostname", "")),
        parent=item.get("parent"),
    )


def _parse_time(text: str) -> datetime:
    """Parse restic's RFC 3339 time (nanoseconds, ``Z`` or an offset) as aware UTC."""
    match = re.fullmatch(r"(.+?T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", text)
    if not match:
        raise ResticError(f"restic gave a time this cannot read: {text!r}")
    base, fraction, zone = match.groups()
    micros = (fraction or ".0")[1:7].ljust(6, "0")
    parsed = datetime.fromisoformat(f"{base}.{micros}{'+00:00' if zone == 'Z' else zone}")
    return parsed.astimezone(UTC)


def _json_line(line: str) -> dict[str, Any]:
    if not line.startswith("{"):
        return {}
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _last_json(out: str) -> str:
    """restic prints some plain text before its JSON; return the last JSON line."""
    lines = [line for line in out.splitlines() if line.startswith(("[", "{"))]
    return lines[-1] if lines else ""


def _json_list(out: str) -> list[Any]:
    """The last line of ``out`` that is a JSON list (``forget --prune`` prints the prune's
    text, progress lines such as ``[0:00] 100.00%`` among it, after its JSON)."""
    for line in reversed(out.splitlines()):
        if line.startswith("["):
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, list):
                    return value
    return []


def _backup_progress(status: dict[str, Any]) -> tuple[float, str]:
    percent = 100.0 * float(status.get("percent_done", 0.0))
    done, total = int(status.get("bytes_done", 0)), int(status.get("total_bytes", 0))
    files = int(status.get("files_done", 0))
    return min(percent, 99.0), f"Backed up {_mb(done)} of {_mb(total)} ({files} files)"


def _mb(size: int) -> str:
    return f"{size / 1_000_000:.1f} MB"
