"""Backups on a 100 MB workspace: full, incremental, restore, and the freeze pause.

Builds a sandbox-like data dir whose workspace holds ``--size-mb`` of realistic files (about
60 % incompressible media and archives, 40 % text: notes, code, JSON), then, ``--runs`` times
on a fresh repository each, with the engine the portal uses (restic confined in bubblewrap,
``sandboxes.backups.restic``), prints the median of:

* a full backup;
* an incremental backup after one 10 KB change (a note appended to a journal): its time and the
  bytes it added to the repository;
* a restore into a fresh directory, verified;
* the freeze pause of a backup of a running sandbox: one real OpenClaw gateway started through
  the local backend (bubblewrap + pasta + cgroups) on the same workspace, paused with
  ``backend.frozen`` while restic reads (restic's own start, ~0.7 s of key derivation and lock
  checks, comes before the pause). Measured for a first (full) and an incremental backup, in
  one paused pass (which reads all that changed since the parent snapshot) and in the default
  two-pass mode (an unpaused first pass, then a paused pass that re-reads only what changed
  meanwhile). The pause includes freezing and thawing;
* how many restic processes an incremental backup starts as the portal takes it (the backup,
  then the free plan's retention, as ``sandboxes.backups.actions`` applies it), of a stopped
  sandbox and of a running one (two-pass): each costs ~0.5 s of key derivation.

Needs root. Everything lies in a scratch dir under the settings' data dir (sandbox uids can enter
it wherever the checkout is). Ends with one ``RESULT key=value ...`` line. Targets: incremental
adds under 1 MB, restore under 3 s, pause under 1 s.

    DEBUG=True .venv/bin/python bench/backup.py [--runs 3] [--size-mb 100]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import shutil
import statistics
import string
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

import django  # noqa: E402
from django.conf import settings  # noqa: E402

django.setup()

from sandboxes.backends import cgroups, safefs  # noqa: E402
from sandboxes.backends.base import SandboxSpec  # noqa: E402
from sandboxes.backends.local import LocalBackend  # noqa: E402
from sandboxes.backups import EXCLUDES, restic  # noqa: E402
from sandboxes.backups.actions import PRE_RESTORE_KEEP, PRE_RESTORE_TAG  # noqa: E402
from sandboxes.openclaw.config import (  # noqa: E402
    CONFIG_PATH,
    prepare_data_dir,
    render_config,
    sandbox_env,
)
from sandboxes.openclaw.runtime import build_runtime  # noqa: E402

CGROUP_PARENT = f"hermit-bench-{os.getpid()}"
MB = 1024 * 1024
JOURNAL = "state/workspace/notes/journal.md"
BENCH_UID = 870_000  # owner of the scratch data dir, as a sandbox's uid would be


# -- the workspace ---------------------------------------------------------------------------


class Writer:
    """Deterministic, realistic file contents: words, code and JSON for text; random bytes for
    media (already compressed formats look random to restic)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        letters = string.ascii_lowercase
        self.words = [
            "".join(self.rng.choices(letters, k=self.rng.randint(2, 10))) for _ in range(5000)
        ]

    def prose(self, size: int) -> str:
        out: list[str] = []
        length = 0
        while length < size:
            line = " ".join(self.rng.choices(self.words, k=self.rng.randint(6, 18))) + ".\n"
            out.append(line)
            length += len(line)
        return "".join(out)[:size]

    def code(self, size: int) -> str:
        out: list[str] = []
        length = 0
        while length < size:
            name, arg = self.rng.choice(self.words), self.rng.choice(self.words)
            block = (
                f"def {name}_{self.rng.randint(0, 999)}({arg}, limit={self.rng.randint(1, 99)}):\n"
                f'    """{self.prose(60).strip()}"""\n'
                f"    return [{arg} * i for i in range(limit) if i % {self.rng.randint(2, 9)}]\n\n"
            )
            out.append(block)
            length += len(block)
        return "".join(out)[:size]

    def json(self, size: int) -> str:
        items = []
        length = 0
        while length < size:
            item = {
                "id": self.rng.randint(0, 10**9),
                "title": self.prose(40).strip(),
                "tags": self.rng.sample(self.words, 3),
            }
            items.append(item)
            length += 90
        return json.dumps(items, indent=1)


