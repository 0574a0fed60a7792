"""Thin Celery wrappers around :mod:`doorbell.actions`; idempotent, safe to run twice.

``deliver_updates`` and ``apply_channels`` take the sandbox's id first, so the router sends
them to the sandbox's host queue (sandboxes.hosts.route_task), where its privileged worker can
wake it. ``requeue_telegram`` runs from beat: updates whose task was lost (a worker killed) or
whose gateway failed are queued again.
"""

from __future__ import annotations

import contextlib

from celery import Task, shared_task

from doorbell import actions
from sandboxes import actions as sandbox_actions
from sandboxes import sleep
from sandboxes.backends.base import BackendError
from sandboxes.models import Sandbox

RETRY_DELAYS = (2, 5, 15, 30)


@shared_task(bind=True, acks_late=True, max_retries=len(RETRY_DELAYS))
def deliver_updates(self: Task, sandbox_id: int) -> int:
    """Deliver the sandbox's pending Telegram updates; return how many went through. A
    transient failure is retried a few times, then left to beat's requeue."""
    outcome = actions.deliver_pending(sandbox_id)
    if outcome.pending and self.request.retries < len(RETRY_DELAYS):
        raise self.retry(countdown=RETRY_DELAYS[self.request.retries])
    return outcome.delivered


@shared_task(acks_late=True)
def requeue_telegram() -> int:
    return actions.requeue_stale()


@shared_task(acks_late=True)
def apply_channels(sandbox_id: int) -> str:
    """A linked or unlinked bot changes the gateway's config: restart an awake gateway with
    it; drop an asleep one's checkpoint so it boots with it (a restore would keep the old)."""
    sandbox = Sandbox.objects.select_related("owner").filter(pk=sandbox_id).first()
    if sandbox is None:
        return "gone"
    with contextlib.suppress(sandbox_actions.TransitionRefused, BackendError):
        if sandbox.state in (Sandbox.State.RUNNING, Sandbox.State.DOZING):
            for _ in sandbox_actions.restart_sandbox(sandbox, keep_activity=True):
                pass
            actions.queue_delivery(sandbox_id)
            return "restarted"
        if sandbox.state == Sandbox.State.SLEEPING:
            sleep.drop_checkpoint(sandbox, "its messenger channels changed")
            return "checkpoint dropped"
    return "unchanged"
