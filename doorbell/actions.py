"""The only writers of Telegram links and queued updates.

* :func:`connect` checks a bot token with Telegram (``getMe``), stores it encrypted and points
  the bot's webhook at the portal (``setWebhook`` with a random secret token).
  :func:`disconnect` removes the webhook and the link (and its queued updates). Either way the
  sandbox's gateway is restarted with the new config once the change commits
  (:func:`doorbell.tasks.apply_channels`).
* :func:`accept_update` stores one update from Telegram, once: a second copy of the same
  ``update_id`` is dropped by the unique constraint (``INSERT ... ON CONFLICT DO NOTHING``).
  The delivery task is queued after the commit.
* :func:`deliver_pending` hands a link's pending updates to the agent's gateway in ``update_id``
  order, each in its own transaction that holds the link's row lock, so two workers never
  deliver the same link's updates at once: the second one finds the lock taken and leaves.
  A row is marked delivered only after the gateway accepted it, in the same transaction. See
  :mod:`doorbell.delivery` for what happens if a worker dies between the two.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

from django.conf import settings
from django.db import transaction
from django.urls import reverse
from django.utils import timezone

from doorbell import delivery, telegram
from doorbell.models import TelegramLink, TelegramUpdate
from sandboxes import actions as sandbox_actions
from sandboxes.backends.base import BackendError
from sandboxes.models import Sandbox

log = logging.getLogger(__name__)
State = Sandbox.State


def webhook_url(link: TelegramLink) -> str:
    path = reverse("telegram-webhook", args=[link.webhook_id])
    return f"{settings.SITE_URL}{path}"


def connect(sandbox: Sandbox, token: str) -> TelegramLink:
    """Link the bot whose token is ``token`` to ``sandbox`` (replacing any bot linked before).
    Raise TelegramError with a message for the user if Telegram refuses the token or the
    webhook; nothing is stored then."""
    token = token.strip()
    me = telegram.get_me(token)
    old = TelegramLink.objects.filter(sandbox=sandbox).first()
    link = TelegramLink(
        sandbox=sandbox, bot_token=token, bot_id=int(me["id"]), bot_username=me.get("username", "")
    )
    telegram.set_webhook(token, webhook_url(link), link.secret)
    link.webhook_set_at = timezone.now()
    with transaction.atomic():
        if old is not None:
            old.delete()
        link.save()
        transaction.on_commit(partial(_apply, sandbox.pk))
    if old is not None and old.bot_token != token:
        _drop_webhook(old)
    log.info("sandbox %s: Telegram bot @%s linked", sandbox.pk, link.bot_username)
    return link


def disconnect(link: TelegramLink) -> None:
    """Remove the bot's webhook (best effort: a revoked token cannot) and the link."""
    _drop_webhook(link)
    sandbox_id = link.sandbox_id
    with transaction.atomic():
        link.delete()
        transaction.on_commit(partial(_apply, sandbox_id))
    log.info("sandbox %s: Telegram bot unlinked", sandbox_id)


def _drop_webhook(link: TelegramLink) -> None:
    try:
        telegram.delete_webhook(link.bot_token)
    except telegram.TelegramError as exc:
        log.warning("sandbox %s: could not remove the Telegram webhook: %s", link.sandbox_id, exc)


def _apply(sandbox_id: int) -> None:
    from doorbell import tasks

    try:
        tasks.apply_channels.delay(sandbox_id)
    except Exception:
        log.warning("sandbox %s: could not queue the channel config change", sandbox_id)


def sender_of(update: dict[str, Any]) -> int | None:
    """The Telegram user id who sent the update's message, or None (not a message)."""
    message = delivery.message_of(update)
    sender = (message or {}).get("from") or {}
    user_id = sender.get("id") if isinstance(sender, dict) else None
    return user_id if isinstance(user_id, int) and not isinstance(user_id, bool) else None


def accept_update(link: TelegramLink, update: dict[str, Any]) -> str:
    """Take one update from Telegram for ``link``; return what became of it:

    * "stored": from a paired account; kept unless that ``update_id`` is stored already
      (``INSERT ... ON CONFLICT DO NOTHING``: Telegram's re-sends and replays are dropped
      here), and its delivery queued once that commits (a delivery with nothing pending does
      nothing);
    * "paired": ``/start <pairing code>`` from a new account, which may write to the agent
      from now on (the command itself is not passed on);
    * "ignored": anything else (a stranger, or not a message). Nothing is kept and the agent
      is not woken: a public bot cannot be used to wake or reach someone's agent.
    """
    sender = sender_of(update)
    if sender is None:
        return "ignored"
    if sender not in link.allowed_user_ids:
        message = delivery.message_of(update) or {}
        if str(message.get("text", "")).strip() == f"/start {link.pairing_code}":
            return "paired" if pair(link, sender) else "ignored"
        log.info("sandbox %s: Telegram message from an unpaired account dropped", link.sandbox_id)
        return "ignored"
    row = TelegramUpdate(
        link=link, sandbox_id=link.sandbox_id, update_id=update["update_id"], payload=update
    )
    with transaction.atomic():
        TelegramUpdate.objects.bulk_create([row], ignore_conflicts=True)
        transaction.on_commit(partial(queue_delivery, link.sandbox_id))
    return "stored"


