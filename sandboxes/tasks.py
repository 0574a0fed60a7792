"""Celery tasks: thin, idempotent wrappers that take primary keys and call actions."""

from __future__ import annotations

import contextlib
import logging
from datetime import datetime
from functools import partial
from typing import Any

from celery import Task, shared_task
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from sandboxes import (  # noqa: F401
    actions,
    fencing,
    hosts,
    passes,
    pool,
    relocation,
    schedule,
    sleep,
)
from sandboxes.backends.base import BackendError
from sandboxes.events import record_event
from sandboxes.limits import limits_for
from sandboxes.models import Sandbox, SandboxHost

log = logging.getLogger(__name__)
State = Sandbox.State


def _get(sandbox_id: int) -> Sandbox | None:
    return Sandbox.objects.select_related("owner").filter(pk=sandbox_id).first()


@shared_task(bind=True, acks_late=True)
def provision_sandbox(self: Task, sandbox_id: int) -> None:
    """Bring a new sandbox up. Does nothing if it is gone or no longer provisioning.

    A sandbox not placed yet (queued before hosts, or by a path that did not place it) is
    placed first; if that puts it on another host, the task is sent on to that host's queue."""
    sandbox = _get(sandbox_id)
    if sandbox is None or sandbox.state != State.PROVISIONING:
        return
    if sandbox.host_id is None:
        if not _placed(sandbox):
            return
        if not self.request.is_eager and not hosts.is_here(sandbox):
            provision_sandbox.delay(sandbox.pk)  # routed to its host now
            return
    with contextlib.suppress(actions.TransitionRefused):  # another worker claimed it
        actions.provision_sandbox(sandbox)


def _placed(sandbox: Sandbox) -> bool:
    """Place the sandbox on a host (sandboxes.hosts.place); return False, with an event the
    dashboard shows, if no host has room."""
    try:
        hosts.place(sandbox)
    except hosts.NoRoom as exc:
        log.warning("sandbox %s: %s", sandbox.pk, exc)
        record_event(
            sandbox,
            "placement",
            "Every machine is full right now, so your agent cannot start yet; it is tried "
            "again in a few minutes.",
        )
        return False
    return True


def request_provisioning(sandbox: Sandbox, *, actor_user: Any = None) -> bool:
    """Enqueue the sandbox's first start once the current transaction commits, if
    :func:`sandboxes.actions.request_provisioning` says so and a host has room for it (it is
    placed first, so the task goes to that host's queue). Return True if it was enqueued."""
    if not actions.request_provisioning(sandbox, actor_user=actor_user):
        return False
    if not _placed(sandbox):
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


# -- reconcile and sleep: fanned out, one task per sandbox on its host's queue -----------------


def _fan_out(task: Any, ids: list[int], expires: float) -> dict[str, int]:
    """Queue ``task`` once per sandbox (each routed to its sandbox's host queue); a message
    still queued after ``expires`` seconds is dropped (the next beat sends a fresh one)."""
    queued = 0
    for pk in ids:
        try:
            task.apply_async((pk,), expires=expires)
        except Exception:
            log.exception("could not queue %s for sandbox %s", task.name, pk)
            continue
        queued += 1
    return {"queued": queued}


def _reconcile_ids() -> list[int]:
    awake = Sandbox.objects.exclude(state=State.PROVISIONING)
    return list(awake.order_by("pk").values_list("pk", flat=True))


@shared_task(bind=True, acks_late=True)
def reconcile_sandboxes(self: Task) -> dict[str, int]:
    """Repair every sandbox whose backend disagrees with the database.

    Run by a worker (beat): queue :func:`reconcile_one` for each sandbox on its host's queue;
    return ``{"queued": n}``. Called directly (tests, a shell): reconcile this machine's
    sandboxes here, one claimed at a time, and return counts of the outcomes."""
    if not self.request.called_directly:
        return _fan_out(reconcile_one, _reconcile_ids(), settings.HERMIT_RECONCILE_INTERVAL)
    counts: dict[str, int] = {}
    here = hosts.on_this_host(Sandbox.objects.exclude(state=State.PROVISIONING))
    for pk in here.order_by("pk").values_list("pk", flat=True):
        passes.tally(counts, reconcile_one(pk))
    return counts


@shared_task(acks_late=True)
def reconcile_one(sandbox_id: int) -> str:
    """Reconcile one sandbox (sandboxes.actions.reconcile_sandbox) under its claim; return the
    outcome, ``claimed`` if another pass holds it, ``gone`` if it no longer exists."""
    with passes.claimed(sandbox_id) as mine:
        if not mine:
            return passes.BUSY if Sandbox.objects.filter(pk=sandbox_id).exists() else "gone"
        sandbox = _get(sandbox_id)
        if sandbox is None or sandbox.state == State.PROVISIONING:
            return "gone" if sandbox is None else "pending"
        try:
            return actions.reconcile_sandbox(sandbox)
        except actions.TransitionRefused:
            return "raced"
        except Exception:
            log.exception("reconcile failed for sandbox %s", sandbox_id)
            return "error"


