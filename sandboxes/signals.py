"""Sign-up creates the user's sandbox; a confirmed email address provisions it."""

from __future__ import annotations

from functools import partial
from typing import Any

from allauth.account.signals import email_confirmed
from django.conf import settings
from django.db import transaction
from django.db.models.signals import post_save
from django.dispatch import receiver

from sandboxes import actions


@receiver(post_save, sender=settings.AUTH_USER_MODEL)
def create_sandbox_for_new_user(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
    if created and not kwargs.get("raw"):  # not while loading fixtures
        actions.create_sandbox(instance)


@receiver(email_confirmed)
def provision_on_confirmation(request: Any, email_address: Any, **kwargs: Any) -> None:
    """Sandboxes cost real memory, so only verified accounts get one started."""
    if not settings.HERMIT_AUTO_PROVISION:
        return
    from sandboxes.tasks import provision_sandbox

    waiting = email_address.user.sandboxes.filter(state="provisioning")
    for pk in waiting.values_list("pk", flat=True):
        transaction.on_commit(partial(provision_sandbox.delay, pk))
