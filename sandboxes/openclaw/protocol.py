"""An asyncio client for the OpenClaw gateway's WebSocket protocol (v4).

The wire protocol, as recorded in ``/work/shared/openclaw/captures/ws1.jsonl``:

1. The gateway opens with ``{"type": "event", "event": "connect.challenge",
   "payload": {"nonce", "ts"}}``.
2. The client answers with a ``connect`` request whose ``device`` block is signed with the
   client's Ed25519 key over ``v3|deviceId|clientId|mode|role|scopesCsv|signedAt|token|nonce|
   platform|deviceFamily`` (platform and family lower-cased, empty when absent).
3. The gateway replies ``{"type": "res", "ok": true, "payload": {"type": "hello-ok", ...}}``
   or ``{"ok": false, "error": {"code", "message", "details"}}``.
4. After that: requests ``{"type": "req", "id", "method", "params"}`` are answered by
   ``{"type": "res", "id", "ok", "payload" | "error"}``, and events
   ``{"type": "event", "event", "payload", "seq"}`` arrive at any time.

Two layers:

- :class:`GatewayConnection` is one socket: handshake, request/response correlation by id,
  and a queue of events. It never reconnects; when the socket dies every pending request fails
  with :class:`GatewayDisconnected` and the event stream ends.
- :class:`GatewayClient` keeps a connection up: it reconnects with exponential backoff, yields
  events across reconnects (plus synthetic ``hermit.connected`` / ``hermit.disconnected``
  events), and retries idempotent requests (``chat.send`` carries an idempotency key) until
  their deadline, so a message sent while the gateway restarts is delivered once it is back,
  or fails with a clear :class:`GatewayUnavailable`.

Secrets (the gateway token, the device private key) are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 4
DEFAULT_CLIENT_ID = "gateway-client"
DEFAULT_CLIENT_MODE = "backend"
DEFAULT_SCOPES = ("operator.read", "operator.write")
DEFAULT_SESSION_KEY = "main"
# The gateway allows 25 MiB frames; chat history pages can be large.
MAX_FRAME_BYTES = 32 * 1024 * 1024

CONNECTED_EVENT = "hermit.connected"
DISCONNECTED_EVENT = "hermit.disconnected"


class GatewayError(Exception):
    """The gateway answered a request with ``ok: false``, or the protocol was violated.

    ``code`` is the gateway's error code (e.g. ``INVALID_REQUEST``) or one of ours
    (``PROTOCOL``, ``UNAVAILABLE``, ``DISCONNECTED``, ``TIMEOUT``).
    """

    def __init__(self, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details


class GatewayDisconnected(GatewayError):
    """The socket closed before the gateway answered."""

    def __init__(self, message: str = "the gateway connection closed") -> None:
        super().__init__("DISCONNECTED", message)


class GatewayUnavailable(GatewayError):
    """The gateway could not be reached (or re-reached) before the deadline."""

    def __init__(self, message: str) -> None:
        super().__init__("UNAVAILABLE", message)


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _normalize_meta(value: str | None) -> str:
    """Lower-case ASCII letters only, as the gateway does before verifying a signature."""
    text = (value or "").strip()
    return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in text)


class DeviceIdentity:
    """An Ed25519 device key as the gateway expects it.

    ``device_id`` is the hex SHA-256 of the raw 32-byte public key and ``public_key`` its
    base64url form. The private key is stored (by the caller, encrypted) as standard base64
    of the raw 32-byte seed: :meth:`private_key_b64` / :meth:`from_private_key_b64`.
    """

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        raw_public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public_key = _b64url(raw_public)
        self.device_id = hashlib.sha256(raw_public).hexdigest()

    @classmethod
    def generate(cls) -> DeviceIdentity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_key_b64(cls, text: str) -> DeviceIdentity:
        """Load a key saved by :meth:`private_key_b64`. Raise ValueError if it is not one."""
        try:
            raw = base64.b64decode(text.strip(), validate=True)
        except ValueError as exc:
            raise ValueError("device private key is not valid base64") from exc
        if len(raw) != 32:
            raise ValueError("device private key must be 32 raw bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    def private_key_b64(self) -> str:
        raw = self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return base64.b64encode(raw).decode("ascii")

    def sign(self, payload: str) -> str:
        """Return the base64url Ed25519 signature of ``payload``."""
        return _b64url(self._key.sign(payload.encode("utf-8")))

    def __repr__(self) -> str:  # never show key material
        return f"DeviceIdentity(device_id={self.device_id[:12]}...)"


@dataclass(frozen=True)
class ClientInfo:
    """How the client introduces itself; ``client_id`` must be one the gateway knows."""

    client_id: str = DEFAULT_CLIENT_ID
    mode: str = DEFAULT_CLIENT_MODE
    version: str = "hermit-0.1"
    platform: str = "linux"
    device_family: str = ""
    role: str = "operator"
    scopes: tuple[str, ...] = DEFAULT_SCOPES
    caps: tuple[str, ...] = ("tool-events",)


def device_auth_payload(
    *, device_id: str, info: ClientInfo, signed_at_ms: int, token: str, nonce: str
) -> str:
    """Return the v3 string the device key signs in a ``connect`` request."""
    return "|".join(
        [
            "v3",
            device_id,
            info.client_id,
            info.mode,
            info.role,
            ",".join(info.scopes),
            str(signed_at_ms),
            token,
            nonce,
            _normalize_meta(info.platform),
            _normalize_meta(info.device_family),
        ]
    )


def build_connect_params(
    *,
    token: str,
    identity: DeviceIdentity,
    nonce: str,
    info: ClientInfo,
    signed_at_ms: int | None = None,
) -> dict[str, Any]:
    """Return the ``params`` of a signed ``connect`` request answering ``nonce``."""
    signed_at = signed_at_ms if signed_at_ms is not None else int(time.time() * 1000)
    payload = device_auth_payload(
        device_id=identity.device_id, info=info, signed_at_ms=signed_at, token=token, nonce=nonce
    )
    client: dict[str, Any] = {
        "id": info.client_id,
        "version": info.version,
        "platform": info.platform,
        "mode": info.mode,
    }
    if info.device_family:
        client["deviceFamily"] = info.device_family
    return {
        "minProtocol": PROTOCOL_VERSION,
        "maxProtocol": PROTOCOL_VERSION,
        "client": client,
        "role": info.role,
        "scopes": list(info.scopes),
        "caps": list(info.caps),
        "auth": {"token": token},
        "locale": "en-US",
        "userAgent": f"hermit/{info.version}",
        "device": {
            "id": identity.device_id,
            "publicKey": identity.public_key,
            "signature": identity.sign(payload),
            "signedAt": signed_at,
            "nonce": nonce,
        },
    }


@dataclass(frozen=True)
class GatewayEvent:
    """One ``event`` frame. ``seq`` is the gateway's per-connection sequence, if any."""

    event: str
    payload: dict[str, Any]
    seq: int | None = None


