"""The edge's ASGI app: relay ``/sandboxes/<id>/<path>`` to that sandbox's gateway on this host.

Contract, for each WebSocket handshake and each HTTP request:

1. The path must be ``/sandboxes/<id>`` or ``/sandboxes/<id>/...``; anything else is a 404.
2. The query must carry exactly one ``edge_token`` that :func:`sandboxes.hostlink.verify`
   accepts for this host's name (HERMIT_HOST_NAME) and ``<id>``, whose nonce this edge has not
   seen (it remembers each in the cache until the token expires: one token, one connection).
   Refusals, before any database read: 401 (no, malformed, badly signed, expired or used token),
   403 (a token for another sandbox).
3. The sandbox must be placed on this host (``Sandbox.host`` named HERMIT_HOST_NAME; one with no
   host is refused too: the portal reaches those on its own machine) and have a gateway endpoint
   (the backend's, from ``backend_state``): else 404, or 503 when it is not running.
4. The request goes to the gateway on the host's loopback, ``edge_token`` removed from the
   query and every other parameter kept; HTTP hop-by-hop headers are dropped, the rest (the
   portal's ``Authorization`` with the gateway token) pass. A gateway that cannot be reached is
   a 502. A WebSocket is accepted with the gateway's chosen subprotocol only once the gateway
   accepted, then relayed frame for frame both ways; either side's close closes the other with
   its code (1011 when the gateway's connection broke).

A refused WebSocket handshake gets the HTTP status above when the server offers the ASGI
``websocket.http.response`` extension (uvicorn does), else a close before accept (HTTP 403).
The reason is in the body, never the token; refusals are logged with the sandbox id, the peer
and the reason. Run with uvicorn's access log off (``python -m hostedge`` does): a request line
would carry the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
import websockets
from asgiref.sync import sync_to_async
from django.core.cache import cache
from django.db import close_old_connections
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from sandboxes import actions, hostlink, hosts
from sandboxes.backends.base import BackendError
from sandboxes.models import Sandbox

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PATH = re.compile(r"^/sandboxes/(?P<id>[1-9][0-9]{0,17})(?P<rest>/.*)?$")
MAX_FRAME_BYTES = 32 * 1024 * 1024  # the gateway's own maxPayload is 25 MiB
MAX_BODY_BYTES = 32 * 1024 * 1024
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


class Refused(Exception):
    """A request the edge answers with ``status`` and ``reason`` (no secret in it)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Target:
    """Where one authorised request goes: the sandbox's gateway on this host."""

    def __init__(self, sandbox_id: int, host: str, port: int, path: str, query: str) -> None:
        self.sandbox_id = sandbox_id
        self.url_base = f"{host}:{port}"
        self.path = path
        self.query = query

    def url(self, scheme: str) -> str:
        return f"{scheme}://{self.url_base}{self.path}" + (f"?{self.query}" if self.query else "")


# -- authorisation -----------------------------------------------------------------------------


def _split_query(raw: bytes) -> tuple[str, str]:
    """(the edge token, the rest of the query re-encoded). Refused if not exactly one token."""
    pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
    tokens = [value for name, value in pairs if name == hostlink.QUERY_PARAMETER]
    if len(tokens) > 1:
        raise Refused(401, "malformed token")
    rest = [(name, value) for name, value in pairs if name != hostlink.QUERY_PARAMETER]
    return (tokens[0] if tokens else ""), urlencode(rest)


def local_endpoint(sandbox_id: int) -> tuple[str, int]:
    """(host, port) of the gateway of a sandbox placed on this host. Refused (404) if there is
    no such sandbox here, (503) if it has no endpoint (not running)."""
    close_old_connections()
    try:
        sandbox = Sandbox.objects.select_related("host").filter(pk=sandbox_id).first()
        if sandbox is None or sandbox.host is None or sandbox.host.name != hosts.local_name():
            raise Refused(404, "no such sandbox on this host")
        try:
            return actions.gateway_endpoint(sandbox)
        except BackendError:
            raise Refused(503, "the agent is not running") from None
    finally:
        close_old_connections()


async def authorize(scope: Scope) -> Target:
    """The target of an authorised request (module docstring, steps 1-3), or Refused."""
    match = PATH.match(scope.get("path") or "")
    if match is None:
        raise Refused(404, "not found")
    sandbox_id = int(match["id"])
    token, query = _split_query(scope.get("query_string") or b"")
    try:
        claims = hostlink.verify(token, hosts.local_name(), sandbox_id)
    except hostlink.TokenRefused as exc:
        raise Refused(exc.status, exc.reason) from None
    ttl = max(1, int(claims.expires - time.time()) + 1)
    if not await cache.aadd(f"hermit:hostedge:nonce:{claims.nonce}", 1, ttl):
        raise Refused(401, "token already used")
    host, port = await sync_to_async(local_endpoint, thread_sensitive=False)(sandbox_id)
    return Target(sandbox_id, host, port, match["rest"] or "/", query)


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


