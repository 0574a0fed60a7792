"""Sleep in stages: doze (frozen in place), hibernate (a checkpoint on disk), cold (stopped).

- **Doze.** A sandbox whose plan sleeps is frozen (``backend.freeze``) after HERMIT_DOZE_AFTER
  idle seconds: its processes and RAM stay, and a thaw takes milliseconds.
- **Hibernate.** After the plan's sleep-after it is checkpointed to disk (``backend.checkpoint``,
  CRIU for the local backend) and its RAM is freed; a wake restores it in about a second.
  Dozing sandboxes hibernate sooner, longest idle first, past HERMIT_MAX_DOZING of them or when
  the host has less than HERMIT_DOZE_MIN_AVAILABLE_MB of RAM available.
- **Cold.** Where a checkpoint cannot be taken or restored (unsupported, failed, missing,
  corrupt, another runtime, a data dir put back from a backup) the sandbox is stopped and boots
  cold: slower, and it loses nothing.

A checkpoint fits one moment of one data dir, so it is used at most once: every start drops it
(:func:`take_checkpoint`). Checkpoints past HERMIT_CHECKPOINT_MAX_AGE or beyond
HERMIT_CHECKPOINT_BUDGET_MB in all are dropped oldest first (:func:`enforce_checkpoint_budget`).

Races: every stage change is a conditional UPDATE on the state (``actions.transition``), so two
sleep workers never act on one sandbox. A doze claims ``running → dozing`` before it freezes and
re-reads the state after: a wake in between (which claims ``dozing → running`` before it thaws)
makes the dozer thaw what it froze. A hint in the cache (:func:`is_dozing`) lets chat and the
Control UI notice a doze on every frame without a database query.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db.models import QuerySet
from django.utils import timezone
from redis.exceptions import RedisError

from portal.lib.cache import ahas_key
from sandboxes import actions, hosts, passes, relocation
from sandboxes.backends import get_backend
from sandboxes.backends.base import (
    BackendError,
    CheckpointImage,
    Progress,
    SandboxSpec,
    sandbox_id_of,
)
from sandboxes.events import record_event
from sandboxes.limits import SandboxLimits, limits_for
from sandboxes.models import Checkpoint, RuntimeImage, Sandbox, SandboxEvent

log = logging.getLogger(__name__)
State = Sandbox.State
Actor = SandboxEvent.Actor
DOZING_HINT_TTL = 24 * 3600


def _hint_key(sandbox_id: int) -> str:
    return f"hermit:dozing:{sandbox_id}"


def is_dozing(sandbox_id: int) -> bool:
    """Whether the sandbox may be dozing, from the cache alone (no database query)."""
    return bool(cache.get(_hint_key(sandbox_id)))


async def ais_dozing(sandbox_id: int) -> bool:
    """:func:`is_dozing` for the chat relay: the hint's presence, asked without a thread hop.
    If the cache does not answer (Redis down, or this process too busy to get a connection in
    time) the answer is no, with a warning: the session goes on, and its next frame asks again."""
    try:
        return await ahas_key(_hint_key(sandbox_id))
    except (RedisError, OSError) as exc:
        log.warning("cannot tell whether sandbox %s is dozing: %s", sandbox_id, exc)
        return False


def _model_call_key(sandbox_id: int) -> str:
    return f"hermit:model-call:{sandbox_id}"


def note_model_call(sandbox_id: int) -> None:
    """An AI-gateway call of the sandbox's: activity, kept in the cache only (the gateway's hot
    path makes no database query for it); the sleep policy reads it with the rows."""
    cache.set(_model_call_key(sandbox_id), time.time(), DOZING_HINT_TTL)


def last_active(sandboxes: list[Sandbox]) -> dict[int, datetime]:
    """Each sandbox's latest activity: its row's, or a later model call noted in the cache."""
    calls = cache.get_many([_model_call_key(s.pk) for s in sandboxes])
    latest = {}
    for sandbox in sandboxes:
        called = calls.get(_model_call_key(sandbox.pk))
        seen = sandbox.last_activity_at
        if called is not None:
            seen = max(seen, datetime.fromtimestamp(float(called), UTC))
        latest[sandbox.pk] = seen
    return latest


def doze_after(limits: SandboxLimits) -> timedelta | None:
    """Idle time after which a sandbox with these limits dozes, or None if it never sleeps."""
    sleep_after = limits.sleeps_after()
    if sleep_after is None:
        return None
    return min(timedelta(seconds=settings.HERMIT_DOZE_AFTER), sleep_after)


def _next_job_at(sandbox: Sandbox) -> datetime | None:
    """The agent's own next scheduled job, read through its gateway (None if none or unknown)."""
    from sandboxes.openclaw import cron

    if not sandbox.backend_state:  # nothing runs to ask: keep what was read last time
        return sandbox.next_job_at
    return cron.next_job_at(sandbox)