@dataclass
class HelloInfo:
    """The useful parts of ``hello-ok``."""

    protocol: int
    server_version: str
    conn_id: str
    boot_id: str
    device_token: str | None
    policy: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)


_CLOSED = object()


class GatewayConnection:
    """One authenticated WebSocket connection to a gateway.

    Use :meth:`open` to connect and complete the handshake; then :meth:`request` and
    :meth:`events` (or :meth:`forward_events`). :meth:`close` is idempotent.
    """

    def __init__(self, ws: ClientConnection, hello: HelloInfo) -> None:
        self._ws = ws
        self.hello = hello
        self._ids = itertools.count(1)
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._sink: Callable[[GatewayEvent], None] | None = None
        self._reader = asyncio.create_task(self._read_loop(), name="openclaw-reader")
        self.closed = asyncio.Event()

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        token: str,
        identity: DeviceIdentity,
        info: ClientInfo | None = None,
        timeout: float = 10.0,
        origin: str | None = None,
    ) -> GatewayConnection:
        """Connect to ``url`` (``ws://host:port``) and authenticate.

        Raise :class:`GatewayUnavailable` if the socket cannot be opened, and
        :class:`GatewayError` if the gateway refuses the connect (bad token, unpaired device).
        """
        info = info or ClientInfo()
        headers = {"Origin": origin} if origin else None
        try:
            ws = await asyncio.wait_for(
                websockets.connect(
                    url,
                    max_size=MAX_FRAME_BYTES,
                    open_timeout=timeout,
                    additional_headers=headers,
                    compression=None,
                ),
                timeout,
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            raise GatewayUnavailable(f"cannot reach the gateway at {url}: {exc}") from exc
        try:
            hello = await asyncio.wait_for(cls._handshake(ws, token, identity, info), timeout)
        except BaseException as exc:
            await ws.close()
            if isinstance(exc, TimeoutError):
                raise GatewayUnavailable("the gateway did not complete the handshake") from exc
            if isinstance(exc, ConnectionClosed):
                raise GatewayUnavailable("the gateway closed during the handshake") from exc
            raise
        return cls(ws, hello)

    @staticmethod
    async def _handshake(
        ws: ClientConnection, token: str, identity: DeviceIdentity, info: ClientInfo
    ) -> HelloInfo:
        nonce: str | None = None
        while nonce is None:
            frame = _parse(await ws.recv())
            if frame.get("type") == "event" and frame.get("event") == "connect.challenge":
                nonce = str((frame.get("payload") or {}).get("nonce") or "")
                if not nonce:
                    raise GatewayError("PROTOCOL", "connect.challenge without a nonce")
        params = build_connect_params(token=token, identity=identity, nonce=nonce, info=info)
        await ws.send(
            json.dumps({"type": "req", "id": "connect", "method": "connect", "params": params})
        )
        while True:
            frame = _parse(await ws.recv())
            if frame.get("type") == "res" and frame.get("id") == "connect":
                break
        if not frame.get("ok"):
            err = frame.get("error") or {}
            raise GatewayError(
                str(err.get("code") or "CONNECT_REFUSED"),
                str(err.get("message") or "the gateway refused the connection"),
                err.get("details"),
            )
        payload = frame.get("payload") or {}
        auth = payload.get("auth") or {}
        server = payload.get("server") or {}
        return HelloInfo(
            protocol=int(payload.get("protocol") or 0),
            server_version=str(server.get("version") or ""),
            conn_id=str(server.get("connId") or ""),
            boot_id=str(server.get("bootId") or ""),
            device_token=auth.get("deviceToken"),
            policy=payload.get("policy") or {},
            raw=payload,
        )

    async def _read_loop(self) -> None:
        try:
            async for message in self._ws:
                try:
                    frame = _parse(message)
                except GatewayError:
                    log.warning("ignoring a malformed frame from the gateway")
                    continue
                kind = frame.get("type")
                if kind == "res":
                    future = self._pending.pop(str(frame.get("id")), None)
                    if future is not None and not future.done():
                        future.set_result(frame)
                elif kind == "event":
                    seq = frame.get("seq")
                    (self._sink or self._events.put_nowait)(
                        GatewayEvent(
                            event=str(frame.get("event")),
                            payload=frame.get("payload") or {},
                            seq=seq if isinstance(seq, int) else None,
                        )
                    )
        except ConnectionClosed:
            pass
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(GatewayDisconnected())
        self._pending.clear()
        if self._sink is None:
            self._events.put_nowait(_CLOSED)

    def forward_events(self, sink: Callable[[GatewayEvent], None]) -> None:
        """From now on hand each event to ``sink`` as the reader gets it, with no queue and no
        task in between (those already queued go first); :meth:`events` yields nothing more.
        The end of the connection is :attr:`closed`. A relay saves a task switch a frame."""
        while not self._events.empty():
            item = self._events.get_nowait()
            if item is not _CLOSED:
                sink(item)
        self._sink = sink

    async def request(
        self, method: str, params: Mapping[str, Any] | None = None, *, timeout: float = 30.0
    ) -> dict[str, Any]:
        """Send a request and return the response payload.

        Raise :class:`GatewayError` on ``ok: false``, :class:`GatewayDisconnected` if the socket
        closes first, and :class:`GatewayError` with code ``TIMEOUT`` after ``timeout`` seconds.
        """
        if self.closed.is_set():
            raise GatewayDisconnected()
        req_id = str(next(self._ids))
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = future
        frame = {"type": "req", "id": req_id, "method": method, "params": dict(params or {})}
        try:
            await self._ws.send(json.dumps(frame))
        except ConnectionClosed as exc:
            self._pending.pop(req_id, None)
            raise GatewayDisconnected() from exc
        try:
            res = await asyncio.wait_for(future, timeout)
        except TimeoutError as exc:
            self._pending.pop(req_id, None)
            raise GatewayError("TIMEOUT", f"{method} got no answer in {timeout:g}s") from exc
        if not res.get("ok"):
            err = res.get("error") or {}
            raise GatewayError(
                str(err.get("code") or "ERROR"),
                str(err.get("message") or f"{method} failed"),
                err.get("details"),
            )
        payload = res.get("payload")
        return payload if isinstance(payload, dict) else {"value": payload}

    async def events(self) -> AsyncIterator[GatewayEvent]:
        """Yield events until the connection closes."""
        while True:
            item = await self._events.get()
            if item is _CLOSED:
                self._events.put_nowait(_CLOSED)  # later iterators end too
                return
            yield item

    async def close(self) -> None:
        await self._ws.close()
        with contextlib.suppress(BaseException):
            await self._reader
        self._shutdown()


def coalesce_deltas(events: list[GatewayEvent]) -> list[GatewayEvent]:
    """Merge each run of consecutive ``chat`` delta events of one run and session into one
    event: its ``deltaText`` is theirs joined, the rest is the last one's (whose ``message``
    holds the whole text so far). Other events, and their order, are kept as they are."""
    merged: list[GatewayEvent] = []
    for event in events:
        last = merged[-1] if merged else None
        if (
            last is not None
            and _is_delta(event)
            and _is_delta(last)
            and event.payload.get("runId") == last.payload.get("runId")
            and event.payload.get("sessionKey") == last.payload.get("sessionKey")
        ):
            text = str(last.payload.get("deltaText") or "") + str(
                event.payload.get("deltaText") or ""
            )
            merged[-1] = GatewayEvent(event.event, {**event.payload, "deltaText": text}, event.seq)
        else:
            merged.append(event)
    return merged


def _is_delta(event: GatewayEvent) -> bool:
    return event.event == "chat" and event.payload.get("state") == "delta"


def _parse(message: str | bytes) -> dict[str, Any]:
    try:
        frame = json.loads(message)
    except (ValueError, UnicodeDecodeError) as exc:
        raise GatewayError("PROTOCOL", "the gateway sent a frame that is not JSON") from exc
    if not isinstance(frame, dict):
        raise GatewayError("PROTOCOL", "the gateway sent a frame that is not an object")
    return frame


@dataclass
class Backoff:
    """Exponential backoff with jitter: ``initial * factor**n``, capped at ``maximum``."""

    initial: float = 0.25
    maximum: float = 5.0
    factor: float = 2.0
    attempt: int = 0

    def next_delay(self) -> float:
        delay = min(self.maximum, self.initial * self.factor**self.attempt)
        self.attempt += 1
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.attempt = 0


class GatewayClient:
    """A gateway client that stays connected.

    ``await client.start()`` connects (retrying until ``connect_timeout``); after that a
    background task reconnects with backoff whenever the socket drops, until :meth:`close`.
    :meth:`events` yields gateway events across reconnects, with ``hermit.connected`` /
    ``hermit.disconnected`` events marking the gaps. ``hermit.connected`` carries
    ``restarted: true`` when the gateway's boot id changed (runs in flight were lost).

    ``url`` is a ``ws://`` URL or an async function returning one, called before every
    connect attempt (so a sandbox that moved to another port after a restart is found again).
    The function may raise :class:`GatewayUnavailable` (tried again) or another
    :class:`GatewayError` (fatal).

    A refused connect (bad token, unknown device) is not retried: it is raised from
    :meth:`start`, or delivered as a ``hermit.disconnected`` event with ``fatal: true``.
    """

    def __init__(
        self,
        url: str | Callable[[], Awaitable[str]],
        *,
        token: str,
        identity: DeviceIdentity,
        info: ClientInfo | None = None,
        origin: str | None = None,
        connect_timeout: float = 30.0,
        backoff: Backoff | None = None,
    ) -> None:
        self.url = url
        self._token = token
        self.identity = identity
        self.info = info or ClientInfo()
        self.origin = origin
        self.connect_timeout = connect_timeout
        self._backoff = backoff or Backoff()
        self._conn: GatewayConnection | None = None
        self._connected = asyncio.Event()
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self.fatal_error: GatewayError | None = None
        self.hello: HelloInfo | None = None

    def __repr__(self) -> str:
        return f"GatewayClient(url={self.url!r})"

    async def _resolve_url(self) -> str:
        return self.url if isinstance(self.url, str) else await self.url()

    @property
    def connection(self) -> GatewayConnection | None:
        return self._conn if self._connected.is_set() else None

    async def start(self) -> HelloInfo:
        """Connect, retrying with backoff for up to ``connect_timeout`` seconds.

        Return the ``hello-ok`` info. Raise :class:`GatewayUnavailable` on timeout and
        :class:`GatewayError` if the gateway refuses the connect.
        """
        conn = await self._connect_with_retry(time.monotonic() + self.connect_timeout)
        self._attach(conn)
        self._supervisor = asyncio.create_task(self._supervise(), name="openclaw-supervisor")
        return conn.hello

    async def __aenter__(self) -> GatewayClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _connect_with_retry(self, deadline: float) -> GatewayConnection:
        last: GatewayError | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GatewayUnavailable(
                    f"the gateway did not answer within {self.connect_timeout:g}s"
                    + (f" ({last.message})" if last else "")
                )
            try:
                url = await self._resolve_url()
                conn = await GatewayConnection.open(
                    url,
                    token=self._token,
                    identity=self.identity,
                    info=self.info,
                    timeout=min(10.0, max(remaining, 0.5)),
                    origin=self.origin,
                )
            except GatewayUnavailable as exc:
                last = exc
            except GatewayError as exc:
                if exc.code not in _RETRYABLE_CONNECT_CODES:
                    raise
                last = exc
            else:
                self._backoff.reset()
                return conn
            await asyncio.sleep(min(self._backoff.next_delay(), max(0.0, remaining)))

    def _attach(self, conn: GatewayConnection) -> None:
        previous = self.hello
        restarted = previous is not None and previous.boot_id != conn.hello.boot_id
        self._conn = conn
        self.hello = conn.hello
        self._connected.set()
        self._events.put_nowait(
            GatewayEvent(
                CONNECTED_EVENT,
                {"serverVersion": conn.hello.server_version, "restarted": restarted},
            )
        )
        conn.forward_events(self._events.put_nowait)  # its events follow, in order

    async def _supervise(self) -> None:
        while not self._closing:
            conn = self._conn
            assert conn is not None
            await conn.closed.wait()  # its events were all forwarded before it closed
            self._connected.clear()
            if self._closing:
                return
            self._events.put_nowait(GatewayEvent(DISCONNECTED_EVENT, {"fatal": False}))
            try:
                conn = await self._connect_with_retry(time.monotonic() + 365 * 86400.0)
            except GatewayError as exc:
                self.fatal_error = exc
                self._events.put_nowait(
                    GatewayEvent(DISCONNECTED_EVENT, {"fatal": True, "message": exc.message})
                )
                return
            if self._closing:
                await conn.close()
                return
            self._attach(conn)

    async def wait_connected(self, timeout: float) -> GatewayConnection:
        """Return the live connection, waiting up to ``timeout`` s for a reconnect."""
        if self.fatal_error is not None:
            raise self.fatal_error
        if self._closing:
            raise GatewayDisconnected("the client is closed")
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError as exc:
            raise GatewayUnavailable(
                f"the gateway is not back after {timeout:g}s; the message was not delivered"
            ) from exc
        assert self._conn is not None
        return self._conn

    async def request(
        self,
        method: str,
        params: Mapping[str, Any] | None = None,
        *,
        timeout: float = 30.0,
        retry: bool = False,
    ) -> dict[str, Any]:
        """Send a request on the live connection, waiting for a reconnect if needed.

        With ``retry=True`` (only for idempotent requests) a request cut off by a disconnect
        is sent again after the reconnect, until ``timeout`` seconds have passed in total.
        Raise :class:`GatewayUnavailable` if the gateway is not reachable in time.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            conn = await self.wait_connected(max(remaining, 0.0))
            try:
                return await conn.request(
                    method, params, timeout=max(deadline - time.monotonic(), 0.1)
                )
            except GatewayDisconnected:
                if not retry or self._closing:
                    raise
                # wait for the supervisor to notice the drop before retrying
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(conn.closed.wait(), 1.0)

    async def events(self) -> AsyncIterator[GatewayEvent]:
        """Yield events (gateway and ``hermit.*``) until :meth:`close`."""
        while True:
            item = await self._events.get()
            if item is _CLOSED:
                self._events.put_nowait(_CLOSED)
                return
            yield item

    async def event_batches(self, limit: int = 64) -> AsyncIterator[list[GatewayEvent]]:
        """:meth:`events` a batch at a time: each batch is the next event and those already
        waiting behind it (up to ``limit``), in order. A reader that fell behind catches up in
        one step per batch, and can merge what the batch holds (:func:`coalesce_deltas`)."""
        while True:
            batch: list[GatewayEvent] = []
            item = await self._events.get()
            while item is not _CLOSED:
                batch.append(item)
                if len(batch) >= limit or self._events.empty():
                    break
                item = self._events.get_nowait()
            if batch:
                yield batch
            if item is _CLOSED:
                self._events.put_nowait(_CLOSED)
                return

    async def chat_send(
        self,
        message: str,
        *,
        session_key: str = DEFAULT_SESSION_KEY,
        idempotency_key: str | None = None,
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        """Send a user message; return ``{"runId", "status"}``.

        Safe across gateway restarts: the idempotency key makes a resend a no-op if the first
        copy arrived. Raise :class:`GatewayUnavailable` if the gateway is not back in time.
        """
        params = {
            "sessionKey": session_key,
            "message": message,
            "idempotencyKey": idempotency_key or str(uuid.uuid4()),
        }
        return await self.request("chat.send", params, timeout=timeout, retry=True)

    async def chat_history(
        self, *, session_key: str = DEFAULT_SESSION_KEY, limit: int = 100, timeout: float = 30.0
    ) -> list[dict[str, Any]]:
        """Return the session's past messages, oldest first."""
        payload = await self.request(
            "chat.history",
            {"sessionKey": session_key, "limit": limit},
            timeout=timeout,
            retry=True,
        )
        messages = payload.get("messages")
        return messages if isinstance(messages, list) else []

    async def chat_abort(
        self,
        *,
        session_key: str = DEFAULT_SESSION_KEY,
        run_id: str | None = None,
        timeout: float = 15.0,
    ) -> dict[str, Any]:
        """Stop the named run, or every active run of the session."""
        params: dict[str, Any] = {"sessionKey": session_key}
        if run_id:
            params["runId"] = run_id
        return await self.request("chat.abort", params, timeout=timeout, retry=True)

    async def close(self) -> None:
        """Close the connection and stop reconnecting. Idempotent."""
        if self._closing:
            return
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(BaseException):
                await self._supervisor
        if self._conn is not None:
            await self._conn.close()
        self._connected.clear()
        self._events.put_nowait(_CLOSED)


# A gateway that is still starting may refuse connects for a moment.
_RETRYABLE_CONNECT_CODES = frozenset({"UNAVAILABLE", "GATEWAY_STARTING", "SERVICE_UNAVAILABLE"})
