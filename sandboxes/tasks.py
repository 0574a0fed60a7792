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
from sandboxes.events import record_event
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
    """A plan change takes effect at once. A running or dozing agent started with other limits
    (memory, CPU, processes, internet) is restarted with the new plan's, through the restart
    action (its progress shows in the chat): a thaw would keep the old cgroup and network. An
    agent whose new plan never sleeps is woken. An asleep agent's checkpoint is dropped, so it
    boots cold with the new plan's spec: a restore would bring back the old plan's memory use
    and network setup (the local backend keeps the run dir's resolv.conf). A start under way
    is followed to its end first, since it may have read the old plan."""
    sandbox = _get(sandbox_id)
    if sandbox is None:
        return
    plan = plan_for(sandbox.owner)
    with contextlib.suppress(actions.TransitionRefused, BackendError):
        if sandbox.state == State.STARTING:  # it may have read the old plan: follow it to its end
            for _ in actions.wake_sandbox(sandbox, actor=actions.Actor.SYSTEM):
                pass
            sandbox.refresh_from_db()
        if sandbox.state in (State.RUNNING, State.DOZING) and not actions.started_with(
            sandbox, plan.limits()
        ):
            record_event(sandbox, "plan", f"Restarting your agent with the {plan.name} plan")
            for _ in actions.restart_sandbox(sandbox, keep_activity=True):
                pass
            return
        if sandbox.state == State.SLEEPING:
            sleep.drop_checkpoint(sandbox, f"moved to the {plan.name} plan; it starts afresh")
        if plan.sleeps_after() is None and sandbox.state in (State.DOZING, State.SLEEPING):
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


# -- staff actions from the admin (sandboxes.admin): each records its result as an event -------


def _staff(staff_id: int | None) -> Any:
    from django.contrib.auth import get_user_model

    return get_user_model().objects.filter(pk=staff_id).first() if staff_id else None


def _result(sandbox: Sandbox, staff: Any, message: str) -> None:
    record_event(sandbox, "staff-result", message, actor=actions.Actor.STAFF, actor_user=staff)


@shared_task(acks_late=True)
def sleep_sandbox(sandbox_id: int, staff_id: int | None = None) -> str:
    """Put a running or dozing sandbox to sleep; record how. Nothing to do otherwise."""
    sandbox = _get(sandbox_id)
    if sandbox is None:
        return "gone"
    staff = _staff(staff_id)
    if sandbox.state not in (State.RUNNING, State.DOZING):
        _result(sandbox, staff, f"Sleep: nothing to do, it is {sandbox.state}")
        return "nothing"
    how = actions.sleep_sandbox(sandbox, actor=actions.Actor.STAFF)
    sandbox.refresh_from_db()
    done = {"checkpointed": "asleep, checkpointed", "stopped": "asleep, stopped (boots cold)"}
    _result(sandbox, staff, f"Sleep: {done.get(how, f'not done, it is {sandbox.state}')}")
    return how or "nothing"


@shared_task(acks_late=True)
def wake_sandbox(sandbox_id: int, staff_id: int | None = None) -> str:
    """Make sure the sandbox runs (thaw, restore or start it); record the outcome."""
    sandbox = _get(sandbox_id)
    if sandbox is None:
        return "gone"
    staff = _staff(staff_id)
    try:
        for _ in actions.wake_sandbox(sandbox, actor=actions.Actor.STAFF, actor_user=staff):
            pass
    except BackendError as exc:
        _result(sandbox, staff, f"Wake failed: {exc}")
        return "failed"
    _result(sandbox, staff, "Wake: running")
    return "running"


@shared_task(acks_late=True)
def move_sandbox(sandbox_id: int, runtime_id: int, staff_id: int | None = None) -> str:
    """Move the sandbox to a runtime image (restarting it if it runs); record the outcome."""
    from sandboxes import staff as staff_actions
    from sandboxes.models import RuntimeImage

    sandbox = _get(sandbox_id)
    image = RuntimeImage.objects.filter(pk=runtime_id).first()
    if sandbox is None or image is None:
        return "gone"
    staff = _staff(staff_id)
    outcome = staff_actions.move_to_runtime(sandbox, image, actor_user=staff)
    _result(sandbox, staff, f"Move to {image}: {outcome}")
    return outcome


@shared_task(acks_late=True)
def purge_account(deletion_id: int) -> bool:
    """Remove a deleted account's data once its grace period is over (sandboxes.accounts)."""
    from sandboxes import accounts

    return accounts.purge_account(deletion_id)


@shared_task(acks_late=True)
def purge_deleted_accounts() -> int:
    """Purge every deleted account whose grace period is over; return how many."""
    from sandboxes import accounts

    done = 0
    for pk in accounts.due_deletions():
        try:
            done += accounts.purge_account(pk)
        except Exception:
            log.exception("purging deleted account %s failed", pk)
    return done