def doze(sandbox: Sandbox, *, idle_since: datetime | None = None) -> bool:
    """Freeze a running sandbox in place; return True if it now dozes.

    With ``idle_since``, the claim holds only if no activity was recorded after it (a chat
    frame that came in meanwhile keeps the agent awake)."""
    if sandbox.state != State.RUNNING or not sandbox.backend_state:
        return False
    guard = {"last_activity_at__lte": idle_since} if idle_since is not None else None
    next_job = _next_job_at(sandbox)  # while the gateway can still answer
    if _job_imminent(sandbox, next_job):
        return False
    # The hint goes first: a chat frame that comes in once the claim is made must see it.
    cache.set(_hint_key(sandbox.pk), 1, DOZING_HINT_TTL)
    try:
        actions.transition(
            sandbox,
            State.DOZING,
            message="Dozing (paused, wakes instantly)",
            guard=guard,
            next_job_at=next_job,
        )
    except actions.TransitionRefused:
        cache.delete(_hint_key(sandbox.pk))
        return False
    backend = get_backend(sandbox.backend)
    spec = actions.spec_for(sandbox)
    try:
        backend.freeze(spec, sandbox.backend_state)
    except (BackendError, NotImplementedError) as exc:
        log.warning("sandbox %s: could not freeze it: %s", sandbox.pk, exc)
        _undo_doze(sandbox, f"Could not pause the agent ({exc}); it stays awake")
        return False
    sandbox.refresh_from_db(fields=["state"])
    if sandbox.state != State.DOZING:  # woken while we froze it: the waker's thaw came first
        backend.thaw(spec, sandbox.backend_state)
        return False
    return True


def _job_imminent(sandbox: Sandbox, next_job: datetime | None) -> bool:
    """Whether the agent's own next job is so near that sleeping now would only mean waking
    straight back up for it; then the time is stored and the sandbox stays up."""
    if next_job is None:
        return False
    sandbox.next_job_at = next_job
    if not _holds_awake(sandbox, timezone.now()):
        return False
    Sandbox.objects.filter(pk=sandbox.pk).update(next_job_at=next_job)
    return True


def _undo_doze(sandbox: Sandbox, message: str) -> None:
    with contextlib.suppress(actions.TransitionRefused):
        actions.transition(sandbox, State.RUNNING, message=message)
    cache.delete(_hint_key(sandbox.pk))


def thaw(sandbox: Sandbox, *, actor: str = Actor.SYSTEM, actor_user: Any = None) -> bool:
    """Wake a dozing sandbox (milliseconds); return True if this call woke it.

    Claims ``dozing → running`` first, then thaws (see the module docstring). A sandbox whose
    processes are gone meanwhile is moved to sleeping (no processes), to boot on its next wake.
    """
    try:
        actions.transition(
            sandbox,
            State.RUNNING,
            actor=actor,
            actor_user=actor_user,
            message="Woke from a doze",
            progress=100,
            last_activity_at=timezone.now(),
        )
    except actions.TransitionRefused:
        return False
    cache.delete(_hint_key(sandbox.pk))
    backend = get_backend(sandbox.backend)
    spec = actions.spec_for(sandbox)
    try:
        backend.thaw(spec, sandbox.backend_state)
    except BackendError as exc:
        log.warning("sandbox %s: thaw failed: %s", sandbox.pk, exc)
    if not backend.poll(spec, sandbox.backend_state).running:
        actions.mark_crashed(sandbox)
        return False
    return True


