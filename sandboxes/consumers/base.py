"""What every sandbox WebSocket checks before it accepts: origin, login, ownership."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.http import Http404

from sandboxes.access import aget_sandbox_for_user
from sandboxes.models import Sandbox

CLOSE_FOREIGN_ORIGIN = 4403
CLOSE_NOT_SIGNED_IN = 4401
CLOSE_NO_SANDBOX = 4404


def origin_allowed(scope: dict[str, Any]) -> bool:
    """Return True if the handshake's Origin is this site (same host) or a trusted origin."""
    headers = dict(scope.get("headers") or [])
    origin = headers.get(b"origin", b"").decode("latin-1")
    host = headers.get(b"host", b"").decode("latin-1")
    if not origin:
        return False
    if origin in getattr(settings, "CSRF_TRUSTED_ORIGINS", []):
        return True
    return bool(host) and urlsplit(origin).netloc == host


async def admit(consumer: AsyncWebsocketConsumer) -> Sandbox | None:
    """Return the connecting user's own sandbox, or close the socket with the reason and
    return None (foreign origin 4403, not signed in 4401, no sandbox 4404)."""
    if not origin_allowed(consumer.scope):
        await consumer.close(code=CLOSE_FOREIGN_ORIGIN)
        return None
    user = consumer.scope.get("user")
    if user is None or not user.is_authenticated:
        await consumer.close(code=CLOSE_NOT_SIGNED_IN)
        return None
    try:
        return await aget_sandbox_for_user(user)
    except Http404:
        await consumer.close(code=CLOSE_NO_SANDBOX)
        return None
