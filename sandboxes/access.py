"""The one way views and consumers get a sandbox: through its owner.

Every view and consumer that acts on a sandbox calls get_sandbox_for_user (or its async twin);
nothing else looks sandboxes up by id on behalf of a user. A sandbox's snapshots and exports
are reached only through it (get_snapshot_for_user, get_export_for_user). A sandbox that is
not the user's is indistinguishable from one that does not exist (404).
"""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async
from django.http import Http404

from sandboxes.models import Export, Sandbox, Snapshot


def get_sandbox_for_user(user: Any, name: str = "default") -> Sandbox:
    """Return ``user``'s sandbox called ``name``. Raise Http404 if there is none or no user."""
    if user is None or not user.is_authenticated:
        raise Http404("No sandbox")
    try:
        return Sandbox.objects.select_related("owner", "runtime").get(owner=user, name=name)
    except Sandbox.DoesNotExist:
        raise Http404("No sandbox") from None


def get_snapshot_for_user(user: Any, snapshot_id: int) -> Snapshot:
    """Return the snapshot ``snapshot_id`` of ``user``'s sandbox. Raise Http404 otherwise."""
    sandbox = get_sandbox_for_user(user)
    snapshot = sandbox.snapshots.filter(pk=snapshot_id).first()
    if snapshot is None:
        raise Http404("No snapshot")
    snapshot.sandbox = sandbox
    return snapshot


def get_export_for_user(user: Any, export_id: int) -> Export:
    """Return the export ``export_id`` of ``user``'s sandbox. Raise Http404 otherwise."""
    sandbox = get_sandbox_for_user(user)
    export = sandbox.exports.select_related("snapshot").filter(pk=export_id).first()
    if export is None:
        raise Http404("No export")
    export.sandbox = sandbox
    return export


async def aget_sandbox_for_user(user: Any, name: str = "default") -> Sandbox:
    return await database_sync_to_async(get_sandbox_for_user)(user, name)
