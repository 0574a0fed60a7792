"""The portal's WebSocket routes, mounted by portal.asgi under the session auth stack (the
Control UI's WebSocket lives on its own origin: portal.asgi)."""

from __future__ import annotations

from django.urls import path

from sandboxes.consumers.chat import ChatConsumer
from sandboxes.consumers.progress import ProgressConsumer

websocket_urlpatterns = [
    path("ws/sandbox/progress/", ProgressConsumer.as_asgi()),
    path("ws/chat/", ChatConsumer.as_asgi()),
]
