"""The cgroup freezer: ``cgroups.freeze`` / ``thaw`` on v1 and v2, and ``backend.frozen``
pausing a real OpenClaw gateway in its real sandbox (what a crash-consistent backup and a doze
rely on)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandboxes.backends import cgroups
from sandboxes.backends.base import SandboxBackend
from tests.fixtures.backups import EmptyRepository

CGROUP_ROOT = Path("/sys/fs/cgroup")
POOLED = "alice@chat.test"  # pooled for other suites too: no gateway start of its own
# Count into a file 100 times a second: a frozen process stops counting.
_COUNTER = 'i=0; while :; do i=$((i+1)); echo $i > "$1.tmp"; mv "$1.tmp" "$1"; sleep 0.01; done'


def v2_root() -> Path:
    """The unified hierarchy: the cgroup root itself, or its hybrid mount beside v1."""
    return CGROUP_ROOT if (CGROUP_ROOT / "cgroup.controllers").exists() else CGROUP_ROOT / "unified"


@contextlib.contextmanager
def counting_process(paths: cgroups.CgroupPaths, counter: Path) -> Iterator[int]:
    join = " ".join(cgroups.procs_files(paths))
    proc = subprocess.Popen(
        [
            "sh",
            "-c",
            f'for f in {join}; do echo $$ > "$f"; done; exec sh -c \'{_COUNTER}\' c "$0"',
            str(counter),
        ],
    )
    try:
        assert wait_for(counter.exists)
        yield proc.pid
    finally:
        cgroups.thaw(paths)
        cgroups.kill_all(paths)
        proc.wait(10)
        cgroups.remove(paths)


def wait_for(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def count(counter: Path) -> int:
    return int(counter.read_text())


def assert_freezes(paths: cgroups.CgroupPaths, counter: Path) -> None:
    cgroups.freeze(paths)
    assert cgroups.is_frozen(paths)
    frozen_at = count(counter)
    time.sleep(0.3)
    assert count(counter) == frozen_at
    cgroups.freeze(paths)  # again: already frozen, fine
    cgroups.thaw(paths)
    assert not cgroups.is_frozen(paths)
    assert wait_for(lambda: count(counter) > frozen_at + 3)
    cgroups.thaw(paths)  # again: fine


def test_it_freezes_and_thaws_a_cgroup(settings: Any, tmp_path: Path) -> None:
    paths = cgroups.create(
        CGROUP_ROOT, settings.HERMIT_CGROUP_PARENT, f"freeze-{uuid.uuid4().hex[:8]}", 64, 0, 0
    )
    with counting_process(paths, tmp_path / "count"):
        assert_freezes(paths, tmp_path / "count")


def test_it_freezes_and_thaws_a_v2_cgroup(settings: Any, tmp_path: Path) -> None:
    path = v2_root() / settings.HERMIT_CGROUP_PARENT / f"freeze-v2-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    paths = {"unified": str(path)}
    try:
        with counting_process(paths, tmp_path / "count"):
            assert (path / "cgroup.freeze").exists()
            assert_freezes(paths, tmp_path / "count")
    finally:
        with contextlib.suppress(OSError):
            path.parent.rmdir()


def test_thawing_a_cgroup_that_is_gone_is_fine(tmp_path: Path) -> None:
    cgroups.thaw({"freezer": str(tmp_path / "gone")})
    cgroups.thaw({"unified": str(tmp_path / "gone")})
    with pytest.raises(cgroups.CgroupError, match="no freezer"):
        cgroups.freeze({"memory": str(tmp_path)})


def healthz(port: int, timeout: float) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as response:
        return int(response.status)


def test_frozen_pauses_a_running_gateway_and_always_thaws_it(sandbox_for: Any) -> None:
    from sandboxes import actions
    from sandboxes.backends import get_backend

    sandbox = sandbox_for(POOLED)
    backend = get_backend(sandbox.backend)
    spec, state = actions.spec_for(sandbox), sandbox.backend_state
    _host, port = backend.endpoint(spec, state)
    assert healthz(port, 5) == 200

    started = time.monotonic()
    with backend.frozen(spec, state):
        freeze_s = time.monotonic() - started
        assert cgroups.is_frozen(state["cgroups"])
        main = state["main"][0]
        assert Path(f"/proc/{main}/stat").read_text().rsplit(")", 1)[1].split()[0] in "DS"
        with pytest.raises((TimeoutError, urllib.error.URLError)):
            healthz(port, 0.5)
        thaw_started = time.monotonic()
    thaw_s = time.monotonic() - thaw_started
    assert not cgroups.is_frozen(state["cgroups"])
    assert healthz(port, 5) == 200
    print(f"\nfreeze {freeze_s * 1000:.1f} ms, thaw {thaw_s * 1000:.1f} ms")
    assert freeze_s < 1.0 and thaw_s < 1.0

    with pytest.raises(RuntimeError, match="inside"), backend.frozen(spec, state):
        raise RuntimeError("failed inside the pause")
    assert not cgroups.is_frozen(state["cgroups"])
    assert healthz(port, 5) == 200
    assert backend.poll(spec, state).running

    cgroups.freeze(state["cgroups"])  # dozing: a backup in between leaves it frozen
    try:
        with backend.frozen(spec, state):
            assert cgroups.is_frozen(state["cgroups"])
        assert cgroups.is_frozen(state["cgroups"])
    finally:
        cgroups.thaw(state["cgroups"])
    assert healthz(port, 5) == 200


def test_frozen_leaves_a_sandbox_that_is_not_running_alone(settings: Any) -> None:
    from sandboxes.backends.base import SandboxSpec
    from sandboxes.backends.local import LocalBackend

    backend = LocalBackend()
    spec = SandboxSpec(
        sandbox_id=999_999,
        name="sbx-not-running",
        data_dir=Path(settings.HERMIT_DATA_DIR),
        runtime_dir=Path(settings.HERMIT_RUNTIME_DIR),
        env={},
        memory_mb=64,
        cpu_millis=100,
    )
    ran = []
    for state in ({}, {"cgroups": backend._cgroup_paths(spec), "main": [os.getpid(), -5]}):
        with backend.frozen(spec, state):
            ran.append(state)
    assert len(ran) == 2
    with pytest.raises(NotImplementedError, match="cannot pause"):
        SandboxBackend.frozen(backend, spec, {})


def test_a_backup_of_a_running_gateway_pauses_it_only_while_restic_reads(
    sandbox_for: Any, tmp_path: Path, empty_repository: EmptyRepository
) -> None:
    import secrets

    from sandboxes import actions
    from sandboxes.backends import get_backend
    from sandboxes.backups import EXCLUDES, restic

    sandbox = sandbox_for(POOLED)
    backend = get_backend(sandbox.backend)
    spec, state = actions.spec_for(sandbox), sandbox.backend_state
    repo = empty_repository.copy(tmp_path / "repo")  # initialised, empty
    note = f"written by the agent {secrets.token_hex(8)}"
    wrote = backend.exec(spec, state, ["sh", "-c", f"echo '{note}' > state/freeze-note.md"])
    assert wrote.exit_code == 0, wrote.stderr
    frozen_seen = []

    def pause() -> Any:
        frozen_seen.append(True)
        return backend.frozen(spec, state)

    summary = restic.backup(
        repo, spec.data_dir, tags=["test"], host=spec.name, excludes=EXCLUDES, pause=pause
    )
    print(f"\npaused {summary.pause_seconds * 1000:.1f} ms of a {summary.seconds:.2f} s backup")
    assert frozen_seen == [True] and summary.pause_seconds < 1.0
    assert not cgroups.is_frozen(state["cgroups"]) and healthz(backend.endpoint(spec, state)[1], 5)
    out = tmp_path / "out"
    out.mkdir()
    restic.restore(repo, summary.snapshot_id, out)
    assert (out / "state/freeze-note.md").read_text() == f"{note}\n"
