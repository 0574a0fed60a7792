"""Sandbox hosts: the registry, their queues and heartbeats, and placement.

Contract:

* **One queue per host.** Each host's privileged worker consumes ``host.<name>`` besides the
  default queue (portal.celery adds it at worker start). :func:`route_task`, the Celery router,
  sends every task whose first parameter is ``sandbox_id`` to the queue of that sandbox's host;
  tasks with no sandbox, and those of a sandbox with no host yet, go to the default queue. A
  worker that receives a sandbox's task after the sandbox moved sends it on to its new host
  (portal.celery.HostTask). A
  deployment that names its default queue (HERMIT_CELERY_QUEUE) gets its host queues under that
  name (``<queue>.host.<name>``), so two portals, or two test runs, sharing one Redis never take
  each other's tasks.
* **Heartbeat.** A host's worker calls :func:`heartbeat` every HERMIT_HOST_HEARTBEAT_INTERVAL
  seconds: it registers the host on its first beat and reports its free RAM (MemAvailable) and
  how many sandboxes are awake on it. A heartbeat never changes the host's state: a lost host
  that comes back stays lost (its sandboxes were moved away) until staff undrain it, and its
  heartbeat meanwhile queues the fence of what it still holds of them (sandboxes.fencing).
* **Placement** (:func:`place`): a new sandbox goes to the active host with the most free RAM
  that has room (at least HERMIT_HOST_MIN_FREE_MB available, fewer sandboxes than its cap). A
  host that has not reported yet counts as having room and comes after those that have. With no
  host registered at all, this machine registers itself (a single-machine install). NoRoom if
  none has room.
* A sandbox with no host (made before hosts existed, or not placed yet) counts as this
  machine's in the per-host passes (:func:`on_this_host`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import inspect
import logging
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import SynchronousOnlyOperation
from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from sandboxes.models import Sandbox, SandboxHost

log = logging.getLogger(__name__)
HostState = SandboxHost.State
State = Sandbox.State
AWAKE = (State.STARTING, State.RUNNING, State.DOZING, State.STOPPING)


class NoRoom(Exception):
    """No active host has room for another sandbox."""


class UnknownHost(Exception):
    """No host of that name is registered."""


def local_name() -> str:
    """This machine's host name (HERMIT_HOST_NAME, default the machine's hostname)."""
    return str(settings.HERMIT_HOST_NAME)


def queue_for(host_name: str) -> str:
    """The Celery queue a host's worker consumes for its sandboxes' tasks."""
    from portal.celery import app

    default = str(app.conf.task_default_queue or "celery")
    prefix = "" if default == "celery" else f"{default}."
    return f"{prefix}host.{host_name}"


# -- routing -----------------------------------------------------------------------------------


def _is_sandbox_task(task: Any) -> bool:
    """Whether the task's first parameter is ``sandbox_id`` (cached on the task object)."""
    known = getattr(task, "_hermit_sandbox_scoped", None)
    if known is not None:
        return bool(known)
    try:
        params = list(inspect.signature(task.run).parameters)
    except (TypeError, ValueError, AttributeError):
        params = []
    scoped = bool(params) and params[0] == "sandbox_id"
    with contextlib.suppress(AttributeError):
        task._hermit_sandbox_scoped = scoped
    return scoped


def _host_of(sandbox_id: int) -> str | None:
    return (
        Sandbox.objects.filter(pk=sandbox_id, host__isnull=False)
        .values_list("host__name", flat=True)
        .first()
    )


def host_name_of(sandbox_id: int) -> str | None:
    """The name of the sandbox's host, or None. Safe to call from async code too (the query
    then runs in a thread: Django refuses queries on an event loop's thread)."""
    try:
        return _host_of(sandbox_id)
    except SynchronousOnlyOperation:
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(_host_of_closing, sandbox_id).result()


def _host_of_closing(sandbox_id: int) -> str | None:
    from django.db import connection

    try:
        return _host_of(sandbox_id)
    finally:
        connection.close()


def host_for_task(task: Any, args: Any, kwargs: Any) -> str | None:
    """The name of the host whose queue ``task`` with these arguments belongs on: its
    sandbox's host, or None (no sandbox, no host yet, or gone)."""
    if not _is_sandbox_task(task):
        return None
    sandbox_id = args[0] if args else (kwargs or {}).get("sandbox_id")
    if not isinstance(sandbox_id, int):
        return None
    return host_name_of(sandbox_id)


def route_task(
    name: str,
    args: Any,
    kwargs: Any,
    options: dict[str, Any],
    task: Any = None,
    **extra: Any,
) -> dict[str, str] | None:
    """Celery router (CELERY_TASK_ROUTES): a sandbox's task goes to its host's queue.

    Return None (the default queue) for a task with no sandbox, a sandbox with no host, or one
    that no longer exists. A queue the caller named explicitly wins (Celery merges it over ours).
    """
    if task is None:
        from portal.celery import app

        task = app.tasks.get(name)
    if task is None:
        return None
    host = host_for_task(task, args, kwargs)
    return {"queue": queue_for(host)} if host else None


