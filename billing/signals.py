"""Every new user starts on the default plan."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db.models.signals import post_save
from django.dispatch import receiver

from billing.models import Account, default_plan


@receiver(post_save, sender=settings.AUTH_USER_MODEL)
def create_account(sender: Any, instance: Any, created: bool, **kwargs: Any) -> None:
    if created and not kwargs.get("raw"):  # not while loading fixtures
        Account.objects.get_or_create(user=instance, defaults={"plan": default_plan()})