def make_workspace(data_dir: Path, size_mb: int, seed: int = 9) -> int:
    """Fill ``data_dir`` (a sandbox data dir) with about ``size_mb`` MB; return the bytes."""
    writer = Writer(seed)
    rng = writer.rng
    workspace = data_dir / "state" / "workspace"
    total, target = 0, size_mb * MB
    media_target = int(target * 0.6)
    for sub in ("media", "notes", "code", "data"):
        (workspace / sub).mkdir(parents=True, exist_ok=True)
    n = 0
    while total < media_target:
        size = min(rng.randint(200 * 1024, 4 * MB), media_target - total)
        ext = rng.choice(["jpg", "png", "pdf", "zip", "mp3"])
        (workspace / "media" / f"file-{n:03}.{ext}").write_bytes(os.urandom(size))
        total += size
        n += 1
    (data_dir / JOURNAL).write_text(writer.prose(48 * 1024))
    total += 48 * 1024
    kinds = [
        ("notes", "md", writer.prose),
        ("code", "py", writer.code),
        ("data", "json", writer.json),
    ]
    while total < target:
        sub, ext, make = rng.choice(kinds)
        text = make(min(rng.randint(2 * 1024, 200 * 1024), target - total))
        (workspace / sub / f"{sub}-{n:04}.{ext}").write_text(text)
        total += len(text)
        n += 1
    # An embeddings index, and caches as a gateway leaves them (the caches are excluded). No
    # fake files where OpenClaw keeps its own databases: it refuses to start on them.
    (workspace / "data" / "embeddings.bin").write_bytes(os.urandom(2 * MB))
    (data_dir / "cache" / "node-compile-cache").mkdir(parents=True, exist_ok=True)
    (data_dir / "cache" / "node-compile-cache" / "blob").write_bytes(os.urandom(8 * MB))
    return total


def ten_kb_note(seed: int) -> str:
    return Writer(seed).prose(10 * 1024)


# -- measurements ----------------------------------------------------------------------------


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    started = time.monotonic()
    result = fn(*args, **kwargs)
    return time.monotonic() - started, result


class ResticRuns:
    """Counts the restic processes started (``restic._run`` calls) while it is entered."""

    def __init__(self) -> None:
        self.count = 0

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        original = restic._run

        def counted(*args: Any, **kwargs: Any) -> str:
            self.count += 1
            return original(*args, **kwargs)

        restic._run = counted
        try:
            yield
        finally:
            restic._run = original


def portal_backup(repo: restic.Repo, data_dir: Path, **kwargs: Any) -> tuple[Any, int]:
    """Back up as the portal does (``actions._backup``): the backup, then the free plan's
    retention (keep one a day for 7 days, the latest pre-restore snapshots kept) from the
    snapshots the backup listed. Return the summary and the restic processes it took."""
    runs = ResticRuns()
    with runs.counting():
        summary = backup(repo, data_dir, **kwargs)
        listed = list(summary.listed) or None
        removed = restic.forget(
            repo, keep_last=PRE_RESTORE_KEEP, keep_daily=0, keep_weekly=0,
            tags=[PRE_RESTORE_TAG], prune=False, listed=listed,
        )  # fmt: skip
        if listed is not None:
            listed = [s for s in listed if s.id not in removed]
        restic.forget(
            repo, keep_last=0, keep_daily=7, keep_weekly=0, keep_tags=[PRE_RESTORE_TAG],
            listed=listed,
        )  # fmt: skip
    return summary, runs.count


def new_repo(root: Path, name: str) -> restic.Repo:
    repo = restic.Repo(str(root / name), secrets.token_urlsafe(24))
    restic.init(repo)
    return repo


def backup(repo: restic.Repo, data_dir: Path, **kwargs: Any) -> restic.BackupSummary:
    return restic.backup(repo, data_dir, tags=["bench"], host="bench", excludes=EXCLUDES, **kwargs)


