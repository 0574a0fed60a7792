"""The backup engine: real restic, confined in real bubblewrap, on a local directory and on a
real S3 HTTP server (moto, on 127.0.0.1).

The source is a directory shaped like a sandbox's data dir and owned by a sandbox-like uid; the
sandbox's hostile moves are planted in it (links to host files, relative and absolute, and to
host directories).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
from django.core.files.base import ContentFile

from sandboxes.backends import safefs
from sandboxes.backups import EXCLUDES, restic, storage
from tests.fixtures.backups import EmptyRepository

UID = 301_234  # the data dir's owner, as a sandbox's uid would be
ROOT = Path(__file__).resolve().parents[1]


# -- helpers ---------------------------------------------------------------------------------


def make_data_dir(base: Path, *, big_kb: int = 256) -> Path:
    """A sandbox-like data dir: workspace and memory files, caches and logs, owned by UID."""
    data = base / "data"
    for sub in ("state/workspace", "state/memory", "home/.cache", "cache", "tmp", "logs"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    (data / "state/workspace/notes.md").write_text("The user's cat is called Ada.\n" * 40)
    (data / "state/workspace/blob.bin").write_bytes(os.urandom(big_kb * 1024))
    (data / "state/memory/main.sqlite").write_bytes(os.urandom(64 * 1024))
    (data / "state/openclaw.json").write_text('{"agents": {}}\n')
    (data / "home/.cache/junk").write_bytes(os.urandom(4096))
    (data / "cache/compiled").write_bytes(os.urandom(4096))
    (data / "tmp/scratch").write_text("temporary")
    (data / "logs/openclaw.log").write_text("log line\n")
    (data / "state/secret-mode").write_text("only the sandbox reads this")
    os.chmod(data / "state/secret-mode", 0o600)
    safefs.chown_tree(data, UID, UID, root_mode=0o700)
    return data


def make_repo(base: Path) -> restic.Repo:
    """A new repository, made by ``restic init``."""
    repo = restic.Repo(str(base / "repo" / "sbx-1-test"), secrets.token_urlsafe(24))
    restic.init(repo)
    return repo


def fresh_target(base: Path, name: str = "restored") -> Path:
    target = base / name
    target.mkdir(mode=0o700)
    return target


def tree(root: Path) -> dict[str, tuple[str, Any]]:
    """Map every relative path under root to (kind, content or link target), links unfollowed."""
    found: dict[str, tuple[str, Any]] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            found[rel] = ("link", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            found[rel] = ("dir", st.st_uid)
        else:
            found[rel] = ("file", (path.read_bytes(), st.st_uid, stat.S_IMODE(st.st_mode)))
    return found


def kept(data: Path) -> dict[str, tuple[str, Any]]:
    """tree(data) without what EXCLUDES leaves out."""
    return {
        rel: value
        for rel, value in tree(data).items()
        if not any(rel == e or rel.startswith(f"{e}/") for e in EXCLUDES)
    }


def open_tar(out: io.BytesIO) -> tarfile.TarFile:
    return tarfile.TarFile(fileobj=io.BytesIO(out.getvalue()))


def backup(repo: restic.Repo, data: Path, **kwargs: Any) -> restic.BackupSummary:
    return restic.backup(
        repo, data, tags=kwargs.pop("tags", ["test"]), host="sbx-1", excludes=EXCLUDES, **kwargs
    )


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line holds ``text``, with all their descendants."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    result = set(found)
    todo = list(found)
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                for child in (task / "children").read_text().split():
                    if int(child) not in result:
                        result.add(int(child))
                        todo.append(int(child))
    return sorted(result)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def wait_until(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_data_dir(tmp_path)


@pytest.fixture
def repo(tmp_path: Path, empty_repository: EmptyRepository) -> restic.Repo:
    """A new, empty, initialised repository of the test's own: a copy of the session's one made
    by ``restic init`` and never written to. A real init costs ~3 s (restic calibrates its key
    derivation); test_it_initialises_a_repository_once runs init itself."""
    return empty_repository.copy(tmp_path / "repo" / "sbx-1-test")


# -- repositories and snapshots --------------------------------------------------------------


def test_it_initialises_a_repository_once(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    config = Path(repo.location) / "config"
    before = config.read_bytes()
    restic.init(repo)  # again: nothing changes
    assert config.read_bytes() == before
    assert restic.snapshots(repo) == []
    assert stat.S_IMODE(Path(repo.location).stat().st_mode) == 0o700


def test_it_backs_up_incrementally(repo: restic.Repo, data: Path) -> None:
    progress: list[tuple[float, str]] = []
    first = backup(repo, data, on_progress=lambda p, m: progress.append((p, m)))
    assert first.files_new == 5 and first.files_changed == 0
    assert first.data_added > 256 * 1024
    assert first.time.tzinfo is not None and first.time.utcoffset() == UTC.utcoffset(None)
    assert progress and all(0 <= p <= 100 and "Backed up" in m for p, m in progress)

    with (data / "state/workspace/notes.md").open("a") as handle:
        handle.write(secrets.token_hex(5 * 1024))  # 10 KB of new, incompressible text
    second = backup(repo, data, parent=first.snapshot_id, tags=["schedule"])
    assert (second.files_new, second.files_changed, second.files_unmodified) == (0, 1, 4)
    assert 10 * 1024 <= second.data_added < 64 * 1024

    listed = restic.snapshots(repo)
    assert [s.id for s in listed] == [first.snapshot_id, second.snapshot_id]
    assert listed[1].tags == ["schedule"] and listed[1].paths == ["/data"]
    assert listed[1].host == "sbx-1" and listed[1].parent == first.snapshot_id
    assert listed[1].time == second.time and listed[1].short_id == second.snapshot_id[:8]
    assert restic.stats(repo).snapshots_count == 2


class Pause:
    """A pause that records when it holds (as backend.frozen would freeze the sandbox), and
    runs ``before`` just before it does: a last write of the sandbox before it freezes."""

    def __init__(self, before: Callable[[], None] = lambda: None) -> None:
        self.before = before
        self.entered = 0
        self.holding = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        self.before()
        self.entered += 1
        self.holding = True
        try:
            yield
        finally:
            self.holding = False


def raw_snapshots(repo: restic.Repo) -> list[dict[str, Any]]:
    return json.loads(restic._last_json(restic._run(repo, ["snapshots", "--json"])))


def test_a_paused_backup_reads_in_two_passes_and_keeps_what_changed_meanwhile(
    repo: restic.Repo, data: Path, tmp_path: Path
) -> None:
    notes = data / "state/workspace/notes.md"
    locks = Path(repo.location) / "locks"
    restic_open = []

    def before() -> None:
        # The paused pass's restic has opened and locked the repository already (its slow
        # start is not part of the pause), and has not read the source yet: the sandbox's
        # last write before the pause, after the first pass read the file, is in the snapshot.
        restic_open.append(any(locks.iterdir()))
        notes.write_text("written after the first pass")

    pause = Pause(before=before)
    progress: list[tuple[float, bool]] = []
    summary = backup(
        repo, data, pause=pause, on_progress=lambda p, m: progress.append((p, pause.holding))
    )
    assert pause.entered == 1 and not pause.holding and restic_open == [True]
    assert all(p < 90 for p, holding in progress if not holding)
    assert all(90 <= p <= 100 for p, holding in progress if holding)
    assert 0 < summary.pause_seconds < summary.seconds
    assert (summary.files_new, summary.total_files) == (5, 5)  # no parent: all new
    assert [s.id for s in restic.snapshots(repo)] == [summary.snapshot_id]
    assert [s["id"] for s in raw_snapshots(repo)] == [summary.snapshot_id]  # pass one forgotten
    target = fresh_target(tmp_path)
    restic.restore(repo, summary.snapshot_id, target)
    assert (target / "state/workspace/notes.md").read_text() == "written after the first pass"
    assert tree(target) == kept(data)  # excludes hold in the paused pass too

    single = Pause()
    again = backup(repo, data, pause=single, two_pass=False, parent=summary.snapshot_id)
    assert single.entered == 1 and again.pause_seconds > 0
    assert [s.id for s in restic.snapshots(repo)] == [summary.snapshot_id, again.snapshot_id]


class TimedPause:
    """A pause that records when it began and ended (monotonic seconds)."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        began = time.monotonic()
        try:
            yield
        finally:
            self.spans.append((began, time.monotonic()))


