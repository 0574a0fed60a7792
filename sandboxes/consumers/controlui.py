"""The Control UI's WebSocket, relayed frame for frame to the user's own gateway.

The browser's handshake must come from this site (Origin checked against the Host) and carry a
Django session; the sandbox comes from :func:`sandboxes.access.aget_sandbox_for_user` only. The
relay presents the portal's canonical origin (``SITE_URL``, which the gateway's
``controlUi.allowedOrigins`` lists) and no cookies and no forwarded addresses. The Control UI
does its own protocol-v4 handshake with its own browser device key through the relay; the
portal does not read or change frames, it only counts them as activity.

Close codes to the browser: 4401 not signed in, 4403 foreign origin, 4404 no sandbox,
4503 the agent is not running or did not answer; otherwise the gateway's own close code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import websockets
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from sandboxes import actions
from sandboxes.backends.base import BackendError
from sandboxes.consumers.base import admit
from sandboxes.consumers.chat import ACTIVITY_INTERVAL
from sandboxes.models import Sandbox
from sandboxes.views_controlui import portal_origin

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 26 * 1024 * 1024  # the gateway's own maxPayload is 25 MiB


class ControlUIConsumer(AsyncWebsocketConsumer):
    """One Control UI tab's WebSocket to its owner's gateway."""

    upstream: ClientConnection | None = None
    pump: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        sandbox = await admit(self)
        if sandbox is None:
            return
        self.sandbox = sandbox
        self.last_activity = 0.0
        try:
            self.upstream = await self._open_upstream()
        except (OSError, TimeoutError, InvalidHandshake, BackendError) as exc:
            log.info(
                "control UI relay for sandbox %s: gateway unreachable (%s)",
                self.sandbox.pk,
                type(exc).__name__,
            )
            await self.close(code=4503)
            return
        await self.accept()
        self.pump = asyncio.ensure_future(self._pump_down())

    async def _open_upstream(self) -> ClientConnection:
        if self.sandbox.state != Sandbox.State.RUNNING:
            raise BackendError("the agent is not running")
        host, port = await database_sync_to_async(actions.gateway_endpoint)(self.sandbox)
        return await websockets.connect(
            f"ws://{host}:{port}/",
            origin=portal_origin(),  # type: ignore[arg-type]
            max_size=MAX_FRAME_BYTES,
            open_timeout=10,
            compression=None,
            user_agent_header="hermit-control-ui-relay",
        )

    async def _pump_down(self) -> None:
        """Gateway → browser, until either side closes."""
        assert self.upstream is not None
        code = 1000
        try:
            async for message in self.upstream:
                if isinstance(message, bytes):
                    await self.send(bytes_data=message)
                else:
                    await self.send(text_data=message)
                await self._touch()
        except ConnectionClosed:
            pass
        finally:
            if self.upstream.close_code is not None:
                code = self.upstream.close_code
            with contextlib.suppress(Exception):
                await self.close(code=_browser_close_code(code))

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.upstream is None:
            return
        try:
            await self.upstream.send(text_data if text_data is not None else bytes_data or b"")
        except ConnectionClosed:
            await self.close(code=4503)
            return
        await self._touch()

    async def disconnect(self, code: int) -> None:
        if self.upstream is not None:
            await self.upstream.close()
        if self.pump is not None:
            self.pump.cancel()
            with contextlib.suppress(BaseException):
                await self.pump

    async def _touch(self) -> None:
        now = time.monotonic()
        if now - self.last_activity >= ACTIVITY_INTERVAL:
            self.last_activity = now
            await database_sync_to_async(actions.record_activity)(self.sandbox)


def _browser_close_code(code: int) -> int:
    """Browsers may only be sent 1000 or 3000-4999."""
    return code if code == 1000 or 3000 <= code <= 4999 else 4503