def engine_run(scratch: Path, data_dir: Path, run: int) -> dict[str, float]:
    """Full backup, incremental after a 10 KB change, restore; on a stopped data dir."""
    repo = new_repo(scratch / "repos", f"engine-{run}")
    full_s, full = timed(backup, repo, data_dir)
    with (data_dir / JOURNAL).open("a") as journal:  # the bench's own dir, not a sandbox's
        journal.write(ten_kb_note(1000 + run))
    incr_s, incr = timed(backup, repo, data_dir, parent=full.snapshot_id)
    target = scratch / f"restore-{run}"
    target.mkdir(mode=0o700)
    restore_s, _ = timed(restic.restore, repo, incr.snapshot_id, target)
    restored = safefs.disk_usage(target)
    shutil.rmtree(target)
    with (data_dir / JOURNAL).open("a") as journal:
        journal.write(ten_kb_note(1500 + run))
    # The retention keeps one a day: it forgets the two before, as it would on a first day.
    portal_s, (_, runs) = timed(portal_backup, repo, data_dir, parent=incr.snapshot_id)
    shutil.rmtree(repo.location)
    row = {
        "full_backup_s": full_s,
        "incr_backup_s": incr_s,
        "incr_added_kb": incr.data_added / 1024,
        "restore_s": restore_s,
        "restic_runs_stopped": runs,
        "portal_incr_s": portal_s,
    }
    print(
        f"  run {run + 1}: full {full_s:.2f}s ({full.total_bytes / MB:.0f} MB, "
        f"{full.data_added / MB:.1f} MB stored) | incremental {incr_s:.2f}s, "
        f"{incr.files_changed} file changed, +{incr.data_added / 1024:.0f} KB, "
        f"with retention {portal_s:.2f}s in {runs} restic runs | "
        f"restore {restore_s:.2f}s ({restored / MB:.0f} MB on disk)",
        flush=True,
    )
    return row


@contextlib.contextmanager
def running_sandbox(scratch: Path, size_mb: int) -> Iterator[tuple[LocalBackend, SandboxSpec, Any]]:
    runtime = build_runtime(
        settings.HERMIT_RUNTIME_DIR, settings.HERMIT_OPENCLAW_VERSION, settings.HERMIT_NODE_VERSION
    )
    data_dir = scratch / "sandbox"
    prepare_data_dir(data_dir)
    make_workspace(data_dir, size_mb)
    config = json.dumps(render_config(data_dir=data_dir, ai_gateway_port=9, models=["bench"]))
    env = sandbox_env(
        data_dir=data_dir, gateway_token="bench", ai_key="bench", config_file=CONFIG_PATH
    )
    backend = LocalBackend(run_root=scratch / "run", cgroup_parent=CGROUP_PARENT)
    spec = SandboxSpec(
        sandbox_id=870_001,
        name="bench-backup",
        data_dir=data_dir,
        runtime_dir=runtime,
        env=env,
        memory_mb=2048,
        cpu_millis=0,
        ai_gateway_port=9,
        files={CONFIG_PATH: config},
    )
    state: dict[str, Any] = {}
    started = time.monotonic()
    for progress in backend.start(spec):
        state = progress.state or state
    print(f"  sandbox running after {time.monotonic() - started:.1f}s", flush=True)
    try:
        yield backend, spec, state
    finally:
        backend.stop(spec, state)


def pause_run(
    scratch: Path, backend: LocalBackend, spec: SandboxSpec, state: Any, run: int
) -> dict[str, float]:
    """Back up the running sandbox (first, then after a 10 KB change), single and two-pass."""
    row: dict[str, float] = {}
    for mode, two_pass in (("single", False), ("two", True)):
        repo = new_repo(scratch / "repos", f"pause-{mode}-{run}")
        kwargs = {"pause": lambda: backend.frozen(spec, state), "two_pass": two_pass}
        full = backup(repo, spec.data_dir, **kwargs)
        note = ten_kb_note(2000 + 10 * run + two_pass)
        result = backend.exec(spec, state, ["sh", "-c", f"printf '%s' '{note}' >> {JOURNAL}"])
        assert result.exit_code == 0, result.stderr
        incr, runs = portal_backup(repo, spec.data_dir, parent=full.snapshot_id, **kwargs)
        assert incr.files_changed >= 1, incr
        assert backend.poll(spec, state).running and not cgroups.is_frozen(state["cgroups"])
        shutil.rmtree(repo.location)
        row[f"pause_full_{mode}_ms"] = full.pause_seconds * 1000
        row[f"pause_incr_{mode}_ms"] = incr.pause_seconds * 1000
        row[f"backup_full_{mode}_s"] = full.seconds
        row[f"backup_incr_{mode}_s"] = incr.seconds
        row[f"restic_runs_{mode}"] = runs
        print(
            f"  run {run + 1} {mode:6} pass: first backup paused {full.pause_seconds * 1000:.0f} "
            f"ms of {full.seconds:.2f}s | incremental paused {incr.pause_seconds * 1000:.0f} ms "
            f"of {incr.seconds:.2f}s",
            flush=True,
        )
    return row


