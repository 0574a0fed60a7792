"""Sign-up creates the user's sandbox; a confirmed email address, or signing in with an account
that may have one, provisions it.

Signing in covers accounts that never confirm an address (staff made with ``createsuperuser``,
or sites where verification is not mandatory), so no one is left "provisioning" forever, and
asks again for a sandbox whose provisioning task was lost. See
:func:`sandboxes.actions.request_provisioning` for who may have one and how often it is asked.

A change of an owner's limits (their plan) is applied through
:func:`sandboxes.limits.limits_changed`, which the app that owns plans calls.

A deleted sandbox (or user) takes its backups with it: its repository is purged, and its
exports' archives deleted, once the deletion has committed.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from allauth.account.signals import email_confirmed
from django.conf import settings
from django.contrib.auth.signals import user_logged_in
from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from sandboxes import actions
from sandboxes.models import BackupRepository, Export

log = logging.getLogger(__name__)


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


@receiver(post_delete, sender=BackupRepository)
def purge_deleted_repository(sender: Any, instance: BackupRepository, **kwargs: Any) -> None:
    """A deleted sandbox's (or user's) backups go too, once the deletion has committed."""
    if not instance.location:
        return
    from sandboxes.backups.tasks import purge_backups

    location = instance.location
    transaction.on_commit(partial(_queue, purge_backups, location))


@receiver(post_delete, sender=Export)
def delete_export_file(sender: Any, instance: Export, **kwargs: Any) -> None:
    """An export's archive goes with its row (a deleted user's downloads, expired ones)."""
    if not instance.storage_name:
        return
    from sandboxes.backups import storage

    name = instance.storage_name
    transaction.on_commit(partial(_delete_export, storage, name))


def _queue(task: Any, *args: Any) -> None:
    try:
        task.delay(*args)
    except Exception:
        log.warning("could not queue %s", task.name)


def _delete_export(storage: Any, name: str) -> None:
    try:
        storage.export_storage().delete(name)
    except Exception:
        log.warning("could not delete an export archive")
