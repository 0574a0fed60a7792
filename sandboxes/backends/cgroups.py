"""Per-sandbox cgroups: create with limits, read usage and OOM kills, kill everything, remove.

Supports cgroup v1 (one directory per controller: memory, pids, cpu, cpuacct, freezer) and the
unified cgroup v2 hierarchy. A sandbox's cgroup is described by a plain dict (``CgroupPaths``:
controller name -> directory, ``{"unified": dir}`` on v2) that the backend persists, so any later
process can read or tear it down without knowing how it was made. The freezer (v1
``freezer.state``, v2 ``cgroup.freeze``) pauses a sandbox whole: for a crash-consistent backup,
or a doze.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

CgroupPaths = dict[str, str]
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "freezer")
CPU_PERIOD_US = 100_000


class CgroupError(Exception):
    """Cgroups are missing or cannot be written; the message names the file."""


def detect_version(root: Path) -> int:
    """Return 2 if ``root`` is a cgroup v2 (unified) mount, 1 if it holds v1 controllers."""
    if (root / "cgroup.controllers").exists():
        return 2
    if (root / "memory" / "memory.limit_in_bytes").exists():
        return 1
    raise CgroupError(f"no usable cgroup hierarchy under {root} (need v1 memory or v2)")


def create(
    root: Path, parent: str, name: str, memory_mb: int, cpu_millis: int, pids_max: int
) -> CgroupPaths:
    """Create the sandbox's cgroup(s) under ``root/<controller>/<parent>/<name>`` with limits.

    A limit of 0 or less means "no limit". An existing cgroup of the same name is reused.
    """
    if detect_version(root) == 2:
        return _create_v2(root, parent, name, memory_mb, cpu_millis, pids_max)
    paths: CgroupPaths = {}
    for ctrl in V1_CONTROLLERS:
        if not (root / ctrl).is_dir():
            continue
        path = root / ctrl / parent / name
        path.mkdir(parents=True, exist_ok=True)
        paths[ctrl] = str(path)
    mem = Path(paths["memory"])
    limit = str(memory_mb * 1024 * 1024) if memory_mb > 0 else "-1"
    _write(mem / "memory.limit_in_bytes", limit)
    if (mem / "memory.memsw.limit_in_bytes").exists():
        _write(mem / "memory.memsw.limit_in_bytes", limit)
    if "pids" in paths:
        _write(Path(paths["pids"]) / "pids.max", str(pids_max) if pids_max > 0 else "max")
    if "cpu" in paths:
        quota = str(cpu_millis * CPU_PERIOD_US // 1000) if cpu_millis > 0 else "-1"
        _write(Path(paths["cpu"]) / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        _write(Path(paths["cpu"]) / "cpu.cfs_quota_us", quota)
    return paths


def _create_v2(
    root: Path, parent: str, name: str, memory_mb: int, cpu_millis: int, pids_max: int
) -> CgroupPaths:
    parent_dir = root / parent
    parent_dir.mkdir(exist_ok=True)
    wanted = {"memory", "pids", "cpu"} & set((root / "cgroup.controllers").read_text().split())
    for directory in (root, parent_dir):
        enabled = set((directory / "cgroup.subtree_control").read_text().split())
        for ctrl in sorted(wanted - enabled):
            _write(directory / "cgroup.subtree_control", f"+{ctrl}")
    path = parent_dir / name
    path.mkdir(exist_ok=True)
    _write(path / "memory.max", str(memory_mb * 1024 * 1024) if memory_mb > 0 else "max")
    if (path / "memory.swap.max").exists():
        _write(path / "memory.swap.max", "0")
    _write(path / "pids.max", str(pids_max) if pids_max > 0 else "max")
    quota = str(cpu_millis * CPU_PERIOD_US // 1000) if cpu_millis > 0 else "max"
    _write(path / "cpu.max", f"{quota} {CPU_PERIOD_US}")
    return {"unified": str(path)}


def procs_files(paths: CgroupPaths) -> list[str]:
    """Return the cgroup.procs files a new process must write its pid into to join."""
    return [str(Path(p) / "cgroup.procs") for p in paths.values()]


def pids(paths: CgroupPaths) -> list[int]:
    """Return the host pids of every process in the sandbox's cgroup (empty if it is gone)."""
    path = Path(paths.get("unified") or paths.get("memory") or next(iter(paths.values()), ""))
    try:
        text = (path / "cgroup.procs").read_text()
    except OSError:
        return []
    return [int(line) for line in text.split()]


def memory_usage(paths: CgroupPaths) -> tuple[int, int]:
    """Return (working-set bytes, limit bytes). Working set excludes inactive page cache."""
    if "unified" in paths:
        path = Path(paths["unified"])
        usage = _read_int(path / "memory.current")
        limit_text = _read(path / "memory.max").strip()
        limit = 0 if limit_text in ("", "max") else int(limit_text)
        inactive = _stat_value(path / "memory.stat", "inactive_file")
    else:
        path = Path(paths["memory"])
        usage = _read_int(path / "memory.usage_in_bytes")
        limit = _read_int(path / "memory.limit_in_bytes")
        inactive = _stat_value(path / "memory.stat", "total_inactive_file")
    return max(usage - inactive, 0), limit


