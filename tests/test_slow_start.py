"""A slow start is judged by the CPU time the sandbox got, not by wall time alone.

A boot starved by a busy machine (little CPU, much wall time) goes on past the start timeout, up
to a hard cap of 5 x the timeout; one that burns its CPU budget without opening its port fails.
Tiny Node scripts stand in for the gateway (cheap, and their CPU use is known).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandboxes.backends.base import BackendError, SandboxSpec
from sandboxes.backends.local import LocalBackend
from sandboxes.openclaw.runtime import node_binary

LISTEN_LATE = (
    "setTimeout(() => require('http').createServer((q, s) => s.end('{}'))"
    ".listen(18789, '127.0.0.1'), 3000)"
)
BURN = "console.error('burning CPU, never listening'); for (;;) {}"


def spec_for(sandbox_root: Path, runtime_dir: Path, sandbox_id: int, script: str) -> SandboxSpec:
    data_dir = sandbox_root / f"data-{sandbox_id}"
    data_dir.mkdir()
    return SandboxSpec(
        sandbox_id=sandbox_id,
        name=f"sbx-{sandbox_id}",
        data_dir=data_dir,
        runtime_dir=runtime_dir,
        env={"HOME": str(data_dir)},
        memory_mb=256,
        cpu_millis=1000,
        pids_max=64,
        extra={"command": [str(node_binary(runtime_dir)), "-e", script], "ready_path": "/"},
    )


def backend_with(local_backend: LocalBackend, timeout: float, cpu: float) -> LocalBackend:
    """The session's backend (cgroups, run dirs, uids) with another start timeout (5 x it is
    the hard cap) and CPU budget."""
    return LocalBackend(
        run_root=local_backend.run_root,
        cgroup_parent=local_backend.cgroup_parent,
        uid_base=local_backend.uid_base,
        start_timeout=timeout,
        start_cpu_seconds=cpu,
    )


def run(progress: Iterator[Any]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for step in progress:
        state = step.state or state
    return state


def test_a_start_that_takes_long_but_uses_little_cpu_goes_on(
    local_backend: LocalBackend, sandbox_root: Path, runtime_dir: Path, sandbox_ids: Iterator[int]
) -> None:
    backend = backend_with(local_backend, timeout=1, cpu=5)
    spec = spec_for(sandbox_root, runtime_dir, next(sandbox_ids), LISTEN_LATE)
    started = time.monotonic()
    state = run(backend.start(spec))
    try:
        assert time.monotonic() - started > backend.start_timeout + 1
        assert backend.poll(spec, state).running
    finally:
        backend.stop(spec, state)


def test_a_start_that_burns_its_cpu_budget_without_listening_fails(
    local_backend: LocalBackend, sandbox_root: Path, runtime_dir: Path, sandbox_ids: Iterator[int]
) -> None:
    backend = backend_with(local_backend, timeout=10, cpu=1)
    spec = spec_for(sandbox_root, runtime_dir, next(sandbox_ids), BURN)
    started = time.monotonic()
    with pytest.raises(BackendError, match=r"did not open port 18789 after \d+ CPU-seconds"):
        run(backend.start(spec))
    assert time.monotonic() - started < 5 * backend.start_timeout, "it failed before the cap"
    assert not Path(backend.cgroup_root, "memory", backend.cgroup_parent, spec.name).exists()
