"""An in-memory backend for the portal's own tests (JupyterHub's MockSpawner pattern).

No gateway runs: a "sandbox" is an entry in a process-wide table (shared by every FakeBackend
object, so a fresh one re-attaches from the persisted state as the real backends do), and the
portal's logic (states, sleep stages, checkpoints, queues, races between workers) is tested in
milliseconds. It passes the contract suite (tests/test_backend_contract.py): ``start`` yields
progress and ends with the state to persist, ``stop`` and ``drop_checkpoint`` are idempotent, a
frozen sandbox stays frozen until thawed, a checkpoint stops the sandbox and restores only onto
the same data identity. Its volumes are real directories, where the local backend keeps its own
(``<HERMIT_DATA_DIR>/sandboxes/<id>``, see ``volumes``), so backups and restores of a fake
sandbox move real data. ``exec`` runs its command for real, as a host process of this user in
the data dir (when it exists), so exit codes, output and timeouts are real; ``stats`` walks the
data dir for ``disk_bytes``; ``write_files`` replaces the read-only files a sandbox was started
with (:meth:`FakeBackend.files` shows them).

Test hooks: :meth:`FakeBackend.fail_next` makes the next start, checkpoint or restore of a
sandbox raise BackendError; :meth:`FakeBackend.crash` makes a running sandbox's "gateway" die;
:meth:`FakeBackend.replace_data` changes a sandbox's data identity (as a restore from a backup
does); :meth:`FakeBackend.use` makes a sandbox use CPU and hold memory, as ``stats`` reports
them: its CPU counter is cumulative since its start or restore (a new cgroup) and stands still
while it is frozen, as a cgroup's does; :meth:`FakeBackend.write_log` adds lines to the output
``logs`` returns (kept across starts, as the local backend's gateway.log is);
:meth:`FakeBackend.serve` makes a sandbox's endpoint a real local server (a stand-in for its
gateway's HTTP API): the port goes into the state each later start or restore persists, so a
worker process (with its own table) finds it too. Without it the endpoint is port 9 (discard).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sandboxes.backends import volumes
from sandboxes.backends.base import (
    BackendError,
    CheckpointImage,
    ExecResult,
    PollResult,
    ProcessInfo,
    Progress,
    SandboxBackend,
    SandboxSpec,
    Stats,
    sandbox_id_of,
    sandbox_name,
)
from sandboxes.backends.safefs import disk_usage

MEMORY_BYTES = 900 * 2**20  # about what a real OpenClaw gateway holds
IMAGE_BYTES = 1000 * 2**20


@dataclass
class _Box:
    running: bool = False
    frozen: bool = False
    instance: int = 0
    identity: int = 0
    cpu_seconds: float = 0.0
    memory_bytes: int = MEMORY_BYTES
    log: list[str] = field(default_factory=list)
    port: int = 0  # a stand-in gateway's port (serve), 0 for none
    files: dict[str, str] = field(default_factory=dict)  # the read-only files it was given
    failures: dict[str, int] = field(default_factory=dict)


# The process-wide table: every FakeBackend object sees the same sandboxes and images.
_LOCK = threading.Lock()
_BOXES: dict[str, _Box] = {}
_IMAGES: dict[str, tuple[str, int]] = {}  # location: (sandbox name, instance)
_TAKEN: dict[str, datetime] = {}
_COUNTER = itertools.count(1)


class FakeBackend(SandboxBackend):
    name = "fake"

    def __init__(self) -> None:
        self._lock = _LOCK
        self._boxes = _BOXES
        self._images = _IMAGES
        self._taken = _TAKEN
        self._counter = _COUNTER
        self.calls: list[tuple[str, str]] = []  # (method, sandbox name), for tests

    # -- test hooks -----------------------------------------------------------------------------

    def reset(self) -> None:
        with self._lock:
            self._boxes.clear()
            self._images.clear()
            self._taken.clear()
            self.calls.clear()

    def fail_next(self, name: str, method: str, times: int = 1) -> None:
        with self._lock:
            self._box(name).failures[method] = times

    def crash(self, name: str) -> None:
        with self._lock:
            self._box(name).running = False

    def replace_data(self, name: str) -> None:
        with self._lock:
            self._box(name).identity += 1

    def use(self, name: str, *, cpu_seconds: float = 0.0, memory_bytes: int | None = None) -> None:
        """Add ``cpu_seconds`` to a running, unfrozen sandbox's counter; hold ``memory_bytes``."""
        with self._lock:
            box = self._box(name)
            if box.running and not box.frozen:
                box.cpu_seconds += cpu_seconds
            if memory_bytes is not None:
                box.memory_bytes = memory_bytes

    def serve(self, name: str, port: int) -> None:
        """Make the sandbox's endpoint 127.0.0.1:``port`` from its next start or restore on."""
        with self._lock:
            self._box(name).port = port

    @staticmethod
    def _port(box: _Box) -> dict[str, int]:
        return {"endpoint_port": box.port} if box.port else {}

    def write_log(self, name: str, text: str) -> None:
        """Append ``text`` (lines) to the sandbox's output, as its gateway would."""
        with self._lock:
            self._box(name).log.extend(text.splitlines())

    def is_frozen(self, name: str) -> bool:
        with self._lock:
            return self._box(name).frozen

    def files(self, name: str) -> dict[str, str]:
        """The read-only files the sandbox has now: from its start, or ``write_files``."""
        with self._lock:
            return dict(self._box(name).files)

    def images(self) -> list[str]:
        with self._lock:
            return sorted(self._images)

    # -- helpers --------------------------------------------------------------------------------

    def _box(self, name: str) -> _Box:
        return self._boxes.setdefault(name, _Box())

    def _enter(self, method: str, spec: SandboxSpec) -> _Box:
        """Record the call; raise if a failure was planted for it. Holds no lock on return."""
        with self._lock:
            self.calls.append((method, spec.name))
            box = self._box(spec.name)
            left = box.failures.get(method, 0)
            if left:
                box.failures[method] = left - 1
                raise BackendError(f"{method} of {spec.name} failed (planted by a test)")
            return box

    def _alive(self, spec: SandboxSpec, state: dict[str, Any]) -> bool:
        box = self._boxes.get(spec.name)
        return bool(box and box.running and state.get("instance") == box.instance)

    # -- the contract ----------------------------------------------------------------------------

    def volume(self, sandbox_id: int) -> Path:
        return volumes.path(None, sandbox_id)  # a real directory: the data is real, on disk

    def prepare_volume(self, sandbox_id: int, subdirs: Iterable[str] = ()) -> Path:
        return volumes.prepare(self.volume(sandbox_id), subdirs)

    def remove_volume(self, sandbox_id: int) -> None:
        volumes.remove(self.volume(sandbox_id))

    def running_here(self) -> set[int]:
        with self._lock:
            running = {sandbox_id_of(name) for name, box in self._boxes.items() if box.running}
        return {i for i in running if i is not None}

    def volumes_here(self) -> set[int]:
        return volumes.present(None, volumes.this_host())

    def evict(self, sandbox_id: int) -> None:
        with self._lock:
            self.calls.append(("evict", sandbox_name(sandbox_id)))
            box = self._boxes.get(sandbox_name(sandbox_id))
            if box is not None:
                box.running = box.frozen = False

    def write_files(self, spec: SandboxSpec, state: dict[str, Any], files: dict[str, str]) -> None:
        box = self._enter("write_files", spec)
        with self._lock:
            if not self._alive(spec, state):
                raise BackendError(
                    f"Sandbox {spec.name} is not running, so its files stay as they are."
                )
            for inside in files:
                if inside not in box.files:
                    raise BackendError(
                        f"{inside} is not one of sandbox {spec.name}'s read-only files."
                    )
            box.files.update(files)

    def start(self, spec: SandboxSpec) -> Iterator[Progress]:
        yield Progress(5, "Preparing the sandbox")
        box = self._enter("start", spec)
        with self._lock:
            box.running, box.frozen, box.instance = True, False, next(self._counter)
            box.cpu_seconds = 0.0
            box.files = dict(spec.files)
            box.log.append(f"fake gateway started (instance {box.instance})")
            state = {"backend": self.name, "instance": box.instance, **self._port(box)}
        yield Progress(50, "Starting the agent gateway", state=dict(state))
        yield Progress(100, "Sandbox is running", state=dict(state))

    def stop(self, spec: SandboxSpec, state: dict[str, Any], timeout: float = 10.0) -> None:
        with self._lock:
            self.calls.append(("stop", spec.name))
            box = self._boxes.get(spec.name)
            if box is not None and state.get("instance") == box.instance:
                box.running = box.frozen = False

    def poll(self, spec: SandboxSpec, state: dict[str, Any]) -> PollResult:
        if not state:
            return PollResult(running=False, detail="never started")
        with self._lock:
            alive = self._alive(spec, state)
        return PollResult(running=alive, exit_code=None if alive else 0, detail="fake")

    def endpoint(self, spec: SandboxSpec, state: dict[str, Any]) -> tuple[str, int]:
        if "instance" not in state:
            raise BackendError(f"Sandbox {spec.name} has no endpoint: it was never started.")
        return ("127.0.0.1", int(state.get("endpoint_port") or 9))  # 9, discard: nothing listens

    def exec(
        self, spec: SandboxSpec, state: dict[str, Any], argv: list[str], timeout: float = 30.0
    ) -> ExecResult:
        with self._lock:
            if not self._alive(spec, state):
                raise BackendError(f"Sandbox {spec.name} is not running, so nothing can run in it.")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", **spec.env}
        proc = subprocess.Popen(
            argv,
            cwd=spec.data_dir if spec.data_dir.is_dir() else None,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # so a timeout kills what the command started, too
        )
        try:
            out, err = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            timed_out = True
        return ExecResult(
            exit_code=proc.returncode,
            stdout=out.decode(errors="replace"),
            stderr=err.decode(errors="replace"),
            timed_out=timed_out,
        )

    def processes(self, spec: SandboxSpec, state: dict[str, Any]) -> list[ProcessInfo]:
        with self._lock:
            alive = self._alive(spec, state)
        return (
            [ProcessInfo(pid=2, command="openclaw gateway", rss_bytes=MEMORY_BYTES)]
            if alive
            else []
        )

    def logs(self, spec: SandboxSpec, state: dict[str, Any], lines: int = 100) -> str:
        with self._lock:
            box = self._boxes.get(spec.name)
            return "\n".join(box.log[-lines:]) if box and lines > 0 else ""

    def stats(self, spec: SandboxSpec, state: dict[str, Any], *, disk: bool = True) -> Stats:
        box = self._enter("stats", spec)
        with self._lock:
            alive = self._alive(spec, state)
            memory, cpu = (box.memory_bytes, box.cpu_seconds) if alive else (0, 0.0)
        return Stats(memory, spec.memory_mb * 2**20, cpu, disk_usage(spec.data_dir) if disk else 0)

    @contextlib.contextmanager
    def frozen(self, spec: SandboxSpec, state: dict[str, Any]) -> Iterator[None]:
        with self._lock:
            box = self._boxes.get(spec.name)
            pause = bool(box and self._alive(spec, state) and not box.frozen)
            if pause and box is not None:
                box.frozen = True
        try:
            yield
        finally:
            if pause and box is not None:
                with self._lock:
                    box.frozen = False

    def freeze(self, spec: SandboxSpec, state: dict[str, Any]) -> None:
        box = self._enter("freeze", spec)
        with self._lock:
            if self._alive(spec, state):
                box.frozen = True

    def thaw(self, spec: SandboxSpec, state: dict[str, Any]) -> None:
        with self._lock:
            self.calls.append(("thaw", spec.name))
            box = self._boxes.get(spec.name)
            if box is not None:
                box.frozen = False

    def checkpoint_support(self) -> str:
        return ""

    def data_identity(self, spec: SandboxSpec) -> str:
        with self._lock:
            return f"{spec.name}:{self._box(spec.name).identity}"

    def checkpoint(self, spec: SandboxSpec, state: dict[str, Any]) -> CheckpointImage:
        box = self._enter("checkpoint", spec)
        identity = self.data_identity(spec)
        with self._lock:
            if not self._alive(spec, state):
                raise BackendError(f"Sandbox {spec.name} is not running: nothing to checkpoint.")
            location = f"fake://{spec.name}/{next(self._counter)}"
            self._images[location] = (spec.name, box.instance)
            self._taken[location] = datetime.now(UTC)
            box.running = box.frozen = False
        return CheckpointImage(location, IMAGE_BYTES, identity)

    def restore(self, spec: SandboxSpec, image: CheckpointImage) -> Iterator[Progress]:
        yield Progress(5, "Restoring your agent from its checkpoint")
        box = self._enter("restore", spec)
        if image.identity != self.data_identity(spec):
            raise BackendError("The checkpoint belongs to other data; it cannot be restored.")
        with self._lock:
            found = self._images.get(image.location)
            if found is None or found[0] != spec.name:
                raise BackendError(f"The checkpoint image {image.location} is missing.")
            box.running, box.frozen, box.instance = True, False, found[1]
            box.cpu_seconds = 0.0
            state = {
                "backend": self.name,
                "instance": box.instance,
                "restored": True,
                **self._port(box),
            }
        yield Progress(100, "Sandbox is running", state=dict(state))

    def list_checkpoints(self) -> list[tuple[str, str, datetime]]:
        with self._lock:
            return [(loc, name, self._taken[loc]) for loc, (name, _) in self._images.items()]

    def drop_checkpoint(self, location: str) -> None:
        with self._lock:
            self.calls.append(("drop_checkpoint", location))
            self._images.pop(location, None)
