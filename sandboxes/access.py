"""The one way views and consumers get a sandbox: through its owner.

Every view and consumer that acts on a sandbox calls get_sandbox_for_user (or its async twin);
nothing else looks sandboxes up by id on behalf of a user. A sandbox that is not the user's
is indistinguishable from one that does not exist (404).
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async
from django.http import Http404

from sandboxes.models import Sandbox


def get_sandbox_for_user(user: Any, name: str = "default") -> Sandbox:
    """Return ``user``'s sandbox called ``name``. Raise Http404 if there is none or no user."""
    if user is None or not user.is_authenticated:
        raise Http404("No sandbox")
    try:
        return Sandbox.objects.select_related("owner", "runtime").get(owner=user, name=name)
    except Sandbox.DoesNotExist:
        raise Http404("No sandbox") from None


async def aget_sandbox_for_user(user: Any, name: str = "default") -> Sandbox:
    return await sync_to_async(get_sandbox_for_user)(user, name)
