"""What staff see of one sandbox, and the staff-only operation of moving it to a runtime.

:func:`look_inside` reads the sandbox's memory, CPU, processes and last log lines from its
backend for the admin's page. It must never break or stall the page: it runs the backend
calls in a worker thread with a deadline (LOOK_TIMEOUT), and any failure or timeout becomes a
sentence in ``Inside.problem``. Log lines and process command lines go through
portal.lib.redact (and the sandbox's own gateway token is masked by value), so no secret
reaches a staff member's screen.

:func:`move_to_runtime` pins a sandbox to a runtime image (or unpins it, for the current one)
and restarts it on that image if it runs; a stopped or sleeping one starts on it next time.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.db import connection

from portal.lib.redact import MASK, redact
from sandboxes import actions
from sandboxes.backends import get_backend
from sandboxes.backends.base import BackendError, ProcessInfo
from sandboxes.models import RuntimeImage, Sandbox

LOOK_TIMEOUT = 3.0  # seconds for all backend reads together
CPU_SAMPLE_SECONDS = 0.2
LOG_LINES = 50
_pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="look-inside")

State = Sandbox.State
UP = (State.RUNNING, State.DOZING)


@dataclass
class Inside:
    """What the backend reported; ``problem`` says why something is missing."""

    memory_bytes: int | None = None
    memory_limit_bytes: int | None = None
    cpu_percent: float | None = None
    cpu_seconds: float | None = None
    disk_bytes: int | None = None
    processes: list[ProcessInfo] = field(default_factory=list)
    log: str = ""
    problem: str = ""


def _mask(sandbox: Sandbox, text: str) -> str:
    if sandbox.gateway_token:
        text = text.replace(sandbox.gateway_token, MASK)
    return redact(text)


def _read(sandbox: Sandbox) -> Inside:
    backend = get_backend(sandbox.backend)
    spec, state = actions.spec_for(sandbox), dict(sandbox.backend_state)
    first = backend.stats(spec, state)
    started = time.monotonic()
    processes = backend.processes(spec, state)
    log = backend.logs(spec, state, lines=LOG_LINES)
    time.sleep(max(0.0, CPU_SAMPLE_SECONDS - (time.monotonic() - started)))
    second = backend.stats(spec, state)
    elapsed = time.monotonic() - started
    cpu = max(0.0, second.cpu_seconds - first.cpu_seconds) / elapsed * 100 if elapsed else 0.0
    masked = [ProcessInfo(p.pid, _mask(sandbox, p.command), p.rss_bytes) for p in processes]
    return Inside(
        memory_bytes=second.memory_bytes,
        memory_limit_bytes=second.memory_limit_bytes,
        cpu_percent=round(cpu, 1),
        cpu_seconds=round(second.cpu_seconds, 1),
        disk_bytes=second.disk_bytes,
        processes=masked,
        log=_mask(sandbox, log),
    )


def look_inside(sandbox: Sandbox, timeout: float | None = None) -> Inside:
    """Return the sandbox's resource use, processes and last log lines, as far as the backend
    answered within ``timeout`` (default LOOK_TIMEOUT); never raises."""
    timeout = LOOK_TIMEOUT if timeout is None else timeout
    if sandbox.state not in UP or not sandbox.backend_state:
        return Inside(problem=f"Not running ({sandbox.state}): nothing to measure.")
    future = _pool.submit(_read_closing, sandbox)
    try:
        return future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        return Inside(problem=f"The backend did not answer within {timeout:g} s.")
    except (BackendError, OSError, ValueError, KeyError) as exc:
        return Inside(problem=f"The backend could not report: {_mask(sandbox, str(exc))}")
    except Exception as exc:  # a page for staff: show what went wrong rather than a 500
        return Inside(problem=f"Could not read the sandbox: {exc.__class__.__name__}")


def _read_closing(sandbox: Sandbox) -> Inside:
    try:
        return _read(sandbox)
    finally:
        connection.close()  # a pool thread: do not keep a database connection open


def move_to_runtime(sandbox: Sandbox, image: RuntimeImage, *, actor_user: Any = None) -> str:
    """Pin ``sandbox`` to ``image`` (unpinned if ``image`` is current), restarting it on the
    image if it runs; return what happened, for the staff member."""
    if image.status != RuntimeImage.Status.READY or not Path(image.path).is_dir():
        return f"refused: the image is {image.status} or its directory is missing"
    Sandbox.objects.filter(pk=sandbox.pk).update(runtime=image, runtime_pinned=not image.is_current)
    sandbox.refresh_from_db()
    if sandbox.state not in (State.RUNNING, State.DOZING, State.FAILED):
        return f"pinned; it starts on it next time (it is {sandbox.state})"
    staff = actions.Actor.STAFF
    try:
        actions.stop_sandbox(sandbox, actor=staff, actor_user=actor_user)
        for _ in actions.start_sandbox(sandbox, actor=staff, actor_user=actor_user):
            pass
    except actions.TransitionRefused as exc:
        return f"not restarted: {exc}"
    sandbox.refresh_from_db()
    if sandbox.state != State.RUNNING:
        return f"failed: {sandbox.error_message or sandbox.state}"
    return "running on it"
