"""Sign-up creates the user's sandbox; a confirmed email address, or signing in with an account
that may have one, provisions it.

Signing in covers accounts that never confirm an address (staff made with ``createsuperuser``,
or sites where verification is not mandatory), so no one is left "provisioning" forever, and
asks again for a sandbox whose provisioning task was lost. See
:func:`sandboxes.actions.request_provisioning` for who may have one and how often it is asked.
"""

from __future__ import annotations

from typing import Any

from allauth.account.signals import email_confirmed
from django.conf import settings
from django.contrib.auth.signals import user_logged_in
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
    from sandboxes.tasks import request_provisioning

    for sandbox in email_address.user.sandboxes.filter(state="provisioning"):
        request_provisioning(sandbox)


@receiver(user_logged_in)
def provision_on_sign_in(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    if not settings.HERMIT_AUTO_PROVISION:
        return
    from sandboxes.tasks import request_provisioning

    for sandbox in user.sandboxes.filter(state="provisioning"):
        request_provisioning(sandbox, actor_user=user)