def wake_if_dozing(sandbox: Sandbox, *, actor_user: Any = None) -> None:
    """For every frame of an open chat or Control UI: thaw the sandbox if the cache says it may
    doze (one cache lookup when it does not)."""
    if not is_dozing(sandbox.pk):
        return
    sandbox.refresh_from_db()
    if sandbox.state == State.DOZING:
        thaw(sandbox, actor=Actor.USER if actor_user else Actor.SYSTEM, actor_user=actor_user)
    else:
        cache.delete(_hint_key(sandbox.pk))


def hibernate(
    sandbox: Sandbox,
    *,
    actor: str = Actor.SYSTEM,
    message: str = "",
    idle_since: datetime | None = None,
) -> str:
    """Put a running or dozing sandbox to sleep with its RAM freed; return how.

    "checkpointed": its processes are on disk and wake in about a second; "stopped": a
    checkpoint was not possible, so it was stopped (it boots cold next time); "" if it was
    neither running nor dozing (or someone else moved first).
    """
    if sandbox.state not in (State.RUNNING, State.DOZING):
        return ""
    if sandbox.state == State.RUNNING:
        next_job = _next_job_at(sandbox)
        if _job_imminent(sandbox, next_job):
            return ""
        sandbox.next_job_at = next_job
        Sandbox.objects.filter(pk=sandbox.pk).update(next_job_at=next_job)
    guard = {"last_activity_at__lte": idle_since} if idle_since is not None else None
    try:
        actions.transition(
            sandbox, State.STOPPING, actor=actor, message=message or "Hibernating", guard=guard
        )
    except actions.TransitionRefused:  # someone moved first, or it was used meanwhile
        return ""
    cache.delete(_hint_key(sandbox.pk))
    backend = get_backend(sandbox.backend)
    spec = actions.spec_for(sandbox)
    running = bool(sandbox.backend_state)
    why_not = backend.checkpoint_support() if running else ""
    image: CheckpointImage | None = None
    if running and not why_not:
        started = time.monotonic()
        try:
            image = backend.checkpoint(spec, sandbox.backend_state)
        except BackendError as exc:
            why_not = str(exc).splitlines()[0] if str(exc) else "the checkpoint failed"
            log.warning("sandbox %s: checkpoint failed: %s", sandbox.pk, why_not)
        else:
            log.info(
                "sandbox %s: checkpointed %d MB in %.1f s",
                sandbox.pk,
                image.size_bytes // 2**20,
                time.monotonic() - started,
            )
    if image is None:
        try:
            backend.thaw(spec, sandbox.backend_state)
            backend.stop(spec, sandbox.backend_state)
        except BackendError as exc:
            actions.fail(sandbox, str(exc))
            return ""
    else:
        _replace_checkpoint(sandbox, image)
    done = "Asleep (hibernated: wakes in about a second)" if image else "Asleep"
    if why_not:
        record_event(sandbox, "sleep", f"Stopped instead of hibernating: {why_not}")
    actions.transition(sandbox, State.SLEEPING, message=done, backend_state={})
    actions.queue_backup(sandbox, "sleep")
    relocation.queue_move_if_draining(sandbox)  # its host drains: it moves now it sleeps
    enforce_checkpoint_budget()
    return "checkpointed" if image else "stopped"


def _replace_checkpoint(sandbox: Sandbox, image: CheckpointImage) -> None:
    drop_checkpoint(sandbox)
    Checkpoint.objects.create(
        sandbox=sandbox,
        location=image.location,
        size_bytes=image.size_bytes,
        identity=image.identity,
        runtime=sandbox.runtime,
    )


def drop_checkpoint(sandbox: Sandbox, reason: str = "") -> bool:
    """Delete the sandbox's checkpoint (row and image); return True if there was one."""
    found = Checkpoint.objects.filter(sandbox=sandbox).first()
    if found is None:
        return False
    _drop(found)
    if reason:
        record_event(sandbox, "checkpoint", f"Checkpoint dropped: {reason}")
    return True


def _drop(found: Checkpoint) -> None:
    _drop_image(found)
    Checkpoint.objects.filter(pk=found.pk).delete()


