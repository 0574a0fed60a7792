"""Every new user starts on the default plan; a user whose account deletion is requested
(``sandboxes.accounts.deletion_requested``) has their Stripe subscription cancelled at once,
by a task queued once the deletion commits (and retried by the reconcile task, and once more
as the purge deletes the account's row).

A plan change applies at once: sandboxes are told that the owner's limits changed
(``sandboxes.limits.limits_changed``), so an agent whose new plan never sleeps is woken (and
from then on never dozes), and one moved to a plan that sleeps sleeps on that plan's schedule."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models.signals import post_save, pre_delete, pre_save
from django.dispatch import receiver

from billing.models import Account, default_plan
from sandboxes.accounts import deletion_requested
from sandboxes.limits import limits_changed


@receiver(post_save, sender=settings.AUTH_USER_MODEL)
def create_account(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
    if created and not kwargs.get("raw"):  # not while loading fixtures
        Account.objects.get_or_create(user=instance, defaults={"plan": default_plan()})


@receiver(deletion_requested)
def cancel_subscription_on_deletion(sender: Any, user: Any, **kwargs: Any) -> None:
    from billing import subscriptions, tasks

    account_id = subscriptions.request_cancel_for_deletion(user)
    if account_id is not None:
        transaction.on_commit(lambda: tasks.cancel_subscriptions.delay(account_id))


@receiver(pre_delete, sender=Account)
def cancel_subscription_before_purge(sender: Any, instance: Account, **kwargs: Any) -> None:
    from billing import subscriptions

    subscriptions.cancel_before_purge(instance)


@receiver(pre_save, sender=Account)
def remember_plan(sender: Any, instance: Account, **kwargs: Any) -> None:
    if instance.pk and not kwargs.get("raw"):
        old = Account.objects.filter(pk=instance.pk).values_list("plan_id", flat=True).first()
        instance._hermit_old_plan_id = old  # type: ignore[attr-defined]


@receiver(post_save, sender=Account)
def apply_plan_change(sender: Any, instance: Account, created: bool, **kwargs: Any) -> None:
    old = getattr(instance, "_hermit_old_plan_id", None)
    if created or kwargs.get("raw") or old is None or old == instance.plan_id:
        return
    limits_changed(instance.user)