def pair(link: TelegramLink, user_id: int) -> bool:
    """Allow the Telegram account ``user_id`` to reach ``link``'s agent; False if the link
    is gone."""
    with transaction.atomic():
        locked = TelegramLink.objects.select_for_update().filter(pk=link.pk).first()
        if locked is None:
            return False
        if user_id not in locked.allowed_user_ids:
            locked.allowed_user_ids = [*locked.allowed_user_ids, user_id]
            locked.save(update_fields=["allowed_user_ids"])
    link.allowed_user_ids = locked.allowed_user_ids
    log.info("sandbox %s: a Telegram account was paired", link.sandbox_id)
    return True


def queue_delivery(sandbox_id: int) -> None:
    """Queue the delivery task for the sandbox. A broker outage loses nothing: the rows stay
    pending and :func:`requeue_stale` queues them again."""
    from doorbell import tasks

    try:
        tasks.deliver_updates.delay(sandbox_id)
    except Exception:
        log.warning("sandbox %s: could not queue Telegram delivery; beat retries", sandbox_id)


@dataclass(frozen=True)
class Outcome:
    delivered: int = 0
    pending: bool = False  # some update is still waiting (a transient failure: retry later)
    busy: bool = False  # another worker holds the link


def deliver_pending(sandbox_id: int) -> Outcome:
    """Wake the sandbox if it sleeps and deliver its link's pending updates in order."""
    if not TelegramUpdate.objects.filter(sandbox_id=sandbox_id, delivered_at=None).exists():
        return Outcome()
    sandbox = Sandbox.objects.select_related("owner").filter(pk=sandbox_id).first()
    if sandbox is None:
        return Outcome()
    if sandbox.state != State.RUNNING:
        try:
            for _ in sandbox_actions.wake_sandbox(sandbox, actor=sandbox_actions.Actor.SYSTEM):
                pass
        except BackendError as exc:
            _note_failure(sandbox_id, f"the agent could not wake: {exc}")
            return Outcome(pending=True)
        sandbox.refresh_from_db()
    delivered = 0
    while True:
        step = _deliver_next(sandbox)
        if step is None:
            return Outcome(delivered)
        if step == "busy":
            return Outcome(delivered, busy=True)
        if step == "retry":
            return Outcome(delivered, pending=True)
        delivered += 1
        sandbox_actions.record_activity(sandbox)


def _deliver_next(sandbox: Sandbox) -> str | None:
    """Deliver the link's lowest pending update under the link's lock. Return "done",
    "retry" (it is still pending), "busy" (another worker holds the link), or None when
    nothing is pending."""
    with transaction.atomic():
        link = (
            TelegramLink.objects.select_for_update(skip_locked=True)
            .filter(sandbox_id=sandbox.pk)
            .first()
        )
        if link is None:
            exists = TelegramLink.objects.filter(sandbox_id=sandbox.pk).exists()
            return "busy" if exists else None
        row = (
            TelegramUpdate.objects.select_for_update()
            .filter(link=link, delivered_at=None)
            .order_by("update_id")
            .first()
        )
        if row is None:
            return None
        row.attempts += 1
        result = delivery.deliver(sandbox, link, row)
        row.last_error = result.error
        if result.accepted:
            row.delivered_at = timezone.now()
        row.save(update_fields=["attempts", "last_error", "delivered_at"])
        return "done" if result.accepted else "retry"


def _note_failure(sandbox_id: int, error: str) -> None:
    TelegramUpdate.objects.filter(sandbox_id=sandbox_id, delivered_at=None).update(
        last_error=error[:500]
    )


def requeue_stale(older_than: timedelta | None = None) -> int:
    """Queue delivery for every sandbox with an update pending longer than ``older_than``
    (default HERMIT_TELEGRAM_REQUEUE_AFTER seconds): its task was lost with a worker, or its
    gateway failed. Return how many sandboxes were queued."""
    age = timedelta(seconds=settings.HERMIT_TELEGRAM_REQUEUE_AFTER)
    if older_than is not None:
        age = older_than
    ids = list(
        TelegramUpdate.objects.filter(delivered_at=None, received_at__lt=timezone.now() - age)
        .values_list("sandbox_id", flat=True)
        .distinct()
    )
    for sandbox_id in ids:
        queue_delivery(sandbox_id)
    return len(ids)
