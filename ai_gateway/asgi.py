"""ASGI app for the sandbox-facing listener (settings.HERMIT_AI_GATEWAY_PORT).

Sandboxes can reach exactly one host port, and it must serve the AI gateway and nothing else
of the portal. This app resolves every request against ``ai_gateway.sandbox_urls`` only
and runs no portal middleware (no sessions, no admin, no CSRF, no host check: callers are
sandboxes, authenticated per request by their gateway key). Run it as a second server:

    uvicorn --host 127.0.0.1 --port 8001 --no-access-log --lifespan on \
        --timeout-graceful-shutdown 10 ai_gateway.asgi:application

(uvicorn rather than daphne: it speaks ASGI lifespan, whose shutdown closes the outbound HTTP
client, and it is the server the tests run the gateway under.)

It is on every model call's path, so it also skips what Django does per request for code that
runs in request threads: no thread-sensitive context and no request_started/request_finished
signals (whose receivers close each request thread's database connections). The gateway's
database work runs on its own worker threads, which keep their connections (``db``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

import django
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.exception import convert_exception_to_response
from django.urls import set_script_prefix

from portal.lib import http

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

URLCONF = "ai_gateway.sandbox_urls"


class GatewayASGIHandler(ASGIHandler):
    """Django's ASGI handler with the gateway URLconf, no middleware and no request signals."""

    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware: list[Any] = []
        self._template_response_middleware: list[Any] = []
        self._exception_middleware: list[Any] = []
        handler = getattr(self, "_get_response_async" if is_async else "_get_response")
        self._middleware_chain = convert_exception_to_response(handler)

    def create_request(self, scope: Any, body_file: Any) -> Any:
        request, error = super().create_request(scope, body_file)
        if request is not None:
            request.urlconf = URLCONF
        return request, error

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise ValueError(f"The AI gateway serves only HTTP, not {scope['type']}.")
        await self.handle(scope, receive, send)

    async def lifespan(self, receive: Any, send: Any) -> None:
        """Close the outbound HTTP client at shutdown (servers that speak ASGI lifespan)."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await http.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def handle(self, scope: Any, receive: Any, send: Any) -> None:
        """Answer one request as Django's handler does, less its signals: the response is
        sent while a second task listens for the client going away, which cancels it."""
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        try:
            set_script_prefix(get_script_prefix(scope))
            request, error = self.create_request(scope, body_file)
            if request is None:
                await self.send_response(error, send)
                return
            listen = asyncio.create_task(self.listen_for_disconnect(receive))
            respond = asyncio.create_task(self._respond(request, send))
            await asyncio.wait((listen, respond), return_when=asyncio.FIRST_COMPLETED)
            for task in (listen, respond):
                if not task.done():
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError, RequestAborted):
                    await task
        finally:
            body_file.close()

    async def _respond(self, request: Any, send: Any) -> None:
        response = await self.run_get_response(request)
        with contextlib.suppress(asyncio.CancelledError):  # the client went away meanwhile
            await self.send_response(response, send)


def get_application() -> GatewayASGIHandler:
    django.setup(set_prefix=False)
    return GatewayASGIHandler()


application = get_application()