def _refused(scope: Scope, exc: Refused) -> None:
    match = PATH.match(scope.get("path") or "")
    log.info(
        "edge refused %s for sandbox %s from %s: %s %s",
        scope["type"],
        match["id"] if match else "-",
        _peer(scope),
        exc.status,
        exc.reason,
    )


def _headers(scope: Scope) -> dict[str, str]:
    """The request's headers minus hop-by-hop ones (lower-case names; repeats joined)."""
    out: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers") or []:
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        if name not in HOP_BY_HOP and not name.startswith("sec-websocket-"):
            out[name] = f"{out[name]}, {value}" if name in out else value
    return out


# -- the app -----------------------------------------------------------------------------------


class EdgeApp:
    """The ASGI application (see the module docstring)."""

    def __init__(self) -> None:
        self._client: httpx.AsyncClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(60, connect=10), trust_env=False)
        return self._client

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    hostlink.link_secrets()  # refuse to start without a usable secret
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- HTTP ---------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = await _read_body(receive)
            target = await authorize(scope)
        except Refused as exc:
            _refused(scope, exc)
            await _plain(send, exc.status, exc.reason)
            return
        request = self.client.build_request(
            scope["method"], target.url("http"), headers=_headers(scope), content=body or None
        )
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            log.info("edge: gateway of sandbox %s unreachable (%s)", target.sandbox_id, type(exc))
            await _plain(send, 502, "the agent did not answer")
            return
        try:
            headers = [
                (name.encode("latin-1"), value.encode("latin-1"))
                for name, value in response.headers.multi_items()
                if name.lower() not in HOP_BY_HOP
            ]
            await send(
                {"type": "http.response.start", "status": response.status_code, "headers": headers}
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()

    # -- WebSocket ----------------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        try:
            target = await authorize(scope)
            upstream = await self._open(scope, target)
        except Refused as exc:
            _refused(scope, exc)
            await _refuse_handshake(scope, send, exc)
            return
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
        await _relay(upstream, receive, send)

    async def _open(self, scope: Scope, target: Target) -> ClientConnection:
        headers = _headers(scope)
        protocols = [p.strip() for p in scope.get("subprotocols") or [] if p.strip()]
        try:
            return await websockets.connect(
                target.url("ws"),
                origin=headers.pop("origin", None),  # type: ignore[arg-type]
                user_agent_header=headers.pop("user-agent", None),
                subprotocols=protocols or None,
                max_size=MAX_FRAME_BYTES,
                open_timeout=10,
                compression=None,
            )
        except InvalidStatus as exc:
            raise Refused(exc.response.status_code, "the agent refused the connection") from None
        except (OSError, TimeoutError, InvalidHandshake):
            raise Refused(502, "the agent did not answer") from None


async def _read_body(receive: Receive) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Refused(400, "the client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise Refused(413, "request body too large")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _plain(send: Send, status: int, text: str, *, prefix: str = "http") -> None:
    body = f"{text}\n".encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"cache-control", b"no-store")]
    await send({"type": f"{prefix}.response.start", "status": status, "headers": headers})
    await send({"type": f"{prefix}.response.body", "body": body})


async def _refuse_handshake(scope: Scope, send: Send, exc: Refused) -> None:
    if "websocket.http.response" in (scope.get("extensions") or {}):
        await _plain(send, exc.status, exc.reason, prefix="websocket.http")
    else:
        await send({"type": "websocket.close", "code": 4000 + exc.status})


def _sendable(code: int) -> int:
    """``code`` if a close frame may carry it (RFC 6455 section 7.4), else 1000."""
    if code in (1004, 1005, 1006, 1015) or not (1000 <= code <= 1014 or 3000 <= code <= 4999):
        return 1000
    return code


async def _relay(upstream: ClientConnection, receive: Receive, send: Send) -> None:
    """Frames both ways until either side closes; then close the other with its code."""

    async def down() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in upstream:
                if isinstance(message, bytes):
                    await send({"type": "websocket.send", "bytes": message})
                else:
                    await send({"type": "websocket.send", "text": message})
        code = upstream.close_code
        code = 1000 if code == 1005 else 1011 if code in (None, 1006) else code
        with contextlib.suppress(Exception):  # the client may be gone already
            await send({"type": "websocket.close", "code": code})

    pump = asyncio.ensure_future(down())
    try:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                await upstream.close(code=_sendable(int(message.get("code") or 1000)))
                break
            if message["type"] != "websocket.receive":
                continue
            data = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            try:
                await upstream.send(data)
            except ConnectionClosed:
                break
    finally:
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(pump, 10)
        pump.cancel()
        await upstream.close()
