"""Fencing: a lost host whose worker comes back stops what was moved away from it.

A host that misses its heartbeats is marked lost, and its sandboxes are reassigned and come back
on other hosts from their latest snapshots (sandboxes.relocation). The machine itself may have
kept running all along (its worker died, or the network split), its gateways with it. When its
worker runs again, it still heartbeats; a lost host stays lost until staff undrain it, and on
each heartbeat while lost the worker fences its machine (:func:`fence`, queued on its own
queue by :func:`queue_fence`): every sandbox the machine holds (``backend.resident``: running,
frozen, or only its volume) that the database now places on another host is a stray, and

* its processes are killed (``backend.evict``): a second copy of the agent would answer the
  owner's messengers, run its cron jobs and spend model credit alongside the real one;
* its checkpoint images here are dropped: no row points to them any more;
* its volume here is removed: the agent's data came back on its new host from the snapshot
  (the owner was told then that changes since it may be lost), and were the sandbox ever moved
  back here, a stale volume would be taken for its data instead of its latest backup. Only a
  volume this host holds (``backend.volumes_here``): on a data dir several hosts share, the
  new host's start prepared the same volume, and it is that host's;
* an event on the sandbox says so.

Only sandboxes whose row places them on another registered host are strays: one with no row,
or with no host (which counts as this machine's), is left alone. Each is checked again just
before it is fenced, so one moved back here meanwhile is kept. Running twice does nothing more.
"""

from __future__ import annotations

import logging

from django.core.cache import cache

from sandboxes import hosts
from sandboxes.backends import get_backend
from sandboxes.backends.base import BackendError, SandboxBackend, sandbox_id_of
from sandboxes.events import record_event
from sandboxes.models import Sandbox, SandboxHost

log = logging.getLogger(__name__)
QUEUED_KEY = "hermit:fence-queued:{host}"
QUEUED_TTL = 60  # seconds: at most one fence queued per host per minute


def strays(backend: SandboxBackend, host: SandboxHost) -> list[int]:
    """The ids of the sandboxes ``backend`` holds on this machine that the database places on
    a host other than ``host``, in order."""
    here = backend.resident()
    if not here:
        return []
    moved = (
        Sandbox.objects.filter(pk__in=here, host__isnull=False)
        .exclude(host=host)
        .values_list("pk", flat=True)
    )
    return sorted(moved)


def fence(host: SandboxHost | None = None) -> dict[str, int]:
    """Fence this machine (see the module docstring); return counts: ``fenced`` sandboxes,
    ``images`` dropped, ``failed`` (logged; the next heartbeat tries again)."""
    host = host or hosts.local_host()
    backend = get_backend()
    counts = {"fenced": 0, "images": 0, "failed": 0}
    found = strays(backend, host)
    if not found:
        return counts
    owned = backend.volumes_here()  # not those another host took over
    images: dict[int, list[str]] = {}
    for location, name, _taken in backend.list_checkpoints():
        images.setdefault(sandbox_id_of(name) or 0, []).append(location)
    for sandbox_id in found:
        sandbox = Sandbox.objects.filter(pk=sandbox_id).exclude(host=host).first()
        if sandbox is None or sandbox.host_id is None:
            continue  # moved back here (or deleted) since
        try:
            backend.evict(sandbox_id)
            for location in images.get(sandbox_id, []):
                backend.drop_checkpoint(location)
                counts["images"] += 1
            if sandbox_id in owned:
                backend.remove_volume(sandbox_id)
        except (BackendError, OSError, NotImplementedError) as exc:
            log.warning("host %s: could not fence sandbox %s: %s", host.name, sandbox_id, exc)
            counts["failed"] += 1
            continue
        counts["fenced"] += 1
        log.warning(
            "host %s came back after it was lost: stopped sandbox %s, which now runs on %s, "
            "and removed its copy here",
            host.name,
            sandbox_id,
            sandbox.host,
        )
        record_event(
            sandbox,
            "fenced",
            f"Its old machine {host.name} came back after it was marked lost: the copy of "
            "the agent still there was stopped and its data there removed",
        )
    return counts


def queue_fence(host: SandboxHost) -> bool:
    """From a lost host's heartbeat: queue :func:`fence` on the host's own queue, at most once
    per QUEUED_TTL seconds. Return True if queued."""
    if not cache.add(QUEUED_KEY.format(host=host.name), 1, QUEUED_TTL):
        return False
    from sandboxes import tasks

    tasks.fence_host.apply_async(queue=hosts.queue_for(host.name))
    return True
