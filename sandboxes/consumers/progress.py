"""Live sandbox events (state changes, start progress) for the signed-in user's dashboard.

Browser protocol: the server sends ``{"type": "event", kind, message, progress, state,
created_at}`` for each new event of the user's own sandbox; the browser sends nothing.
"""

from __future__ import annotations

from typing import Any

from channels.generic.websocket import AsyncJsonWebsocketConsumer

from sandboxes.consumers.base import admit
from sandboxes.events import group_name


class ProgressConsumer(AsyncJsonWebsocketConsumer):
    group: str | None = None

    async def connect(self) -> None:
        sandbox = await admit(self)
        if sandbox is None:
            return
        self.group = group_name(sandbox.pk)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def sandbox_event(self, event: dict[str, Any]) -> None:
        await self.send_json({**event, "type": "event"})
