"""WebSocket routes, mounted by portal.asgi under the session auth stack."""

from __future__ import annotations

from django.urls import path, re_path

from sandboxes.consumers.chat import ChatConsumer
from sandboxes.consumers.controlui import ControlUIConsumer
from sandboxes.consumers.progress import ProgressConsumer

websocket_urlpatterns = [
    path("ws/sandbox/progress/", ProgressConsumer.as_asgi()),
    path("ws/chat/", ChatConsumer.as_asgi()),
    re_path(r"^sandbox/ui(?:/.*)?$", ControlUIConsumer.as_asgi()),
]