def median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size-mb", type=int, default=100)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench-backup-", dir=settings.HERMIT_DATA_DIR))
    os.chmod(scratch, 0o711)  # the sandbox's uid traverses it
    try:
        data_dir = scratch / "data"
        prepare_data_dir(data_dir)
        size = make_workspace(data_dir, args.size_mb)
        safefs.chown_tree(data_dir, BENCH_UID, BENCH_UID, root_mode=0o700)
        print(f"workspace: {size / MB:.0f} MB in {sum(1 for _ in data_dir.rglob('*'))} entries")
        print("backup and restore of a stopped sandbox's data dir:")
        engine = [engine_run(scratch, data_dir, run) for run in range(args.runs)]
        print("freeze pause while backing up a running sandbox:")
        with running_sandbox(scratch, args.size_mb) as (backend, spec, state):
            pauses = [pause_run(scratch, backend, spec, state, run) for run in range(args.runs)]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        for ctrl in cgroups.V1_CONTROLLERS:
            path = Path("/sys/fs/cgroup", ctrl, CGROUP_PARENT)
            if path.is_dir():
                os.rmdir(path)
    report(engine, pauses, args.runs)


def report(engine: list[dict[str, float]], pauses: list[dict[str, float]], runs: int) -> None:
    full, incr = median(engine, "full_backup_s"), median(engine, "incr_backup_s")
    added, restore = median(engine, "incr_added_kb"), median(engine, "restore_s")
    print(f"\nmedians over {runs} runs, each on a fresh repository:")
    print(f"  full backup          {full:6.2f} s")
    print(f"  incremental (10 KB)  {incr:6.2f} s, {added:.0f} KB added   (target < 1024 KB)")
    print(f"  restore + verify     {restore:6.2f} s                 (target < 3 s)")
    runs_stopped, runs_running = (
        median(engine, "restic_runs_stopped"),
        median(pauses, "restic_runs_two"),
    )
    print(
        f"  incremental with retention, as the portal takes it: "
        f"{median(engine, 'portal_incr_s'):.2f} s; restic runs {runs_stopped:.0f} stopped,"
        f" {runs_running:.0f} running (two-pass)"
    )
    print("  freeze pause of a running sandbox (target < 1000 ms):")
    print(f"    {'':12} {'first backup':>14} {'incremental':>12}")
    for mode, label in (("single", "single pass"), ("two", "two-pass")):
        first, later = (
            median(pauses, f"pause_full_{mode}_ms"),
            median(pauses, f"pause_incr_{mode}_ms"),
        )
        print(f"    {label:12} {first:11.0f} ms {later:9.0f} ms")
    two_first, two_incr = median(pauses, "pause_full_two_ms"), median(pauses, "pause_incr_two_ms")
    result = {
        "full_backup_s": f"{full:.2f}",
        "incr_backup_s": f"{incr:.2f}",
        "incr_added_kb": f"{added:.0f}",
        "restore_s": f"{restore:.2f}",
        "freeze_pause_ms": f"{max(two_first, two_incr):.0f}",
        "pause_full_two_pass_ms": f"{two_first:.0f}",
        "pause_incr_two_pass_ms": f"{two_incr:.0f}",
        "pause_full_single_pass_ms": f"{median(pauses, 'pause_full_single_ms'):.0f}",
        "pause_incr_single_pass_ms": f"{median(pauses, 'pause_incr_single_ms'):.0f}",
        "portal_incr_backup_s": f"{median(engine, 'portal_incr_s'):.2f}",
        "restic_runs_stopped": f"{runs_stopped:.0f}",
        "restic_runs_running": f"{runs_running:.0f}",
    }
    print(
        "\nfreeze_pause_ms = the longer of the default (two-pass) mode's first and incremental"
        " pauses: what a user of a running agent may notice."
    )
    print("\nRESULT " + " ".join(f"{k}={v}" for k, v in result.items()), flush=True)


if __name__ == "__main__":
    main()
