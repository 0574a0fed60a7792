"""Wake sleeping agents for their own scheduled jobs, and keep them up until the job ran.

A dozing (frozen) or sleeping (stopped) gateway fires none of its cron jobs, so before a
sandbox dozes or sleeps the portal stores its next due time (``Sandbox.next_job_at``, read by
:func:`sandboxes.openclaw.cron.next_job_at`). Then:

- :func:`wake_due` (beat, every few seconds) wakes every dozing or sleeping sandbox whose job is
  due within HERMIT_JOB_WAKE_LEAD seconds (default 60: enough for a cold start), or overdue.
  Left alone: sandboxes that are up or waking already, stopped on purpose, failed, in a crash
  back-off, owned by a deactivated account, or on a plan that never sleeps (they never miss a
  job). Each wake runs as its own task, queued once per due time.
- :func:`holds_awake` (the idle policy) keeps such a sandbox up from the lead until the job ran:
  while the job is imminent or just due (HERMIT_JOB_START_GRACE, 30 s, for the scheduler to
  start it), then as long as the gateway reports a job running or one overdue, at most
  HERMIT_JOB_MAX_HOLD (1 h, the scheduler's own watchdog for a run) past the due time. After
  that it may sleep again, and the sleep stores the next due time.

Why a minute ahead: a gateway that boots after a job's due time does not run the missed agent
turn at once (OpenClaw defers overdue agent turns at startup), so the wake must finish before
it; cold boots took 20-45 s on a loaded 2-core host. And OpenClaw re-arms its cron timer at
least every 60 s against the wall clock: a gateway restored from a checkpoint whose timers did
not see the time it slept still fires the job on time if it is back 60 s before.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from celery import shared_task
from django.conf import settings
from django.core.cache import cache
from django.db.models import Q

from sandboxes.backends.base import BackendError
from sandboxes.limits import limits_for
from sandboxes.models import Sandbox, SandboxEvent
from sandboxes.openclaw import cron

log = logging.getLogger(__name__)
State = Sandbox.State

ASLEEP = (State.DOZING, State.SLEEPING)


def wake_lead() -> timedelta:
    return timedelta(seconds=int(getattr(settings, "HERMIT_JOB_WAKE_LEAD", 90)))


def start_grace() -> timedelta:
    return timedelta(seconds=int(getattr(settings, "HERMIT_JOB_START_GRACE", 30)))


def max_hold() -> timedelta:
    return timedelta(seconds=int(getattr(settings, "HERMIT_JOB_MAX_HOLD", 3600)))


def due_for_wake(now: datetime) -> list[Sandbox]:
    """Return the dozing or sleeping sandboxes to wake at ``now`` for their next job."""
    candidates = (
        Sandbox.objects.select_related("owner")
        .filter(
            state__in=ASLEEP,
            next_job_at__isnull=False,
            next_job_at__lte=now + wake_lead(),
            owner__is_active=True,
        )
        .filter(Q(restart_after__isnull=True) | Q(restart_after__lte=now))
        .order_by("next_job_at")
    )
    return [s for s in candidates if limits_for(s.owner).sleeps_after() is not None]


def wake_due(now: datetime) -> int:
    """Wake the sandboxes whose next job is due within the lead (see the module docstring).

    Queues one wake task per sandbox and due time (a wake still queued or starting is not
    queued again on the next beat). Return how many wakes were queued.
    """
    queued = 0
    for sandbox in due_for_wake(now):
        assert sandbox.next_job_at is not None
        key = f"hermit:job-wake:{sandbox.pk}:{int(sandbox.next_job_at.timestamp())}"
        ttl = int(wake_lead().total_seconds()) + int(start_grace().total_seconds())
        if not cache.add(key, 1, timeout=max(ttl, 60)):
            continue  # queued by an earlier beat; its wake is on the way
        log.info("sandbox %s: waking for its job due at %s", sandbox.pk, sandbox.next_job_at)
        try:
            wake_for_job.delay(sandbox.pk, sandbox.next_job_at.isoformat())
        except Exception:
            cache.delete(key)  # try again on the next beat
            log.exception("sandbox %s: could not queue its wake for a job", sandbox.pk)
            continue
        queued += 1
    return queued


@shared_task(acks_late=True)
def wake_for_job(sandbox_id: int, due: str = "") -> str:
    """Wake one sandbox for its scheduled job (``due``, ISO, for the logs). Return the outcome:
    ``woken``, ``gone``, ``not-asleep`` (someone else woke it or it changed meanwhile) or
    ``failed`` (logged; the sandbox's state and events say why)."""
    from sandboxes import actions

    sandbox = Sandbox.objects.select_related("owner").filter(pk=sandbox_id).first()
    if sandbox is None:
        return "gone"
    if sandbox.state not in ASLEEP:
        return "not-asleep"
    try:
        for _ in actions.wake_sandbox(sandbox, actor=SandboxEvent.Actor.SYSTEM):
            pass
    except BackendError as exc:
        log.warning("sandbox %s: the wake for its job due at %s failed: %s", sandbox_id, due, exc)
        return "failed"
    return "woken"


def holds_awake(sandbox: Sandbox, now: datetime) -> bool:
    """Return True if the idle policy must not doze or sleep ``sandbox`` at ``now``.

    True from HERMIT_JOB_WAKE_LEAD before its stored next job until the scheduler had
    HERMIT_JOB_START_GRACE to start it, then while its gateway reports a job running or one due
    and not started yet, up to HERMIT_JOB_MAX_HOLD past the due time. False otherwise, also
    when the gateway cannot be asked (logged), so a broken gateway never keeps a sandbox up.
    A dozing sandbox's gateway is frozen and cannot be asked: only its stored time counts.
    Once the gateway said the job is over, that is remembered (cache) for this due time, so
    the policy's passes over an awake sandbox do not ask again.
    """
    due = sandbox.next_job_at
    if due is None or now < due - wake_lead():
        return False
    if now < due + start_grace():
        return True
    if now >= due + max_hold() or sandbox.state != State.RUNNING:
        return False
    done_key = f"hermit:job-done:{sandbox.pk}:{int(due.timestamp())}"
    if cache.get(done_key):
        return False  # the gateway said so already: not asked again on every pass
    try:
        status = cron.read_status(sandbox, with_running=True)
    except cron.CronUnavailable as exc:
        log.warning("sandbox %s: could not ask whether its job ran: %s", sandbox.pk, exc)
        return False
    overdue = status.next_wake_at is not None and status.next_wake_at <= now
    if status.running or overdue:
        return True
    cache.set(done_key, 1, timeout=int(max_hold().total_seconds()))
    return False
