"""Live sandbox events (state changes, start progress) for the signed-in user's dashboard.

Browser protocol: the server sends ``{"type": "event", kind, message, progress, state,
created_at}`` for each new event of the user's own sandbox; the browser sends nothing.

Events arrive through the channel layer. When that layer is in-process only (the embedded
default, where the Celery worker that starts sandboxes is another process), the consumer
also reads new events from the database once a second, so progress is live either way.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import InMemoryChannelLayer

from sandboxes.consumers.base import admit
from sandboxes.events import event_payload, group_name
from sandboxes.models import SandboxEvent

POLL_SECONDS = 1.0


class ProgressConsumer(AsyncJsonWebsocketConsumer):
    group: str | None = None
    poller: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        sandbox = await admit(self)
        if sandbox is None:
            return
        self.group = group_name(sandbox.pk)
        await self.channel_layer.group_add(self.group, self.channel_name)
        if isinstance(self.channel_layer, InMemoryChannelLayer):
            last = await latest_event_id(sandbox.pk)  # before accepting: nothing slips between
            self.poller = asyncio.create_task(self._poll(sandbox.pk, last))
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)
        if self.poller:
            self.poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.poller

    async def sandbox_event(self, event: dict[str, Any]) -> None:
        await self.send_json({**event, "type": "event"})

    async def _poll(self, sandbox_id: int, last: int) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            for payload in await events_after(sandbox_id, last):
                last = payload["id"]
                await self.send_json({**payload, "type": "event"})


@database_sync_to_async
def latest_event_id(sandbox_id: int) -> int:
    event = SandboxEvent.objects.filter(sandbox_id=sandbox_id).order_by("-id").first()
    return event.pk if event else 0


@database_sync_to_async
def events_after(sandbox_id: int, last_id: int) -> list[dict[str, Any]]:
    events = SandboxEvent.objects.filter(sandbox_id=sandbox_id, id__gt=last_id).order_by("id")
    return [event_payload(e) for e in events[:50]]