def test_a_pause_that_lasts_too_long_is_ended_and_the_backup_stopped(
    repo: restic.Repo, data: Path, settings: Any
) -> None:
    first = backup(repo, data)
    # A big change for the paused pass to read and upload: about a second of work here.
    (data / "state/workspace/big.bin").write_bytes(os.urandom(96 * 1024 * 1024))
    settings.HERMIT_BACKUP_MAX_PAUSE_SECONDS = 0.05
    pause = TimedPause()
    started = time.monotonic()
    with pytest.raises(restic.ResticError) as caught:
        backup(repo, data, pause=pause, two_pass=False, parent=first.snapshot_id)
    assert caught.value.kind == "timeout" and "took too long" in str(caught.value)
    assert "Earlier snapshots are intact" in str(caught.value)
    [(began, ended)] = pause.spans
    assert ended - began < 0.05 + 0.3  # thawed by the watchdog, not at restic's end
    assert time.monotonic() - started < 30
    assert processes_mentioning(repo.location) == []  # restic was stopped
    assert [s["id"] for s in raw_snapshots(repo)] == [first.snapshot_id]
    restic.check(repo)  # the earlier snapshot is whole
    restic.unlock(repo)  # the killed run's lock (the caller holds Hermit's lease)
    settings.HERMIT_BACKUP_MAX_PAUSE_SECONDS = 60
    again = backup(repo, data, pause=TimedPause(), two_pass=False, parent=first.snapshot_id)
    assert again.files_new == 1
    assert [s.id for s in restic.snapshots(repo)] == [first.snapshot_id, again.snapshot_id]


