"""Acting on users' accounts: suspend, unsuspend, delete (by staff, or by the user).

Suspend: a :class:`~sandboxes.models.Suspension` row is written at once, so from that moment
no start of the user's sandboxes is allowed (:func:`sandboxes.actions.start_sandbox` refuses
with the reason), the AI gateway refuses their credential, and chat says why
(:func:`suspension_notice`); then a stop of each sandbox is queued. Unsuspend deletes the row;
the sandboxes stay stopped until the user (or staff) starts them.

Delete: an :class:`~sandboxes.models.AccountDeletion` row records who asked and when, the
account is deactivated at once (no sign-in, no start, no model call), and a stop of each sandbox
is queued. Once HERMIT_DELETE_GRACE_DAYS have passed, :func:`purge_account` (run by beat, or at
once when the grace is 0) stops what still runs and removes the sandboxes' data dirs,
checkpoints and the user row with everything that hangs off it: sandboxes, secrets (gateway
tokens, device keys, AI credential, provider keys), backup repositories (purged by
sandboxes.signals once the deletion commits) and exports. Until then staff may cancel it.

Every step is recorded as a SandboxEvent on each of the user's sandboxes, naming who did it.
All functions are idempotent: a second suspend, delete or purge changes nothing.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import timedelta
from functools import partial
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.dispatch import Signal
from django.utils import timezone

from sandboxes import sleep
from sandboxes.events import record_event
from sandboxes.models import AccountDeletion, Sandbox, SandboxEvent, Suspension

log = logging.getLogger(__name__)
Actor = SandboxEvent.Actor
PURGE_CLAIM = timedelta(minutes=30)  # a purge whose worker died is taken again after this


def suspension_notice(user: Any) -> str:
    """Return what to tell a suspended user about their agent, or "" if not suspended."""
    found = Suspension.objects.filter(user_id=user.pk).values_list("reason", flat=True).first()
    if found is None:
        return ""
    reason = f" Reason: {found}" if found else ""
    return f"Your account is suspended, so your agent cannot run.{reason} Contact support."


def _record(user: Any, kind: str, message: str, by: Any) -> list[int]:
    """Record one event on each of ``user``'s sandboxes; return their pks."""
    actor = Actor.USER if by is not None and by.pk == user.pk else Actor.STAFF
    if by is None:
        actor = Actor.SYSTEM
    ids = []
    for sandbox in Sandbox.objects.filter(owner=user):
        record_event(sandbox, kind, message, actor=actor, actor_user=by)
        ids.append(sandbox.pk)
    return ids


def _queue_stops(sandbox_ids: list[int]) -> None:
    from sandboxes import tasks

    for pk in sandbox_ids:
        transaction.on_commit(partial(tasks.stop_sandbox.delay, pk))


@transaction.atomic
def suspend_user(user: Any, *, by: Any, reason: str = "") -> bool:
    """Suspend ``user``; return False if they already were (nothing changes then)."""
    _, created = Suspension.objects.get_or_create(
        user=user, defaults={"reason": reason[:500], "suspended_by": by}
    )
    if not created:
        return False
    why = f": {reason}" if reason else ""
    _queue_stops(_record(user, "suspended", f"Account suspended by {by}{why}", by))
    return True


@transaction.atomic
def unsuspend_user(user: Any, *, by: Any) -> bool:
    """Lift ``user``'s suspension; return False if they were not suspended."""
    if not Suspension.objects.filter(user=user).delete()[0]:
        return False
    _record(user, "unsuspended", f"Suspension lifted by {by}", by)
    return True


# Sent (inside request_deletion's transaction) when a deletion is first requested, with
# ``user`` and ``by``: other apps end what the user can no longer manage (billing cancels the
# Stripe subscription) without sandboxes importing them.
deletion_requested = Signal()


def grace() -> timedelta:
    return timedelta(days=settings.HERMIT_DELETE_GRACE_DAYS)


