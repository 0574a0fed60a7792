"""What every sandbox WebSocket checks before it accepts: origin, login, ownership.

Origins are compared whole (scheme, host and port: :mod:`sandboxes.origins`). The portal's
sockets accept the portal's origins (``SITE_URL``, ``CSRF_TRUSTED_ORIGINS``) or the
connection's own (its scheme and Host); a handshake without an Origin is refused.

:class:`RelaySocket` is the base of the sockets that relay to a gateway (chat, Control UI).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from channels.consumer import get_handler_name
from channels.generic.websocket import AsyncWebsocketConsumer
from django.http import Http404

from sandboxes.access import aget_sandbox_for_user
from sandboxes.models import Sandbox
from sandboxes.origins import origin_of, portal_origins

CLOSE_FOREIGN_ORIGIN = 4403
CLOSE_NOT_SIGNED_IN = 4401
CLOSE_NO_SANDBOX = 4404


def header(scope: dict[str, Any], name: bytes) -> str:
    """The value of one handshake header ("" if absent)."""
    return dict(scope.get("headers") or []).get(name, b"").decode("latin-1")


def origin_allowed(scope: dict[str, Any], allowed: Collection[str] | None = None) -> bool:
    """Return True if the handshake's Origin is one of ``allowed`` origins; by default, one of
    the portal's or the connection's own (same scheme, host and port)."""
    origin = origin_of(header(scope, b"origin"))
    if not origin:
        return False
    if allowed is not None:
        return origin in allowed
    host = header(scope, b"host")
    own = origin_of(f"{'https' if scope.get('scheme') == 'wss' else 'http'}://{host}")
    return origin in portal_origins() or (bool(host) and origin == own)


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


class RelaySocket(AsyncWebsocketConsumer):
    """A socket that relays frames: channels' dispatch without its per-message thread hop.

    Channels closes stale database connections before every message it dispatches, in a worker
    thread: a thread hop per browser frame, which on the chat relay cost as much CPU as relaying
    a frame (bench/chat_relay.py). These consumers reach the database only through
    ``database_sync_to_async``, which closes stale connections around every call itself."""

    async def dispatch(self, message: dict[str, Any]) -> None:
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)