def test_a_pause_that_fails_stops_the_backup(repo: restic.Repo, data: Path) -> None:
    @contextlib.contextmanager
    def broken() -> Iterator[None]:
        raise RuntimeError("could not pause the sandbox")
        yield

    with pytest.raises(RuntimeError, match="could not pause"):
        backup(repo, data, pause=broken, two_pass=False)
    assert processes_mentioning(repo.location) == []
    assert raw_snapshots(repo) == []


def test_a_killed_first_pass_is_forgotten_by_the_next_backup_and_retention(
    repo: restic.Repo, data: Path
) -> None:
    kept = backup(repo, data)
    # What a two-pass backup killed after its first pass leaves behind:
    restic._backup_pass(
        repo,
        data,
        [restic.PREPASS_TAG],
        "sbx-1",
        EXCLUDES,
        None,
        None,
        None,
        find=False,
    )
    assert len(raw_snapshots(repo)) == 2 and len(restic.snapshots(repo)) == 1
    assert restic.forget(repo, keep_last=1, keep_daily=0, keep_weekly=0) == []
    assert [s["id"] for s in raw_snapshots(repo)] == [kept.snapshot_id]
    with pytest.raises(ValueError):
        restic.backup(repo, data, tags=[restic.PREPASS_TAG], host="sbx-1")


def test_it_restores_a_snapshot_into_a_fresh_dir_and_verifies(
    repo: restic.Repo, data: Path, tmp_path: Path
) -> None:
    summary = backup(repo, data)
    (data / "state/workspace/notes.md").write_text("changed after the backup")
    expected = kept(data)
    expected["state/workspace/notes.md"] = (
        "file",
        (b"The user's cat is called Ada.\n" * 40, UID, 0o644),
    )
    target = fresh_target(tmp_path)
    progress: list[float] = []
    restic.restore(repo, summary.snapshot_id, target, on_progress=lambda p, m: progress.append(p))
    assert tree(target) == expected  # contents, owners and modes; excludes left out
    assert (target.stat().st_uid, stat.S_IMODE(target.stat().st_mode)) == (UID, 0o700)
    assert progress[-1] == 100.0
    assert restic.snapshot_size(repo, summary.snapshot_id)[0] >= 256 * 1024


