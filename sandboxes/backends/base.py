"""The sandbox backend contract, modelled on JupyterHub's Spawner.

A backend starts, stops and polls one sandbox, reports its processes, logs and resource use,
and runs commands inside it. It keeps no state in memory that it cannot rebuild: everything it
needs to re-attach to a running sandbox after the portal or a worker restarts is returned from
``start`` as a JSON-serialisable dict, which the caller stores on the Sandbox row
(``Sandbox.backend_state``) and passes back on every later call.

It also owns each sandbox's data volume (:meth:`SandboxBackend.volume`): the portal asks it
where the data is, has it make and delete it, and hands it the read-only files (the gateway's
config) in the spec, or while the sandbox runs (:meth:`SandboxBackend.write_files`).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

NAME_PREFIX = "sbx-"


def sandbox_name(sandbox_id: int) -> str:
    """The spec name (cgroup, run dir, checkpoint) of sandbox ``sandbox_id``: ``sbx-<id>``."""
    return f"{NAME_PREFIX}{int(sandbox_id)}"


def sandbox_id_of(name: str) -> int | None:
    """The sandbox id in a spec name made by :func:`sandbox_name`; None for any other name."""
    digits = name.removeprefix(NAME_PREFIX)
    if digits == name or not digits.isascii() or not digits.isdigit():
        return None
    return int(digits)


class BackendError(Exception):
    """A failure the user and staff should read: the message says what went wrong and what to do."""


@dataclass(frozen=True)
class SandboxSpec:
    """Everything a backend needs to run one sandbox. Built by the actions from the database."""

    sandbox_id: int
    name: str  # unique, filesystem- and cgroup-safe (e.g. "sbx-42")
    data_dir: Path  # its volume (SandboxBackend.volume); the only writable path besides /tmp
    runtime_dir: Path  # the read-only runtime image (node + openclaw)
    env: dict[str, str]  # environment for the gateway; secrets go here, never into files
    memory_mb: int
    cpu_millis: int  # 1000 = one full core
    pids_max: int = 512
    internet: bool = False
    # The agent's browser (Chromium, started by the gateway inside the sandbox on first use)
    # is allowed: the backend gives it what it needs (a small /dev/shm, fonts).
    browser: bool = False
    ai_gateway_port: int | None = None  # host loopback port the sandbox may reach as 127.0.0.1
    gateway_port: int = 18789  # the port the OpenClaw gateway listens on inside the sandbox
    # Read-only files for the sandbox: absolute path inside it (outside data_dir) -> text. The
    # backend keeps them where the sandbox cannot write (never in data_dir, which the sandbox
    # controls) and mounts them read-only, so the sandbox can read but never swap them.
    files: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Progress:
    """One step of a start: percent 0-100 and a message a user can read."""

    percent: int
    message: str
    state: dict[str, Any] | None = None  # set once the backend has something to persist


@dataclass(frozen=True)
class PollResult:
    running: bool
    exit_code: int | None = None
    oom_killed: bool = False
    detail: str = ""


@dataclass(frozen=True)
class CheckpointImage:
    """A hibernated sandbox's processes on disk (CRIU for the local backend).

    ``location`` is the backend's own (a root-owned directory for the local backend);
    ``identity`` names the data directory the image belongs to: an image restores only onto the
    very same directory (its files' device and inode), never onto one put back from a backup.
    """

    location: str
    size_bytes: int
    identity: str


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool = False


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    command: str
    rss_bytes: int


@dataclass(frozen=True)
class Stats:
    memory_bytes: int
    memory_limit_bytes: int
    cpu_seconds: float
    disk_bytes: int
    oom_kills: int = 0


class SandboxBackend(abc.ABC):
    """One implementation per place sandboxes can run (local, docker, kubernetes)."""

    name: str = "base"

    # -- the data volume ---------------------------------------------------------------------
    # The backend owns each sandbox's persistent data (its volume): where it lives, making it
    # and deleting it. The portal never derives a path itself: it asks the backend of the
    # sandbox's row (``get_backend(sandbox.backend)``), in the root worker of the sandbox's
    # host, which is where every operation on the volume runs.

    @abc.abstractmethod
    def volume(self, sandbox_id: int) -> Path:
        """Return sandbox ``sandbox_id``'s data dir: where the gateway sees its volume
        (``SandboxSpec.data_dir``, and the paths in its config). It need not exist.

        On a backend whose volumes are directories on the sandbox's host (local, fake), it is
        also where that host's root worker reaches the data for backups, restores and exports.
        The sandbox controls everything inside it: root follows no link there
        (``sandboxes.backends.safefs``). Computes a path only: no side effect.
        """

    @abc.abstractmethod
    def prepare_volume(self, sandbox_id: int, subdirs: Iterable[str] = ()) -> Path:
        """Make sure the volume exists with each ``subdirs`` entry (one path component) a real
        directory in it; return :meth:`volume`. Idempotent.

        A link the sandbox left in place of a subdirectory is removed, never followed.
        """

    @abc.abstractmethod
    def remove_volume(self, sandbox_id: int) -> None:
        """Delete the volume and everything in it, following no link; idempotent (a missing
        volume is no error). Raises OSError if anything is left."""

    def write_files(self, spec: SandboxSpec, state: dict[str, Any], files: dict[str, str]) -> None:
        """Replace read-only files (``spec.files`` entries, such as the gateway's config) of the
        running sandbox in place, so that the running gateway reads the new text (a warm-pool
        gateway is re-keyed this way). ``files`` maps the path inside the sandbox to its text;
        each must be one the sandbox was started with. Raises BackendError if the sandbox is
        not running or a path is not one of its files.
        """
        raise BackendError(f"The {self.name} backend cannot rewrite a running sandbox's files.")

    # -- what this machine holds, whatever the database says -------------------------------
    # A host that was marked lost and comes back still runs (and holds the data of) sandboxes
    # that were moved away meanwhile: its worker fences them (sandboxes.fencing), which needs
    # to see what is here without the database's state, which now describes their new host.

    def resident(self) -> set[int]:
        """Return the ids of the sandboxes that have anything on this backend's machine:
        :meth:`running_here` and :meth:`volumes_here`. Reads the machine, not the database."""
        return self.running_here() | self.volumes_here()

    def running_here(self) -> set[int]:
        """The ids of the sandboxes with processes (running, frozen, or left by a crash) on
        this machine."""
        raise NotImplementedError(f"The {self.name} backend cannot list what it runs.")

    def volumes_here(self) -> set[int]:
        """The ids of the sandboxes whose volume this host holds: on a volume store several
        hosts share, only those this host prepared last (``volumes.claim``)."""
        raise NotImplementedError(f"The {self.name} backend cannot list its volumes.")

    def evict(self, sandbox_id: int) -> None:
        """Kill everything sandbox ``sandbox_id`` runs on this machine, without its saved state
        (it may describe another host by now); idempotent. Its volume is left alone
        (:meth:`remove_volume`)."""
        raise NotImplementedError(f"The {self.name} backend cannot evict sandboxes.")

    @abc.abstractmethod
    def start(self, spec: SandboxSpec) -> Iterator[Progress]:
        """Start the sandbox, yielding progress. The last Progress carries the state to persist.

        Raises BackendError with a readable message on failure, after cleaning up anything it
        started, so that no half-started sandbox is left behind.
        """

    @abc.abstractmethod
    def stop(self, spec: SandboxSpec, state: dict[str, Any], timeout: float = 10.0) -> None:
        """Stop the sandbox (SIGTERM, then SIGKILL after ``timeout``). Idempotent."""

    @abc.abstractmethod
    def poll(self, spec: SandboxSpec, state: dict[str, Any]) -> PollResult:
        """Report whether the sandbox is running, from the persisted state alone."""

    @abc.abstractmethod
    def endpoint(self, spec: SandboxSpec, state: dict[str, Any]) -> tuple[str, int]:
        """Return (host, port) where the portal reaches the sandbox's gateway."""

    @abc.abstractmethod
    def exec(
        self, spec: SandboxSpec, state: dict[str, Any], argv: list[str], timeout: float = 30.0
    ) -> ExecResult:
        """Run ``argv`` inside the running sandbox (same namespaces, limits and user)."""

    @abc.abstractmethod
    def processes(self, spec: SandboxSpec, state: dict[str, Any]) -> list[ProcessInfo]:
        """List the sandbox's processes."""

    @abc.abstractmethod
    def logs(self, spec: SandboxSpec, state: dict[str, Any], lines: int = 100) -> str:
        """Return the last ``lines`` lines of the sandbox's output."""

    @abc.abstractmethod
    def stats(self, spec: SandboxSpec, state: dict[str, Any], *, disk: bool = True) -> Stats:
        """Return current memory, CPU seconds and disk use. With ``disk=False``, ``disk_bytes``
        is 0 and the data dir is not walked (metering reads memory and CPU every minute)."""

    def frozen(self, spec: SandboxSpec, state: dict[str, Any]) -> AbstractContextManager[None]:
        """Return a context manager that pauses the whole sandbox for its block.

        Every process of the sandbox stops (RAM kept, nothing runs, nothing writes) before the
        block starts, and runs again when it ends, however it ends: so a backup read in the
        block is crash-consistent. A sandbox that is not running (``state`` empty, or its
        processes gone) needs no pause: the block just runs; one paused already (dozing) stays
        paused after the block. Raises BackendError if the sandbox
        cannot be paused (then the block does not run).

        Not abstract, so backends without a freezer still load; but no backend may pretend: one
        that cannot pause raises NotImplementedError, never yields unfrozen.
        """
        raise NotImplementedError(f"The {self.name} backend cannot pause a running sandbox.")

    def thaw(self, spec: SandboxSpec, state: dict[str, Any]) -> None:
        """Resume every process of a paused sandbox; a no-op if it is not paused or not running.

        For a pause whose owner is gone (a backup worker killed inside ``frozen``): reconcile
        resumes a sandbox the database says is running. Raises BackendError if it cannot.
        """
        raise NotImplementedError(f"The {self.name} backend cannot resume a paused sandbox.")

    def freeze(self, spec: SandboxSpec, state: dict[str, Any]) -> None:
        """Pause every process of the sandbox (RAM kept) until :meth:`thaw`; idempotent.

        Raises BackendError if it cannot; NotImplementedError on a backend without a freezer.
        """
        raise NotImplementedError(f"The {self.name} backend cannot pause a running sandbox.")

    def checkpoint_support(self) -> str:
        """Return "" if this backend can checkpoint and restore sandboxes here, else why not."""
        return f"The {self.name} backend cannot checkpoint sandboxes."

    def checkpoint(self, spec: SandboxSpec, state: dict[str, Any]) -> CheckpointImage:
        """Write the running (or paused) sandbox's processes to disk, then stop it.

        Afterwards nothing of the sandbox runs and its memory is free. On failure raises
        BackendError and leaves the sandbox as it was (the caller may then stop it cold).
        """
        raise BackendError(self.checkpoint_support() or "Checkpoints are not supported.")

    def data_identity(self, spec: SandboxSpec) -> str:
        """Return the identity of ``spec.data_dir`` now, in :class:`CheckpointImage`'s format."""
        raise NotImplementedError(f"The {self.name} backend has no checkpoints.")

    def restore(self, spec: SandboxSpec, image: CheckpointImage) -> Iterator[Progress]:
        """Bring a checkpointed sandbox back, yielding progress as :meth:`start` does.

        Refuses (BackendError) an image that is missing, corrupt or taken of another data
        directory (see :meth:`data_identity`), after cleaning up anything it started, so that
        the caller can start the sandbox cold instead. The restored gateway keeps the
        environment it was checkpointed with.
        """
        raise BackendError(self.checkpoint_support() or "Checkpoints are not supported.")

    def list_checkpoints(self) -> list[tuple[str, str, datetime]]:
        """Return every checkpoint image this backend holds, as (location, sandbox name, when
        taken): the portal sweeps away images no row points to (a worker died mid-way, or
        the sandbox was deleted)."""
        return []

    def drop_checkpoint(self, location: str) -> None:
        """Delete a checkpoint image and free its disk; idempotent."""
        raise NotImplementedError(f"The {self.name} backend has no checkpoints.")