def take_checkpoint(sandbox: Sandbox, image: RuntimeImage) -> Checkpoint | None:
    """Claim the sandbox's checkpoint for a start: return it if it may be restored now, else
    None. Either way the row is gone afterwards (a checkpoint is used at most once); the caller
    drops the image once it has restored it or given up."""
    found = Checkpoint.objects.filter(sandbox=sandbox).first()
    if found is None:
        return None
    if not Checkpoint.objects.filter(pk=found.pk).delete()[0]:
        return None  # another start claimed it
    if found.runtime_id != image.pk:
        _drop_image(found)
        record_event(sandbox, "checkpoint", "Checkpoint was of an older runtime; starting fresh")
        return None
    return found


def _drop_image(found: Checkpoint) -> None:
    try:
        get_backend(found.sandbox.backend).drop_checkpoint(found.location)
    except (BackendError, OSError) as exc:
        log.warning("checkpoint of sandbox %s: could not delete: %s", found.sandbox_id, exc)


def restore_spec(sandbox: Sandbox, image: RuntimeImage) -> SandboxSpec:
    """The spec for restoring a checkpoint: limits and runtime, no new secrets (the restored
    gateway keeps the environment it was started with)."""
    from sandboxes.openclaw import setup

    return setup.restore_spec(sandbox, limits_for(sandbox.owner), image)


def restore_steps(sandbox: Sandbox, found: Checkpoint, image: RuntimeImage) -> Iterator[Progress]:
    """Restore ``found`` (claimed by :func:`take_checkpoint`), yielding the backend's progress;
    the image is deleted afterwards whatever happens. Raises BackendError if it cannot be
    restored (the caller then boots cold)."""
    backend = get_backend(sandbox.backend)
    checkpoint = CheckpointImage(found.location, found.size_bytes, found.identity)
    try:
        yield from backend.restore(restore_spec(sandbox, image), checkpoint)
    finally:
        _drop_image(found)


def enforce_checkpoint_budget(now: datetime | None = None) -> int:
    """Drop checkpoints older than HERMIT_CHECKPOINT_MAX_AGE, then the oldest until all fit in
    HERMIT_CHECKPOINT_BUDGET_MB; return how many were dropped."""
    now = now or timezone.now()
    dropped = 0
    too_old = now - timedelta(seconds=settings.HERMIT_CHECKPOINT_MAX_AGE)
    for found in Checkpoint.objects.filter(created_at__lt=too_old).select_related("sandbox"):
        _drop(found)
        record_event(found.sandbox, "checkpoint", "Checkpoint expired; the next wake boots cold")
        dropped += 1
    budget = settings.HERMIT_CHECKPOINT_BUDGET_MB * 2**20
    rows = list(Checkpoint.objects.order_by("created_at").select_related("sandbox"))
    total = sum(row.size_bytes for row in rows)
    for found in rows:
        if total <= budget:
            break
        _drop(found)
        total -= found.size_bytes
        record_event(
            found.sandbox, "checkpoint", "Checkpoint dropped to stay within the disk budget"
        )
        dropped += 1
    return dropped


ORPHAN_MIN_AGE = timedelta(minutes=10)


def sweep_orphan_images(now: datetime | None = None) -> int:
    """Delete checkpoint images that no row points to (a worker died between a dump and its
    row, or the sandbox was deleted), once older than ORPHAN_MIN_AGE; return how many. An image
    whose sandbox is starting is left alone: a restore may be reading it."""
    now = now or timezone.now()
    known = set(Checkpoint.objects.values_list("location", flat=True))
    starting = set(Sandbox.objects.filter(state=State.STARTING).values_list("pk", flat=True))
    swept = 0
    backend = get_backend(settings.SANDBOX_BACKEND)
    for location, name, taken in backend.list_checkpoints():
        if location in known or now - taken < ORPHAN_MIN_AGE:
            continue
        if sandbox_id_of(name) in starting:
            continue
        try:
            backend.drop_checkpoint(location)
        except (BackendError, OSError) as exc:
            log.warning("could not delete an orphaned checkpoint image: %s", exc)
            continue
        log.info("deleted an orphaned checkpoint image of %s", name)
        swept += 1
    return swept