# -- registry and heartbeat --------------------------------------------------------------------


def meminfo() -> tuple[int, int]:
    """(MemTotal, MemAvailable) of this machine in MB; (0, 0) if unknown."""
    values: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                values[key] = int(rest.split()[0]) // 1024
    except (OSError, ValueError, IndexError):
        return 0, 0
    return values.get("MemTotal", 0), values.get("MemAvailable", 0)


def local_host() -> SandboxHost:
    """This machine's host row, registered (active) if it is not yet."""
    host, _ = SandboxHost.objects.get_or_create(
        name=local_name(),
        defaults={
            "address": settings.HERMIT_HOST_ADDRESS,
            "capacity_sandboxes": settings.HERMIT_HOST_MAX_SANDBOXES,
        },
    )
    return host


def heartbeat(now: datetime | None = None) -> SandboxHost:
    """Register this machine's host if needed and record that its worker is alive, with its
    free RAM and the sandboxes awake on it. Return the row."""
    now = now or timezone.now()
    host = local_host()
    total, available = meminfo()
    awake = Sandbox.objects.filter(host=host, state__in=AWAKE).count()
    fields: dict[str, Any] = {
        "last_heartbeat": now,
        "free_ram_mb": available,
        "awake_sandboxes": awake,
        "capacity_ram_mb": settings.HERMIT_HOST_RAM_MB or total,
        "address": settings.HERMIT_HOST_ADDRESS,
        "capacity_sandboxes": settings.HERMIT_HOST_MAX_SANDBOXES,
    }
    SandboxHost.objects.filter(pk=host.pk).update(**fields)
    for key, value in fields.items():
        setattr(host, key, value)
    return host


def live_hosts(now: datetime | None = None) -> list[SandboxHost]:
    """The hosts not lost whose worker heartbeated within HERMIT_HOST_LOST_AFTER."""
    now = now or timezone.now()
    recent = now - timedelta(seconds=settings.HERMIT_HOST_LOST_AFTER)
    return list(
        SandboxHost.objects.exclude(state=HostState.LOST).filter(last_heartbeat__gte=recent)
    )


def on_this_host(sandboxes: QuerySet[Sandbox]) -> QuerySet[Sandbox]:
    """Narrow ``sandboxes`` to this machine's (and those with no host: see the docstring)."""
    return sandboxes.filter(Q(host__name=local_name()) | Q(host__isnull=True))


def is_here(sandbox: Sandbox) -> bool:
    """Whether the sandbox belongs to this machine (or to no host yet)."""
    return sandbox.host_id is None or (
        SandboxHost.objects.filter(pk=sandbox.host_id, name=local_name()).exists()
    )


def set_state(name: str, state: str) -> SandboxHost:
    """Set a host's state (staff: drain, undrain). Raise UnknownHost if there is none."""
    host = SandboxHost.objects.filter(name=name).first()
    if host is None:
        raise UnknownHost(f"No sandbox host is named {name!r}.")
    if host.state != state:
        SandboxHost.objects.filter(pk=host.pk).update(state=state, state_changed_at=timezone.now())
        host.state = state
    return host


# -- placement ---------------------------------------------------------------------------------


def has_room(host: SandboxHost, placed: int) -> bool:
    """Whether ``host`` (with ``placed`` sandboxes on it) may take one more."""
    if host.capacity_sandboxes and placed >= host.capacity_sandboxes:
        return False
    return host.free_ram_mb is None or host.free_ram_mb >= settings.HERMIT_HOST_MIN_FREE_MB


def choose(exclude: SandboxHost | None = None) -> SandboxHost:
    """The active host with the most free RAM that has room (see the module docstring).
    Raise NoRoom if there is none."""
    if not SandboxHost.objects.exists():
        local_host()
    hosts = SandboxHost.objects.filter(state=HostState.ACTIVE).annotate(placed=Count("sandboxes"))
    if exclude is not None:
        hosts = hosts.exclude(pk=exclude.pk)
    fits = [host for host in hosts if has_room(host, host.placed)]
    if not fits:
        raise NoRoom("No sandbox host has room for another agent right now.")
    return max(fits, key=lambda h: (h.free_ram_mb is not None, h.free_ram_mb or 0, -h.pk))


def place(sandbox: Sandbox) -> SandboxHost:
    """Give a sandbox with no host one (see :func:`choose`); return its host. A sandbox that
    has one keeps it. Raise NoRoom if no host has room."""
    if sandbox.host_id is not None:
        return SandboxHost.objects.get(pk=sandbox.host_id)
    host = choose()
    if not Sandbox.objects.filter(pk=sandbox.pk, host__isnull=True).update(host=host):
        sandbox.refresh_from_db(fields=["host"])  # placed by someone else meanwhile
        assert sandbox.host is not None
        return sandbox.host
    sandbox.host = host
    log.info("sandbox %s: placed on host %s", sandbox.pk, host.name)
    return host
