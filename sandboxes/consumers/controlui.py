"""The Control UI's WebSocket, on the Control UI origin, relayed frame for frame to the gateway.

The handshake must come from the Control UI origin itself (Origin, scheme + host + port) and
carry the Control UI cookie, whose grant is re-checked now
(:func:`sandboxes.controlui_auth.sandbox_for_session`: active owner, same password, the sandbox
the one door gives them). portal.asgi routes it here with no session middleware: the portal's
session is never read. The relay presents the portal's canonical origin (``SITE_URL``, which
the gateway's ``controlUi.allowedOrigins`` lists), no cookies and no forwarded addresses. The
Control UI does its own protocol-v4 handshake with its own browser device key through the
relay; the portal does not read or change frames, it only counts them as activity.

Close codes to the browser: 4401 no valid Control UI cookie, 4403 foreign origin,
4503 the agent is not running or did not answer; otherwise the gateway's own close code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import websockets
from channels.db import database_sync_to_async
from django.http import parse_cookie
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from sandboxes import actions, controlui_auth, hostlink, sleep, tasks_host
from sandboxes.backends.base import BackendError
from sandboxes.consumers.base import (
    CLOSE_FOREIGN_ORIGIN,
    CLOSE_NOT_SIGNED_IN,
    RelaySocket,
    header,
    origin_allowed,
)
from sandboxes.consumers.chat import ACTIVITY_INTERVAL, THAW_TIMEOUT
from sandboxes.models import Sandbox
from sandboxes.origins import control_ui_origin, portal_origin

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 26 * 1024 * 1024  # the gateway's own maxPayload is 25 MiB


class ControlUIConsumer(RelaySocket):
    """One Control UI tab's WebSocket to its owner's gateway."""

    upstream: ClientConnection | None = None
    pump: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        if not origin_allowed(self.scope, {control_ui_origin()}):
            await self.close(code=CLOSE_FOREIGN_ORIGIN)
            return
        cookies = parse_cookie(header(self.scope, b"cookie"))
        sandbox = await controlui_auth.asandbox_for_session(cookies.get(controlui_auth.COOKIE_NAME))
        if sandbox is None:
            await self.close(code=CLOSE_NOT_SIGNED_IN)
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
        if await database_sync_to_async(hostlink.is_remote)(self.sandbox):
            url = await database_sync_to_async(hostlink.gateway_url)(self.sandbox, "/")
        else:
            host, port = await database_sync_to_async(actions.gateway_endpoint)(self.sandbox)
            url = f"ws://{host}:{port}/"
        return await websockets.connect(
            url,
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
        if await sleep.ais_dozing(self.sandbox.pk):  # the worker thaws it (tasks_host.thaw)
            token = tasks_host.new_token()
            await database_sync_to_async(tasks_host.thaw.delay, thread_sensitive=False)(
                self.sandbox.pk, None, token
            )
            await tasks_host.await_reply(token, THAW_TIMEOUT, poll=0.02)
        now = time.monotonic()
        if now - self.last_activity >= ACTIVITY_INTERVAL:
            self.last_activity = now
            await database_sync_to_async(actions.record_activity)(self.sandbox)


def _browser_close_code(code: int) -> int:
    """Browsers may only be sent 1000 or 3000-4999."""
    return code if code == 1000 or 3000 <= code <= 4999 else 4503