def available_memory_mb() -> int:
    """The host's MemAvailable, in MB (a large number if unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return 1 << 30


def _holds_awake(sandbox: Sandbox, now: datetime) -> bool:
    from sandboxes import schedule

    return schedule.holds_awake(sandbox, now)


def candidates() -> QuerySet[Sandbox]:
    """The sandboxes the sleep policy looks at: awake (running or dozing), not the warm pool's,
    longest idle first."""
    from sandboxes.pool import POOL_USERNAME

    return (
        Sandbox.objects.select_related("owner")
        .filter(state__in=[State.RUNNING, State.DOZING])
        .exclude(owner__username=POOL_USERNAME)  # the warm pool stays warm
        .order_by("last_activity_at")
    )


def sleep_idle(now: datetime | None = None) -> dict[str, int]:
    """One pass of the sleep policy over this machine's sandboxes, in this process (beat fans
    it out instead: sandboxes.tasks); return counts of what it did.

    Idle running sandboxes doze, idle dozing ones hibernate, a dozing one on a plan that no
    longer sleeps wakes (:func:`apply_policy`, each sandbox claimed for it), then the host's
    upkeep (:func:`host_upkeep`): under memory pressure or past HERMIT_MAX_DOZING the
    longest-idle dozing ones hibernate early, and checkpoints are kept within their budget.
    """
    now = now or timezone.now()
    counts = {"dozed": 0, "hibernated": 0, "woke": 0}
    for pk in hosts.on_this_host(candidates()).values_list("pk", flat=True):
        with passes.claimed(pk) as mine:
            sandbox = Sandbox.objects.select_related("owner").filter(pk=pk).first()
            if not mine or sandbox is None:
                continue
            outcome = apply_policy(sandbox, now)
        if outcome in counts:
            counts[outcome] += 1
    return {**counts, **host_upkeep(now)}


def apply_policy(sandbox: Sandbox, now: datetime) -> str:
    """Apply the sleep policy to one awake sandbox at ``now``; return what was done:
    ``dozed``, ``hibernated``, ``woke`` (a dozing one whose plan no longer sleeps) or ``""``.
    The caller holds the sandbox's claim (sandboxes.passes)."""
    if sandbox.state not in (State.RUNNING, State.DOZING):
        return ""
    limits = limits_for(sandbox.owner)
    sleep_after = limits.sleeps_after()
    if sleep_after is None:
        return "woke" if sandbox.state == State.DOZING and thaw(sandbox) else ""
    if _holds_awake(sandbox, now):
        return ""
    idle = now - last_active([sandbox])[sandbox.pk]
    doze_idle = doze_after(limits)
    if idle >= sleep_after:
        done = hibernate(sandbox, message="Idle: hibernating", idle_since=now - sleep_after)
        return "hibernated" if done else ""
    if (
        sandbox.state == State.RUNNING
        and doze_idle is not None
        and idle >= doze_idle
        and doze(sandbox, idle_since=now - doze_idle)
    ):
        return "dozed"
    return ""


def host_upkeep(now: datetime | None = None) -> dict[str, int]:
    """This host's share of the sleep policy, after its sandboxes' passes: hibernate early
    under pressure, keep checkpoints within their budget, sweep orphaned images. Return counts
    (``pressure``, ``swept``)."""
    now = now or timezone.now()
    pressure = relieve_pressure()
    enforce_checkpoint_budget(now)
    return {"pressure": pressure, "swept": sweep_orphan_images(now)}


def relieve_pressure() -> int:
    """Hibernate the longest-idle dozing sandboxes while more than HERMIT_MAX_DOZING doze or
    the host has less than HERMIT_DOZE_MIN_AVAILABLE_MB available; return how many. Only this
    host's sandboxes count: memory is per host."""
    done = 0
    here = hosts.on_this_host(Sandbox.objects.filter(state=State.DOZING))
    for sandbox in here.select_related("owner").order_by("last_activity_at"):
        dozing = hosts.on_this_host(Sandbox.objects.filter(state=State.DOZING)).count()
        low = available_memory_mb() < settings.HERMIT_DOZE_MIN_AVAILABLE_MB
        if dozing <= settings.HERMIT_MAX_DOZING and not low:
            break
        why = "Low on memory" if low else "Too many dozing agents"
        if hibernate(sandbox, message=f"{why}: hibernating the longest idle first"):
            done += 1
    return done
