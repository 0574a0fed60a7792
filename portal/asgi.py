"""ASGI entry point: HTTP through Django, WebSockets through Channels, split by origin.

A WebSocket whose ``Host`` names the Control UI's host (``HERMIT_CONTROL_UI_URL``), on any port,
reaches only the Control UI relay, with no session middleware: the Control UI origin never sees
the portal's session, and the relay checks its own cookie and Origin. Every other WebSocket
reaches the portal's routes (portal.routing) behind the allowed-hosts Origin check and session
auth. HTTP is split the same way by portal.middleware.
"""

from __future__ import annotations

import os
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.urls import re_path  # noqa: E402

from portal.routing import websocket_urlpatterns  # noqa: E402
from sandboxes.consumers.controlui import ControlUIConsumer  # noqa: E402
from sandboxes.origins import is_control_ui_host  # noqa: E402


class ByHost:
    """Send a connection to ``control_ui`` if its Host is the Control UI's, else to ``portal``."""

    def __init__(self, control_ui: Any, portal: Any) -> None:
        self.control_ui = control_ui
        self.portal = portal

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        app = self.control_ui if is_control_ui_host(host) else self.portal
        return await app(scope, receive, send)


application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": ByHost(
            control_ui=URLRouter([re_path(r"", ControlUIConsumer.as_asgi())]),
            portal=AllowedHostsOriginValidator(
                AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
            ),
        ),
    }
)