def test_it_restores_only_into_an_empty_root_owned_dir(
    repo: restic.Repo, data: Path, tmp_path: Path
) -> None:
    summary = backup(repo, data)
    busy = fresh_target(tmp_path, "busy")
    (busy / "left-over").write_text("x")
    link = tmp_path / "link"
    link.symlink_to(fresh_target(tmp_path, "elsewhere"))
    for target in (busy, link, data):
        with pytest.raises(restic.ResticError, match="Cannot restore into"):
            restic.restore(repo, summary.snapshot_id, target)
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_it_leaves_excluded_caches_out(repo: restic.Repo, data: Path) -> None:
    summary = backup(repo, data)
    out = io.BytesIO()
    restic.dump_archive(repo, summary.snapshot_id, out)
    names = open_tar(out).getnames()
    assert "data/state/workspace/notes.md" in names
    for excluded in EXCLUDES:
        assert not any(n == f"data/{excluded}" or n.startswith(f"data/{excluded}/") for n in names)


def test_it_dumps_a_snapshot_as_a_tar(repo: restic.Repo, data: Path) -> None:
    summary = backup(repo, data)
    out = io.BytesIO()
    restic.dump_archive(repo, summary.snapshot_id, out)
    archive = open_tar(out)
    member = archive.extractfile("data/state/workspace/blob.bin")
    assert member is not None
    assert member.read() == (data / "state/workspace/blob.bin").read_bytes()
    assert archive.getmember("data/state/secret-mode").uid == UID


def test_it_forgets_what_the_policy_does_not_keep(repo: restic.Repo, data: Path) -> None:
    made = []
    for n in range(5):
        (data / "state/workspace/notes.md").write_text(f"version {n}")
        made.append(backup(repo, data).snapshot_id)
    removed = restic.forget(repo, keep_last=2, keep_daily=0, keep_weekly=0)
    assert sorted(removed) == sorted(made[:3])
    assert [s.id for s in restic.snapshots(repo)] == made[3:]
    # All on one day: keep_daily=1 keeps the newest only; a policy of nothing keeps one.
    assert restic.forget(repo, keep_last=0, keep_daily=1, keep_weekly=0) == [made[3]]
    assert restic.forget(repo, keep_last=0, keep_daily=0, keep_weekly=0) == []
    assert [s.id for s in restic.snapshots(repo)] == [made[4]]
    restic.check(repo, read_data=True)  # pruned, still whole


def test_forget_keeps_tagged_snapshots_and_can_consider_only_some(
    repo: restic.Repo, data: Path
) -> None:
    made = []
    for n, tag in enumerate(["pinned", "auto", "auto", "other", "auto"]):
        (data / "state/workspace/notes.md").write_text(f"version {n}")
        made.append(backup(repo, data, tags=[tag]).snapshot_id)
    # Only "auto" snapshots are considered: "pinned" and "other" are neither counted nor removed.
    removed = restic.forget(repo, keep_last=1, keep_daily=0, keep_weekly=0, tags=["auto"])
    assert sorted(removed) == sorted([made[1], made[2]])
    assert [s.id for s in restic.snapshots(repo)] == [made[0], made[3], made[4]]
    # Over everything, keep_last=1 would leave the newest alone; keep_tags keeps "pinned" too.
    removed = restic.forget(repo, keep_last=1, keep_daily=0, keep_weekly=0, keep_tags=["pinned"])
    assert removed == [made[3]]
    assert [s.id for s in restic.snapshots(repo)] == [made[0], made[4]]