@shared_task(bind=True, acks_late=True)
def sleep_idle_sandboxes(self: Task) -> dict[str, int]:
    """One pass of the sleep policy: idle agents doze, then hibernate (see sandboxes.sleep).

    Run by a worker (beat): queue :func:`sleep_one` for each awake sandbox on its host's queue,
    then :func:`sleep_upkeep` on each live host's; return ``{"queued": n, "hosts": m}``.
    Called directly: the whole pass over this machine's sandboxes, here (sleep.sleep_idle)."""
    if not self.request.called_directly:
        return _fan_out_sleep()
    return sleep.sleep_idle()


SLEEP_INTERVAL = 15  # the beat schedule's: a fanned-out message older than that is dropped


def _fan_out_sleep() -> dict[str, int]:
    ids = list(sleep.candidates().values_list("pk", flat=True))
    counts = _fan_out(sleep_one, ids, SLEEP_INTERVAL)
    now = timezone.now().isoformat()
    live = hosts.live_hosts()
    for host in live:
        sleep_upkeep.apply_async((now,), queue=hosts.queue_for(host.name), expires=SLEEP_INTERVAL)
    return {**counts, "hosts": len(live)}


@shared_task(acks_late=True)
def sleep_one(sandbox_id: int, now: str | None = None) -> str:
    """The sleep policy for one sandbox (sleep.apply_policy) under its claim; return what it
    did (``dozed``, ``hibernated``, ``woke``, ``""``), or ``claimed`` / ``gone``."""
    moment = datetime.fromisoformat(now) if now else timezone.now()
    with passes.claimed(sandbox_id) as mine:
        sandbox = _get(sandbox_id)
        if sandbox is None:
            return "gone"
        if not mine:
            return passes.BUSY
        return sleep.apply_policy(sandbox, moment)


@shared_task(acks_late=True)
def sleep_upkeep(now: str | None = None) -> dict[str, int]:
    """A host's share of the sleep pass (sleep.host_upkeep), on that host's queue."""
    return sleep.host_upkeep(datetime.fromisoformat(now) if now else None)


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
    limits = limits_for(sandbox.owner)
    with contextlib.suppress(actions.TransitionRefused, BackendError):
        if sandbox.state == State.STARTING:  # it may have read the old plan: follow it to its end
            for _ in actions.wake_sandbox(sandbox, actor=actions.Actor.SYSTEM):
                pass
            sandbox.refresh_from_db()
        if sandbox.state in (State.RUNNING, State.DOZING) and not actions.started_with(
            sandbox, limits.resources()
        ):
            record_event(sandbox, "plan", f"Restarting your agent with the {limits.plan_name} plan")
            for _ in actions.restart_sandbox(sandbox, keep_activity=True):
                pass
            return
        if sandbox.state == State.SLEEPING:
            why = f"moved to the {limits.plan_name} plan; it starts afresh"
            sleep.drop_checkpoint(sandbox, why)
        if limits.sleeps_after() is None and sandbox.state in (State.DOZING, State.SLEEPING):
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


# -- sandbox hosts (sandboxes.hosts, sandboxes.relocation) -------------------------------------


@shared_task(acks_late=True)
def move_off_host(sandbox_id: int) -> str:
    """Move an idle sandbox off its draining host (on that host's queue, where its data is);
    return the outcome (sandboxes.relocation.move_idle)."""
    sandbox = _get(sandbox_id)
    if sandbox is None:
        return "gone"
    with passes.claimed(sandbox_id) as mine:
        if not mine:
            return passes.BUSY
        return relocation.move_idle(sandbox)


@shared_task(acks_late=True)
def check_hosts() -> dict[str, int]:
    """Beat: mark hosts that missed their heartbeats lost and move their sandboxes to other
    hosts; queue the moves of draining hosts' idle sandboxes. Return counts."""
    counts = {"lost": len(relocation.mark_lost()), "relocated": 0, "no-room": 0, "moves": 0}
    for host in SandboxHost.objects.filter(state=SandboxHost.State.LOST).distinct():
        done = relocation.relocate_lost(host)
        counts["relocated"] += done["moved"]
        counts["no-room"] += done["no-room"]
    for host in SandboxHost.objects.filter(state=SandboxHost.State.DRAINING):
        counts["moves"] += queue_moves(host)
    return counts


@shared_task(acks_late=True)
def fence_host() -> dict[str, int]:
    """On a lost host that came back (queued on its own queue by its heartbeat): stop and
    remove what was moved away from it (sandboxes.fencing). Return counts."""
    return fencing.fence()


def queue_moves(host: SandboxHost) -> int:
    """Queue the move of every idle sandbox of a draining host; return how many."""
    return _fan_out(move_off_host, relocation.movable(host), 60)["queued"]
