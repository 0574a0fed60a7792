"""Celery tasks: thin, idempotent wrappers that take primary keys and call actions."""

from __future__ import annotations

import contextlib
import logging
from functools import partial
from typing import Any

from celery import shared_task
from django.db import transaction
from django.utils import timezone

from billing.models import plan_for
from sandboxes import actions, pool, schedule, sleep  # noqa: F401 (pool: its tasks)
from sandboxes.backends.base import BackendError
from sandboxes.models import Sandbox

log = logging.getLogger(__name__)
State = Sandbox.State


def _get(sandbox_id: int) -> Sandbox | None:
    return Sandbox.objects.select_related("owner").filter(pk=sandbox_id).first()


@shared_task(acks_late=True)
def provision_sandbox(sandbox_id: int) -> None:
    """Bring a new sandbox up. Does nothing if it is gone or no longer provisioning."""
    sandbox = _get(sandbox_id)
    if sandbox is None or sandbox.state != State.PROVISIONING:
        return
    with contextlib.suppress(actions.TransitionRefused):  # another worker claimed it
        actions.provision_sandbox(sandbox)


def request_provisioning(sandbox: Sandbox, *, actor_user: Any = None) -> bool:
    """Enqueue the sandbox's first start once the current transaction commits, if
    :func:`sandboxes.actions.request_provisioning` says so. Return True if it was enqueued."""
    if not actions.request_provisioning(sandbox, actor_user=actor_user):
        return False
    transaction.on_commit(partial(provision_sandbox.delay, sandbox.pk))
    return True


@shared_task(acks_late=True)
def start_sandbox(sandbox_id: int) -> None:
    """An explicit start (the owner's dashboard button, staff in the admin): allowed during a
    crash back-off once its pause has passed (see sandboxes.actions)."""
    sandbox = _get(sandbox_id)
    if sandbox is None or sandbox.state in (State.RUNNING, State.STARTING):
        return
    try:
        for _ in actions.start_sandbox(sandbox, explicit=True):
            pass
    except actions.TransitionRefused:
        pass


@shared_task(acks_late=True)
def stop_sandbox(sandbox_id: int) -> None:
    sandbox = _get(sandbox_id)
    if sandbox is None or sandbox.state in (State.STOPPED, State.STOPPING):
        return
    with contextlib.suppress(actions.TransitionRefused):
        actions.stop_sandbox(sandbox)


@shared_task(acks_late=True)
def reconcile_sandboxes() -> dict[str, int]:
    """Repair every sandbox whose backend disagrees with the database. Return counts."""
    counts: dict[str, int] = {}
    for sandbox in Sandbox.objects.select_related("owner").exclude(state=State.PROVISIONING):
        try:
            outcome = actions.reconcile_sandbox(sandbox)
        except actions.TransitionRefused:
            outcome = "raced"
        except Exception:
            log.exception("reconcile failed for sandbox %s", sandbox.pk)
            outcome = "error"
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


@shared_task(acks_late=True)
def sleep_idle_sandboxes() -> dict[str, int]:
    """One pass of the sleep policy: idle agents doze, then hibernate (see sandboxes.sleep)."""
    return sleep.sleep_idle()


@shared_task(acks_late=True)
def wake_for_jobs() -> int:
    """Wake sleeping agents shortly before their own next scheduled job is due."""
    return schedule.wake_due(timezone.now())


@shared_task(acks_late=True)
def apply_plan(sandbox_id: int) -> None:
    """A plan change takes effect at once: an agent whose new plan never sleeps wakes now."""
    sandbox = _get(sandbox_id)
    if sandbox is None or plan_for(sandbox.owner).sleeps_after() is not None:
        return
    if sandbox.state in (State.DOZING, State.SLEEPING):
        with contextlib.suppress(actions.TransitionRefused, BackendError):
            for _ in actions.wake_sandbox(sandbox, actor=actions.Actor.SYSTEM):
                pass


@shared_task(acks_late=True)
def restart_sandbox(sandbox_id: int) -> None:
    sandbox = _get(sandbox_id)
    if sandbox is None or sandbox.state in (State.STARTING, State.STOPPING):
        return
    try:
        for _ in actions.restart_sandbox(sandbox):
            pass
    except actions.TransitionRefused:
        pass