def test_it_detects_a_corrupted_pack(repo: restic.Repo, data: Path, tmp_path: Path) -> None:
    summary = backup(repo, data)
    restic.check(repo, read_data=True)
    packs = [p for p in (Path(repo.location) / "data").rglob("*") if p.is_file()]
    biggest = max(packs, key=lambda p: p.stat().st_size)
    os.chmod(biggest, 0o600)
    with biggest.open("r+b") as handle:
        handle.seek(biggest.stat().st_size // 2)
        chunk = handle.read(64)
        handle.seek(-len(chunk), os.SEEK_CUR)
        handle.write(bytes(b ^ 0xFF for b in chunk))
    with pytest.raises(restic.ResticError) as caught:
        restic.check(repo, read_data=True)
    assert caught.value.corrupt and "damaged" in str(caught.value)
    assert repo.password not in str(caught.value)
    with pytest.raises(restic.ResticError):
        restic.restore(repo, summary.snapshot_id, fresh_target(tmp_path))


def test_file_names_in_restic_errors_do_not_decide_what_went_wrong(
    repo: restic.Repo, data: Path, tmp_path: Path
) -> None:
    # The sandbox names its biggest file like restic's password and lock errors; a restore
    # that meets a damaged pack of it quotes the name in its per-file error lines.
    name = "wrong password or no key found\nFatal: repository is already locked.bin"
    (data / "state/workspace" / name).write_bytes(os.urandom(2 * 1024 * 1024))
    summary = backup(repo, data)
    packs = [p for p in (Path(repo.location) / "data").rglob("*") if p.is_file()]
    biggest = max(packs, key=lambda p: p.stat().st_size)
    biggest.chmod(0o600)
    with biggest.open("r+b") as handle:
        handle.seek(biggest.stat().st_size // 2)
        handle.write(b"\0" * 64)
    with pytest.raises(restic.ResticError) as caught:
        restic.restore(repo, summary.snapshot_id, fresh_target(tmp_path))
    assert caught.value.kind == "failed"
    assert str(caught.value).startswith("restic restore failed:")
    assert "There were" in str(caught.value)  # restic's own verdict is kept in the message


# -- links the sandbox planted -----------------------------------------------------------------


@pytest.fixture
def host_files(tmp_path: Path) -> dict[str, Path]:
    """Host files a sandbox must never reach: one file, one directory, root's."""
    secret = tmp_path / "host-secret.txt"
    secret.write_text(f"HOST-SECRET-{secrets.token_hex(16)}")
    os.chmod(secret, 0o600)
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    (host_dir / "inside.txt").write_text(f"HOST-DIR-{secrets.token_hex(16)}")
    return {"secret": secret, "dir": host_dir}


def plant_links(data: Path, host: dict[str, Path]) -> dict[str, str]:
    rel_up = os.path.relpath(host["secret"], data / "state")
    links = {
        "state/abs-link": str(host["secret"]),
        "state/rel-link": rel_up,
        "state/dir-link": str(host["dir"]),
        "state/workspace/etc": "/etc",
    }
    for rel, points_to in links.items():
        os.symlink(points_to, data / rel)
        os.lchown(data / rel, UID, UID)
    return links


def test_it_stores_planted_links_as_links_and_never_follows_them(
    repo: restic.Repo, data: Path, tmp_path: Path, host_files: dict[str, Path]
) -> None:
    links = plant_links(data, host_files)
    secret = host_files["secret"].read_bytes()
    inside = (host_files["dir"] / "inside.txt").read_bytes()
    summary = backup(repo, data)

    out = io.BytesIO()
    restic.dump_archive(repo, summary.snapshot_id, out)
    assert secret not in out.getvalue() and inside not in out.getvalue()
    archive = open_tar(out)
    for rel, points_to in links.items():
        member = archive.getmember(f"data/{rel}")
        assert member.issym() and member.linkname == points_to
    assert not any(n.startswith("data/state/dir-link/") for n in archive.getnames())

    host_before = tree(tmp_path / "host-dir"), host_files["secret"].stat()
    target = fresh_target(tmp_path)
    restic.restore(repo, summary.snapshot_id, target)
    for rel, points_to in links.items():
        assert os.readlink(target / rel) == points_to
    assert (tree(tmp_path / "host-dir"), host_files["secret"].stat()) == host_before

    # Handing the restored tree to another uid (as a restore onto a new host does) changes
    # the links themselves, never what they point at.
    safefs.chown_tree(target, UID + 1, UID + 1, root_mode=0o700)
    assert (target / "state/abs-link").lstat().st_uid == UID + 1
    assert host_files["secret"].stat().st_uid == 0
    assert (host_files["dir"] / "inside.txt").stat().st_uid == 0
    assert os.stat("/etc").st_uid == 0


def test_it_shows_restic_nothing_of_the_host(
    repo: restic.Repo, tmp_path: Path, host_files: dict[str, Path]
) -> None:
    """Even a restic that followed a link would find only its mounts: the confinement has no
    host files but /usr, /lib* and the TLS certificates."""
    argv = restic.command(repo, ["version"], source=tmp_path / "repo", caps=restic.BACKUP_CAPS)
    split = argv.index(restic.RESTIC)
    probe = [
        *argv[:split],
        "/bin/sh",
        "-c",
        f"cat {host_files['secret']} /etc/shadow /etc/passwd; ls {host_files['dir']}; "
        f"touch /usr/x /data/x /etc/x 2>&1; echo done",
    ]
    out = subprocess.run(probe, capture_output=True, text=True, timeout=30, env={})
    assert "done" in out.stdout
    assert host_files["secret"].read_text() not in out.stdout + out.stderr
    assert "root:" not in out.stdout
    assert "inside.txt" not in out.stdout
    assert out.stdout.count("Read-only file system") == 3


def test_it_fingerprints_a_tree_without_following_links(
    data: Path, host_files: dict[str, Path]
) -> None:
    plant_links(data, host_files)
    first = safefs.fingerprint(data, EXCLUDES)
    assert safefs.fingerprint(data, EXCLUDES) == first
    (host_files["dir"] / "inside.txt").write_text("host changed")  # behind a link: not ours
    (data / "cache/compiled").write_bytes(b"rebuilt cache")  # excluded
    (data / "home/.cache/more").write_text("x")
    assert safefs.fingerprint(data, EXCLUDES) == first
    assert safefs.fingerprint(data) != first
    os.chmod(data / "state/openclaw.json", 0o600)
    second = safefs.fingerprint(data, EXCLUDES)
    assert second != first
    (data / "state/memory/main.sqlite").write_bytes(os.urandom(64 * 1024))
    assert safefs.fingerprint(data, EXCLUDES) != second


# -- failures --------------------------------------------------------------------------------


def test_it_says_clearly_what_went_wrong_without_secrets(
    repo: restic.Repo, data: Path, tmp_path: Path
) -> None:
    wrong = restic.Repo(repo.location, "not-the-password-123")
    with pytest.raises(restic.ResticError) as caught:
        restic.snapshots(wrong)
    assert caught.value.kind == "password" and "password" in str(caught.value)
    assert "not-the-password-123" not in str(caught.value)

    empty = tmp_path / "empty-repo"
    empty.mkdir()
    for location in (str(empty), str(tmp_path / "no-such-repo")):
        with pytest.raises(restic.ResticError) as caught:
            restic.snapshots(restic.Repo(location, repo.password))
        assert caught.value.kind == "missing" and location in str(caught.value)
        assert not caught.value.corrupt

    argv = restic.command(repo, ["snapshots"])
    assert repo.password not in " ".join(argv)


def test_it_reports_a_full_disk(
    data: Path, tmp_path: Path, empty_repository: EmptyRepository
) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        repo = empty_repository.copy(small / "sbx-1-full")  # an initialised repository there
        (data / "state/workspace/big.bin").write_bytes(os.urandom(4 * 1024 * 1024))
        with pytest.raises(restic.ResticError) as caught:
            backup(repo, data)
        assert caught.value.kind == "no_space" and "out of space" in str(caught.value)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)


def test_a_run_over_the_timeout_is_stopped(repo: restic.Repo, data: Path, settings: Any) -> None:
    settings.HERMIT_BACKUP_TIMEOUT = 0.2  # less than restic needs to open the repository
    with pytest.raises(restic.ResticError) as caught:
        backup(repo, data)
    assert caught.value.kind == "timeout" and "did not finish within" in str(caught.value)
    assert processes_mentioning(repo.location) == []
    settings.HERMIT_BACKUP_TIMEOUT = 600
    assert backup(repo, data).files_new == 5


def test_a_restic_killed_mid_backup_leaves_a_lock_that_unlock_clears(
    repo: restic.Repo, data: Path
) -> None:
    first = backup(repo, data)
    (data / "state/workspace/new.bin").write_bytes(os.urandom(256 * 1024))
    locks = Path(repo.location) / "locks"
    seen: list[bool] = []

    @contextlib.contextmanager
    def kill_restic() -> Iterator[None]:
        # restic waits at the gate here, its repository opened and locked: kill it, as a
        # killed worker's restic dies with it.
        seen.append(any(locks.iterdir()))
        for pid in processes_mentioning(repo.location):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        yield

    with pytest.raises(restic.ResticError):
        backup(repo, data, pause=kill_restic, two_pass=False)
    assert seen == [True] and any(locks.iterdir())  # the killed run's lock stays behind

    with pytest.raises(restic.ResticError) as caught:
        restic.forget(repo, keep_last=1, keep_daily=0, keep_weekly=0)
    assert caught.value.kind == "locked" and "locked" in str(caught.value)
    restic.unlock(repo)
    assert not any(locks.iterdir())
    again = backup(repo, data)  # the next run completes; the earlier snapshot is intact
    assert again.files_new == 1
    assert [s.id for s in restic.snapshots(repo)] == [first.snapshot_id, again.snapshot_id]
    restic.check(repo)


def test_gate_dirs_of_dead_workers_are_swept(repo: restic.Repo, data: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    tmp = Path(tempfile.gettempdir())
    stale = tmp / f"{restic.GATE_PREFIX}{dead.pid}-killed"
    live = tmp / f"{restic.GATE_PREFIX}{os.getpid()}-busy"
    for path in (stale, live):
        path.mkdir()
        os.mkfifo(path / restic.GATE_NAME)
    try:
        backup(repo, data, pause=Pause(), two_pass=False)
        assert not stale.exists() and live.exists()
    finally:
        shutil.rmtree(live, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)


_CHILD = """
import sys, time
from pathlib import Path
from sandboxes.backups import restic

class Stuck:
    def write(self, data):
        print("writing", flush=True)
        time.sleep(3600)

repo = restic.Repo(sys.argv[1], sys.argv[2])
restic.dump_archive(repo, sys.argv[3], Stuck())
"""


def test_restic_dies_with_the_worker_that_started_it(repo: restic.Repo, data: Path) -> None:
    (data / "state/workspace/blob.bin").write_bytes(os.urandom(2 * 1024 * 1024))
    summary = backup(repo, data)
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "RESTIC_PASSWORD": ""}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, repo.location, repo.password, summary.snapshot_id],
        env=env,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"writing\n"  # restic is now blocked on its pipe
        confined = [p for p in processes_mentioning(repo.location) if p != child.pid]
        names = {Path(f"/proc/{p}/comm").read_text().strip() for p in confined}
        assert {"bwrap", "restic"} <= names
        child.kill()
        child.wait()
        assert wait_until(lambda: not any(alive(p) for p in confined), timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


# -- storage ---------------------------------------------------------------------------------


def test_local_storage_keeps_repositories_under_the_backup_dir(settings: Any) -> None:
    location = storage.location_for(7, "abc123")
    backup_dir = Path(settings.HERMIT_DATA_DIR) / "backups"
    assert location == str(backup_dir / "sbx-7-abc123")
    assert stat.S_IMODE(backup_dir.stat().st_mode) == 0o700
    assert storage.repo_env() == {}
    with pytest.raises(ValueError):
        storage.location_for(7, "../../etc")
    Path(location).mkdir()
    (Path(location) / "config").write_text("x")
    storage.delete_location(location)
    assert not Path(location).exists()
    storage.delete_location(location)  # already gone: fine
    with pytest.raises(storage.StorageError):
        storage.delete_location(str(Path(settings.HERMIT_DATA_DIR)))


def test_local_exports_are_root_files_only_the_folders_group_may_read(settings: Any) -> None:
    """Root's worker writes them; the portal, running as the folder's group (bin/web-user makes
    the folder root:<web user>, setgid), serves them; nobody else can read them."""
    store = storage.export_storage()
    name = store.save("sbx-7/export.tar", ContentFile(b"archive"))
    path = Path(store.path(name))
    folder = Path(settings.HERMIT_DATA_DIR) / "exports"
    assert path.read_bytes() == b"archive"
    assert path.is_relative_to(folder)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert path.stat().st_uid == 0 and path.stat().st_gid == folder.stat().st_gid
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o007 == 0  # nothing for others
    store.delete(name)


@pytest.fixture
def s3_repo(s3_backups: Any) -> Iterator[restic.Repo]:
    storage.ensure_bucket()
    location = storage.location_for(9, secrets.token_hex(6))
    repo = restic.Repo(location, secrets.token_urlsafe(24), storage.repo_env())
    yield repo
    storage.delete_location(location)


def test_s3_mode_creates_the_bucket_once(s3_backups: Any) -> None:
    client = s3_backups.client()
    assert s3_backups.bucket not in [b["Name"] for b in client.list_buckets()["Buckets"]]
    storage.ensure_bucket()
    storage.ensure_bucket()
    client.head_bucket(Bucket=s3_backups.bucket)
    env = storage.repo_env()
    assert env["AWS_ACCESS_KEY_ID"] == s3_backups.access_key
    assert env["AWS_SECRET_ACCESS_KEY"] == s3_backups.secret_key
    location = storage.location_for(9, "r4nd0m")
    assert location == f"s3:{s3_backups.endpoint}/{s3_backups.bucket}/hermit/sbx-9-r4nd0m"


def test_s3_repositories_back_up_restore_and_check(
    s3_backups: Any, s3_repo: restic.Repo, data: Path, tmp_path: Path
) -> None:
    restic.init(s3_repo)
    restic.init(s3_repo)
    first = backup(s3_repo, data)
    (data / "state/workspace/notes.md").write_text("second version")
    second = backup(s3_repo, data, parent=first.snapshot_id)
    assert second.files_changed == 1 and second.data_added < 64 * 1024
    target = fresh_target(tmp_path)
    restic.restore(s3_repo, second.snapshot_id, target)
    assert tree(target) == kept(data)
    restic.check(s3_repo, read_data=True)

    client = s3_backups.client()
    key = s3_repo.location.split(f"/{s3_backups.bucket}/", 1)[1]
    listed = client.list_objects_v2(Bucket=s3_backups.bucket, Prefix=f"{key}/")
    assert any(o["Key"].endswith("/config") for o in listed["Contents"])
    assert s3_repo.env["AWS_SECRET_ACCESS_KEY"] not in " ".join(
        restic.command(s3_repo, ["snapshots"])
    )


def test_s3_delete_location_removes_only_that_repository(
    s3_backups: Any, s3_repo: restic.Repo
) -> None:
    restic.init(s3_repo)
    other = restic.Repo(storage.location_for(10, "other"), "pw-other-1", storage.repo_env())
    restic.init(other)
    client = s3_backups.client()
    storage.delete_location(s3_repo.location)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_backups.bucket).get("Contents", [])]
    assert keys and all(k.startswith("hermit/sbx-10-other/") for k in keys)
    with pytest.raises(restic.ResticError) as caught:
        restic.snapshots(s3_repo)
    assert caught.value.kind == "missing"
    with pytest.raises(storage.StorageError):
        storage.delete_location(f"s3:{s3_backups.endpoint}/{s3_backups.bucket}/hermit")


def test_s3_exports_download_through_a_presigned_url(s3_backups: Any) -> None:
    storage.ensure_bucket()
    store = storage.export_storage()
    name = store.save("sbx-9/agent.tar", ContentFile(b"tar bytes"))
    url = store.url(name)
    assert url.startswith(f"{s3_backups.endpoint}/{s3_backups.bucket}/hermit/exports/")
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=3600" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"tar bytes"
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(url.split("?", 1)[0], timeout=10)