def rss_bytes(paths: CgroupPaths) -> int:
    """Return the cgroup's anonymous + shmem memory (its RSS, without page cache)."""
    if "unified" in paths:
        stat = Path(paths["unified"]) / "memory.stat"
        return _stat_value(stat, "anon") + _stat_value(stat, "shmem")
    stat = Path(paths["memory"]) / "memory.stat"
    return _stat_value(stat, "total_rss") + _stat_value(stat, "total_shmem")


def cpu_seconds(paths: CgroupPaths) -> float:
    """Return the CPU time all processes of the cgroup have used, in seconds."""
    if "unified" in paths:
        return _stat_value(Path(paths["unified"]) / "cpu.stat", "usage_usec") / 1e6
    if "cpuacct" in paths:
        return _read_int(Path(paths["cpuacct"]) / "cpuacct.usage") / 1e9
    return 0.0


def oom_kills(paths: CgroupPaths) -> int:
    """Return how many processes the kernel OOM-killed in this cgroup since it was created."""
    if "unified" in paths:
        return _stat_value(Path(paths["unified"]) / "memory.events", "oom_kill")
    return _stat_value(Path(paths["memory"]) / "memory.oom_control", "oom_kill")


def kill_all(paths: CgroupPaths, timeout: float = 5.0) -> None:
    """SIGKILL every process in the cgroup until it is empty (or ``timeout`` passes).

    On v1 the freezer stops a fork loop from outrunning the kill; v2 has ``cgroup.kill``.
    """
    if "unified" in paths and (Path(paths["unified"]) / "cgroup.kill").exists():
        _write_quiet(Path(paths["unified"]) / "cgroup.kill", "1")
    freezer = Path(paths["freezer"]) / "freezer.state" if "freezer" in paths else None
    deadline = time.monotonic() + timeout
    while True:
        members = pids(paths)
        if not members or time.monotonic() > deadline:
            break
        if freezer:
            _write_quiet(freezer, "FROZEN")
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if freezer:
            _write_quiet(freezer, "THAWED")
        time.sleep(0.05)


def freeze(paths: CgroupPaths, timeout: float = 5.0) -> None:
    """Freeze every process of the cgroup; return once the kernel reports it frozen.

    v1: ``freezer.state`` goes FREEZING -> FROZEN; v2: ``cgroup.freeze`` = 1 until
    ``cgroup.events`` says ``frozen 1``. A process the kernel cannot stop at once (say in an
    uninterruptible wait) delays it; after ``timeout`` seconds the cgroup is thawed again and
    CgroupError raised, so a failed freeze never leaves a sandbox stopped.
    """
    if "unified" in paths:
        control, value = Path(paths["unified"]) / "cgroup.freeze", "1"
    elif "freezer" in paths:
        control, value = Path(paths["freezer"]) / "freezer.state", "FROZEN"
    else:
        raise CgroupError("this cgroup has no freezer (v1 freezer controller or v2 cgroup.freeze)")
    _write(control, value)
    deadline = time.monotonic() + timeout
    pause = 0.0005
    while not is_frozen(paths):
        if time.monotonic() > deadline:
            thaw(paths)
            raise CgroupError(f"{control.parent} did not freeze within {timeout:.0f} s")
        time.sleep(pause)
        pause = min(pause * 2, 0.02)
        if value == "FROZEN":
            _write_quiet(control, value)  # v1 retries the tasks it could not stop yet


def thaw(paths: CgroupPaths) -> None:
    """Let the cgroup's processes run again. Idempotent; a cgroup that is gone is fine."""
    if "unified" in paths:
        control, value = Path(paths["unified"]) / "cgroup.freeze", "0"
    elif "freezer" in paths:
        control, value = Path(paths["freezer"]) / "freezer.state", "THAWED"
    else:
        return
    if control.parent.is_dir():
        _write(control, value)


def is_frozen(paths: CgroupPaths) -> bool:
    """Whether the kernel reports the cgroup frozen (FREEZING counts as not yet)."""
    if "unified" in paths:
        return _stat_value(Path(paths["unified"]) / "cgroup.events", "frozen") == 1
    if "freezer" in paths:
        return _read(Path(paths["freezer"]) / "freezer.state").strip() == "FROZEN"
    return False


def remove(paths: CgroupPaths, timeout: float = 5.0) -> None:
    """Remove the cgroup directories (after ``kill_all``). Missing directories are fine."""
    deadline = time.monotonic() + timeout
    for path in paths.values():
        while True:
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError:
                # EBUSY while the last killed task is still being reaped.
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror}") from exc


def _write_quiet(path: Path, value: str) -> None:
    with contextlib.suppress(OSError):
        path.write_text(value)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _read_int(path: Path) -> int:
    text = _read(path).strip()
    return int(text) if text.isdigit() else 0


def _stat_value(path: Path, key: str) -> int:
    for line in _read(path).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key and parts[1].isdigit():
            return int(parts[1])
    return 0