@transaction.atomic
def request_deletion(user: Any, *, by: Any) -> AccountDeletion:
    """Deactivate ``user``, stop their sandboxes and schedule the purge of their data after
    the grace period; return the deletion (the existing one if it was asked for already)."""
    now = timezone.now()
    by_owner = by is not None and by.pk == user.pk
    deletion, created = AccountDeletion.objects.get_or_create(
        user=user,
        defaults={
            "user_pk": user.pk,
            "email": user.email,
            "requested_at": now,
            "requested_by": by,
            "by_owner": by_owner,
            "purge_after": now + grace(),
        },
    )
    if not created:
        return deletion
    get_user_model().objects.filter(pk=user.pk).update(is_active=False)
    user.is_active = False
    who = "its owner" if by_owner else str(by)
    when = f"{deletion.purge_after:%Y-%m-%d %H:%M} UTC"
    message = f"Account deletion requested by {who}; its data goes after {when}"
    _queue_stops(_record(user, "deletion-requested", message, by))
    deletion_requested.send(sender=AccountDeletion, user=user, by=by)
    if deletion.purge_after <= now:
        from sandboxes import tasks

        transaction.on_commit(partial(tasks.purge_account.delay, deletion.pk))
    return deletion


@transaction.atomic
def cancel_deletion(deletion: AccountDeletion, *, by: Any) -> bool:
    """Cancel a deletion not yet purged (or being purged): reactivate the account."""
    user = deletion.user
    claimed = AccountDeletion.objects.filter(
        pk=deletion.pk, purge_started_at__isnull=True, purged_at__isnull=True
    ).delete()[0]
    if not claimed or user is None:
        return False
    get_user_model().objects.filter(pk=user.pk).update(is_active=True)
    _record(user, "deletion-cancelled", f"Account deletion cancelled by {by}", by)
    return True


def due_deletions() -> list[int]:
    """Return the pks of deletions whose grace period is over and that are not purged."""
    stale = timezone.now() - PURGE_CLAIM
    rows = AccountDeletion.objects.filter(purge_after__lte=timezone.now(), purged_at__isnull=True)
    rows = rows.exclude(purge_started_at__gt=stale)
    return list(rows.values_list("pk", flat=True))


def purge_account(deletion_id: int) -> bool:
    """Remove a deleted account's data, backups and secrets once its grace period is over;
    return True if this call did it.

    Claimed with a conditional UPDATE, so two workers never purge one account; a claim older
    than PURGE_CLAIM (its worker died) is taken over. Raises OSError if a data dir cannot be
    removed (the claim then lapses and a later run tries again)."""
    now = timezone.now()
    claimed = (
        AccountDeletion.objects.filter(
            pk=deletion_id, purge_after__lte=now, purged_at__isnull=True, user__isnull=False
        )
        .exclude(purge_started_at__gt=now - PURGE_CLAIM)
        .update(purge_started_at=now)
    )
    if not claimed:
        return False
    deletion = AccountDeletion.objects.select_related("user").get(pk=deletion_id)
    user = deletion.user
    assert user is not None  # claimed only with a user
    for sandbox in Sandbox.objects.filter(owner=user):
        _clear_sandbox(sandbox)
    with transaction.atomic():
        get_user_model().objects.filter(pk=user.pk).delete()  # cascades (module docstring)
        AccountDeletion.objects.filter(pk=deletion_id).update(purged_at=timezone.now())
    log.info("account %s purged (deletion %s)", deletion.user_pk, deletion_id)
    return True


def _clear_sandbox(sandbox: Sandbox) -> None:
    """Stop whatever still runs of the sandbox and remove its checkpoint and data dir."""
    from sandboxes import actions

    if sandbox.state not in (Sandbox.State.STOPPED, Sandbox.State.PROVISIONING):
        with contextlib.suppress(actions.TransitionRefused):
            actions.stop_sandbox(sandbox, to=Sandbox.State.STOPPED)
    if sandbox.backend_state:  # whatever the state says, nothing may keep running
        backend = actions.get_backend(sandbox.backend)
        backend.stop(actions.spec_for(sandbox), sandbox.backend_state)
    sleep.drop_checkpoint(sandbox)
    actions.get_backend(sandbox.backend).remove_volume(sandbox.pk)
