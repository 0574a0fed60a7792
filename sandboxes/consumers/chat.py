"""Webchat: the browser talks to this consumer, the consumer talks to the user's gateway.

The consumer authenticates the Django session, checks the Origin, gets the user's sandbox
through :func:`sandboxes.access.aget_sandbox_for_user` only, wakes it if it is asleep, and
connects to its gateway as an OpenClaw protocol-v4 client signed with the sandbox's device key.
The gateway token and the device key never leave the server.

Browser protocol (JSON text frames on ``/ws/chat/``)
----------------------------------------------------
Browser → server:

- ``{"type": "send", "id": ID, "text": TEXT}``: a user message. ``ID`` (8-64 chars of
  ``[A-Za-z0-9_-]``) is chosen by the browser and doubles as the gateway's idempotency key, so
  resending the same ``ID`` after a reconnect never delivers a message twice.
- ``{"type": "abort"}`` or ``{"type": "abort", "runId": RUN}``: stop the reply.
- ``{"type": "history"}``: ask for the conversation again.
- ``{"type": "ping"}``: answered by ``{"type": "pong"}``.

Server → browser:

- ``{"type": "status", "state": S, "message": M, "progress": P|null}`` with ``S`` one of
  ``waking`` (the sandbox is starting, ``P`` 0-100), ``connecting``, ``ready``,
  ``reconnecting`` (the gateway went away; sends wait for it), ``failed`` (fatal; ``M`` says why).
- ``{"type": "history", "messages": [{"role": "user"|"assistant"|"notice", "text", "runId"}]}``:
  sent when ready, after every reconnect, and on request. Turns the gateway injected itself
  (``provenance.kind == "internal_system"``, such as its "[System] Your previous turn was
  interrupted ..." prompt after a restart) are not the user's: the restart prompt becomes a
  ``notice`` with :data:`RESUMED_NOTICE`, the others are left out.
- ``{"type": "ack", "id": ID, "runId": RUN}``: the gateway accepted message ``ID``.
- ``{"type": "phase", "runId", "phase"}``: what the agent is doing before text arrives.
- ``{"type": "delta", "runId", "delta"}``: new reply text, appended in order (a session that
  fell behind gets the deltas waiting for it merged into one frame).
- ``{"type": "final", "runId", "text"}``: the complete reply (replaces the streamed text).
- ``{"type": "aborted", "runId", "text"}``: the reply was stopped; ``text`` is what was kept.
- ``{"type": "run_error", "runId", "message"}``: the reply failed (model error), or the
  agent restarted while answering (the gateway resumes interrupted turns after a restart, as a
  new run whose frames follow).
- A ``final`` may carry an empty ``text`` when the gateway folded the message into a run that
  was already answering (its reply arrives under that run).
- ``{"type": "error", "code", "message", "id"?}``: a frame was refused (``bad_json``,
  ``bad_frame``, ``too_large``, ``rate_limited``) or a message could not be delivered
  (``send_failed``, with the message ``id``). The session stays open.

Wakes run in the privileged worker on the sandbox's host, never here (this process is
unprivileged): the consumer queues :func:`sandboxes.tasks_host.wake` and follows it, showing the
sandbox's own progress events (its channel-layer group, sandboxes.events; with the in-process
layer of the embedded default, read from the database every second) as ``waking`` statuses,
until the task's reply (sent to this consumer's channel, and kept in the cache) says running or
why not. No reply and no progress for :data:`WAKE_TIMEOUT` seconds fails the chat with a
sentence saying so. A doze is thawed the same way (:func:`sandboxes.tasks_host.thaw`).

Crashes: when the connection drops, every reconnect attempt first has the worker ask the
backend whether the gateway still runs (the wake task's ``check_crash``, through
:func:`sandboxes.actions.mark_crashed`); a dead one is marked failed and woken at once, so
recovery does not wait for reconcile. Several tabs on the same sandbox race through conditional
UPDATEs: one restarts it, the others follow that start.

Limits: frames over :data:`MAX_FRAME_CHARS` and more than the token-bucket rates are answered
with an error frame and ignored. Every frame in either direction counts as activity for the
sleep schedule (written to the database at most every 30 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import InMemoryChannelLayer
from django.http import Http404

from sandboxes import actions, chat_sessions, hostlink, sleep, tasks_host
from sandboxes.access import aget_sandbox_for_user
from sandboxes.backends.base import BackendError
from sandboxes.consumers.base import RelaySocket, admit
from sandboxes.consumers.progress import events_after, latest_event_id
from sandboxes.events import group_name
from sandboxes.models import Sandbox
from sandboxes.openclaw.protocol import (
    CONNECTED_EVENT,
    DISCONNECTED_EVENT,
    DeviceIdentity,
    GatewayClient,
    GatewayError,
    GatewayEvent,
    GatewayUnavailable,
    coalesce_deltas,
)

log = logging.getLogger(__name__)

MAX_FRAME_CHARS = 64 * 1024
MAX_MESSAGE_CHARS = 32 * 1024
SEND_TIMEOUT = 90.0  # how long a message waits for a restarting gateway before failing
READY_TIMEOUT = 180.0  # how long a send waits for the first connection (wake + connect)
WAKE_TIMEOUT = 120.0  # how long a wake may go without progress or reply before the chat fails
THAW_TIMEOUT = 10.0  # how long a frame waits for a doze to be thawed (milliseconds, normally)
WAKE_POLL = 1.0  # the cache (and, with the in-process layer, the events) are read this often
ACTIVITY_INTERVAL = 30.0
HISTORY_LIMIT = 200
SESSION_KEY = "main"
RESTARTED_MESSAGE = (
    "Your agent restarted while answering. It resumes interrupted work by itself; "
    "its reply will appear below."
)
RESUMED_NOTICE = "Your agent restarted while answering and picked up where it left off."
MESSAGE_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
# OpenClaw's own turns in the transcript: provenance.kind, and the tool that wrote the turn.
INTERNAL_PROVENANCE = "internal_system"
RESTART_RECOVERY_TOOL = "main_session_restart_recovery"


@dataclass
class TokenBucket:
    """``capacity`` tokens, refilled at ``rate`` per second; :meth:`take` spends one."""

    capacity: float
    rate: float
    tokens: float = -1.0
    stamp: float = 0.0

    def take(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if self.tokens < 0:
            self.tokens, self.stamp = self.capacity, now
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def device_identity_for(sandbox: Sandbox) -> DeviceIdentity:
    """Return the sandbox's gateway device key, creating and saving it on first use.

    The key is stored encrypted on the row. Two first connects racing both generate a key;
    the conditional UPDATE lets one win and the other reloads it.
    """
    if sandbox.device_private_key:
        return DeviceIdentity.from_private_key_b64(sandbox.device_private_key)
    identity = DeviceIdentity.generate()
    Sandbox.objects.filter(pk=sandbox.pk, device_private_key="").update(
        device_private_key=identity.private_key_b64()  # the field encrypts it
    )
    sandbox.refresh_from_db(fields=["device_private_key"])
    return DeviceIdentity.from_private_key_b64(sandbox.device_private_key)


def message_text(message: Any) -> str:
    """Return the plain text of a gateway chat message (string or list of content parts)."""
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return str(message.get("text") or "")


def history_entry(message: dict[str, Any]) -> dict[str, Any] | None:
    """Return the browser's ``{role, text, runId}`` entry for one ``chat.history`` message, or
    None if the browser should not see it.

    A turn the gateway injected (``provenance.kind`` ``internal_system``) is never shown as the
    user's: its restart-recovery prompt becomes a ``notice``, any other is left out.
    """
    role, text = message.get("role"), message_text(message)
    meta = message.get("__openclaw") or {}
    provenance = message.get("provenance")
    if isinstance(provenance, dict) and provenance.get("kind") == INTERNAL_PROVENANCE:
        if provenance.get("sourceTool") == RESTART_RECOVERY_TOOL:
            return {"role": "notice", "text": RESUMED_NOTICE, "runId": None}
        return None
    if role not in ("user", "assistant") or not text:
        return None
    return {"role": role, "text": text, "runId": meta.get("runId")}


def history_entries(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Turn ``chat.history`` messages into the browser's entries (see :func:`history_entry`)."""
    return [entry for m in messages if isinstance(m, dict) and (entry := history_entry(m))]


class ChatConsumer(RelaySocket):
    """One browser tab's chat session with the user's own agent."""

    sandbox: Sandbox
    client: GatewayClient | None = None
    wake_token: str | None = None  # the wake this tab follows, if any
    wake_shown = False  # whether that wake's progress was shown

    async def connect(self) -> None:
        sandbox = await admit(self)
        if sandbox is None:
            return
        self.sandbox = sandbox
        self.user = self.scope["user"]
        self.tasks: set[asyncio.Task[Any]] = set()
        self.replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.wake_heard = 0.0
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.ready = asyncio.Event()
        self.failed: str | None = None
        self.frames = TokenBucket(capacity=30, rate=10)
        self.sends = TokenBucket(capacity=10, rate=1.0)  # a message a second, bursts of 10
        self.last_activity = 0.0
        self.active_runs: set[str] = set()
        self.session_keys = {SESSION_KEY, f"agent:main:{SESSION_KEY}"}
        await self.accept()
        suspended = await database_sync_to_async(actions.suspension_notice)(sandbox)
        if suspended:  # say why, and never wake the agent
            await self._fail(suspended)
        else:
            self._spawn(self._run_gateway())
        self._spawn(self._run_outbox())
        self._spawn(chat_sessions.hold())  # counted open until disconnect cancels it
        await self._touch()

    async def disconnect(self, code: int) -> None:
        for task in list(getattr(self, "tasks", ())):
            task.cancel()
        for task in list(getattr(self, "tasks", ())):
            with contextlib.suppress(BaseException):
                await task
        if self.client is not None:
            await self.client.close()
            self.client = None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # --- to the browser --------------------------------------------------------------------
    async def _send(self, frame: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(frame))

    async def _status(self, state: str, message: str, progress: int | None = None) -> None:
        await self._send(
            {"type": "status", "state": state, "message": message, "progress": progress}
        )

    async def _error(self, code: str, message: str, **extra: Any) -> None:
        await self._send({"type": "error", "code": code, "message": message, **extra})

    async def _touch(self, *, from_gateway: bool = False) -> None:
        """Count activity; write it to the database at most every ACTIVITY_INTERVAL seconds.
        A frame from the browser thaws a dozing sandbox first (a cache lookup per frame tells).
        A frame from the gateway proves it is not frozen, so it skips that lookup: it sat on the
        relay's hot path, a thread hop per streamed delta (bench/chat_relay.py)."""
        if not from_gateway and await sleep.ais_dozing(self.sandbox.pk):
            await self._thaw()
        now = time.monotonic()
        if now - self.last_activity < ACTIVITY_INTERVAL:
            return
        self.last_activity = now
        await database_sync_to_async(actions.record_activity)(self.sandbox)

    # --- the gateway side ------------------------------------------------------------------
    async def _thaw(self) -> None:
        """Have the worker thaw the dozing sandbox; wait for it (this runs in the dispatch of a
        browser frame, so the reply is read from the cache, not this consumer's channel)."""
        token = tasks_host.new_token()
        user_id = getattr(self.user, "pk", None)
        await database_sync_to_async(tasks_host.thaw.delay, thread_sensitive=False)(
            self.sandbox.pk, user_id, token
        )
        if await tasks_host.await_reply(token, THAW_TIMEOUT, poll=0.02) is None:
            log.warning("chat for sandbox %s: no thaw within %ss", self.sandbox.pk, THAW_TIMEOUT)

    async def _gateway_url(self) -> str:
        """Wake the sandbox if needed (streaming progress) and return its gateway's URL.

        On a reconnect (the gateway went away), the worker checks the gateway first: a dead one
        is marked crashed and woken now, rather than at the next reconcile.
        """
        await self._refresh()
        reconnecting = self.client is not None and self.client.hello is not None
        if reconnecting or self.sandbox.state != Sandbox.State.RUNNING:
            await self._wake(check_crash=reconnecting)
            await self._refresh()
        try:
            if await database_sync_to_async(hostlink.is_remote)(self.sandbox):
                # On another host: through its edge, with a fresh single-use token each time.
                return await database_sync_to_async(hostlink.gateway_url)(self.sandbox)
            host, port = await database_sync_to_async(actions.gateway_endpoint)(self.sandbox)
        except BackendError as exc:  # e.g. stopped meanwhile: try again (and wake) shortly
            raise GatewayUnavailable(str(exc)) from exc
        return f"ws://{host}:{port}"

    async def _refresh(self) -> None:
        """Re-read the sandbox (a wake may have adopted another row: follow the user's)."""
        try:
            await database_sync_to_async(self.sandbox.refresh_from_db)()
        except Sandbox.DoesNotExist:
            try:
                self.sandbox = await aget_sandbox_for_user(self.user)
            except Http404:
                raise GatewayError("NO_SANDBOX", "Your agent no longer exists.") from None

    async def _wake(self, *, check_crash: bool = False) -> None:
        """Queue a wake on the sandbox's host and follow it to its reply (module docstring).
        Raise GatewayError if it failed or went quiet for WAKE_TIMEOUT seconds."""
        loop = asyncio.get_running_loop()
        token = tasks_host.new_token()
        reply_to: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.replies[token] = reply_to
        group = group_name(self.sandbox.pk)
        await self.channel_layer.group_add(group, self.channel_name)
        shown = not check_crash  # a check of a live gateway shows nothing
        if shown:
            await self._status("waking", "Waking your agent…", 0)
        self.wake_token, self.wake_heard = token, loop.time()
        try:
            last_event = await latest_event_id(self.sandbox.pk)
            await database_sync_to_async(tasks_host.wake.delay, thread_sensitive=False)(
                self.sandbox.pk,
                getattr(self.user, "pk", None),
                token,
                self.channel_name,
                check_crash,
            )
            reply = await self._follow_wake(token, reply_to, last_event)
        finally:
            self.wake_token = None
            self.replies.pop(token, None)
            await self.channel_layer.group_discard(group, self.channel_name)
        if not reply.get("ok"):
            raise GatewayError(
                "WAKE_FAILED", str(reply.get("message") or "Your agent could not start.")
            )
        if shown or self.wake_shown:
            await self._status("connecting", "Connecting to your agent…")

    async def _follow_wake(
        self, token: str, reply_to: asyncio.Future[dict[str, Any]], last_event: int
    ) -> dict[str, Any]:
        """Wait for the wake's reply: from this consumer's channel, else from the cache; with
        the in-process layer, show progress from the database meanwhile."""
        loop = asyncio.get_running_loop()
        self.wake_shown = False
        polling = isinstance(self.channel_layer, InMemoryChannelLayer)
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(reply_to), WAKE_POLL)
            except TimeoutError:
                pass
            found = await database_sync_to_async(tasks_host.take_reply, thread_sensitive=False)(
                token
            )
            if found is not None:
                return found
            if polling:
                for event in await events_after(self.sandbox.pk, last_event):
                    last_event = event["id"]
                    await self.sandbox_event(event)
            if loop.time() - self.wake_heard > WAKE_TIMEOUT:
                raise GatewayError(
                    "WAKE_TIMEOUT",
                    "Your agent's host did not answer in time. Reload the page to try again.",
                )

    async def sandbox_event(self, event: dict[str, Any]) -> None:
        """A progress event of the sandbox (its channel-layer group): while a wake is followed,
        shown as a ``waking`` status."""
        if self.wake_token is None:
            return
        self.wake_heard = asyncio.get_running_loop().time()
        if event.get("progress") is not None:
            self.wake_shown = True
            await self._status("waking", str(event.get("message") or ""), event["progress"])

    async def host_reply(self, event: dict[str, Any]) -> None:
        """A task's reply sent to this consumer's channel (sandboxes.tasks_host)."""
        future = self.replies.get(str(event.get("token")))
        if future is not None and not future.done():
            future.set_result(event.get("reply") or {})

    async def _run_gateway(self) -> None:
        try:
            identity = await database_sync_to_async(device_identity_for)(self.sandbox)
            await self._status("connecting", "Connecting to your agent…")
            self.client = GatewayClient(
                self._gateway_url,
                token=self.sandbox.gateway_token,
                identity=identity,
                connect_timeout=READY_TIMEOUT,
            )
            await self.client.start()
        except GatewayError as exc:
            await self._fail(exc.message)
            log.warning("chat for sandbox %s could not connect: %s", self.sandbox.pk, exc.code)
            return
        except Exception:
            log.exception("chat for sandbox %s: unexpected error while connecting", self.sandbox.pk)
            await self._fail("Something went wrong while connecting to your agent.")
            return
        # A session that fell behind sends the deltas waiting for it as one frame each run.
        async for batch in self.client.event_batches():
            for event in coalesce_deltas(batch) if len(batch) > 1 else batch:
                await self._on_event(event)

    async def _fail(self, message: str) -> None:
        self.failed = message
        await self._status("failed", message)
        self.ready.set()

    async def _on_event(self, event: GatewayEvent) -> None:
        name, payload = event.event, event.payload
        if name == CONNECTED_EVENT:
            await self._on_connected(restarted=bool(payload.get("restarted")))
        elif name == DISCONNECTED_EVENT:
            await self._on_disconnected(payload)
        elif name == "chat" and payload.get("sessionKey") in self.session_keys:
            await self._relay_chat(payload)

    async def _on_connected(self, *, restarted: bool) -> None:
        assert self.client is not None and self.client.hello is not None
        defaults = (self.client.hello.raw.get("snapshot") or {}).get("sessionDefaults") or {}
        if defaults.get("mainSessionKey"):
            self.session_keys.add(str(defaults["mainSessionKey"]))
        if restarted:
            for run_id in sorted(self.active_runs):
                await self._send(
                    {
                        "type": "run_error",
                        "runId": run_id,
                        "message": RESTARTED_MESSAGE,
                    }
                )
            self.active_runs.clear()
        await self._status("ready", "Connected")
        self.ready.set()
        await self._send_history()

    async def _on_disconnected(self, payload: dict[str, Any]) -> None:
        if payload.get("fatal"):
            self.failed = str(payload.get("message") or "The agent is unavailable.")
            await self._status("failed", self.failed)
        else:
            await self._status("reconnecting", "Your agent went away; reconnecting…")

    async def _relay_chat(self, payload: dict[str, Any]) -> None:
        run_id, state = payload.get("runId"), payload.get("state")
        if state == "delta":
            self.active_runs.add(str(run_id))
            await self._send(
                {"type": "delta", "runId": run_id, "delta": payload.get("deltaText") or ""}
            )
        elif state == "final":
            self.active_runs.discard(str(run_id))
            await self._send(
                {"type": "final", "runId": run_id, "text": message_text(payload.get("message"))}
            )
        elif state == "aborted":
            self.active_runs.discard(str(run_id))
            await self._send(
                {"type": "aborted", "runId": run_id, "text": message_text(payload.get("message"))}
            )
        elif state == "error":
            self.active_runs.discard(str(run_id))
            await self._send(
                {
                    "type": "run_error",
                    "runId": run_id,
                    "message": payload.get("errorMessage") or "The reply failed.",
                }
            )
        elif state == "status":
            await self._send({"type": "phase", "runId": run_id, "phase": payload.get("phase")})
        else:
            return
        await self._touch(from_gateway=True)

    async def _send_history(self) -> None:
        assert self.client is not None
        try:
            messages = await self.client.chat_history(
                session_key=SESSION_KEY, limit=HISTORY_LIMIT, timeout=15
            )
        except GatewayError as exc:
            await self._error("history_failed", f"Could not load the conversation: {exc.message}")
            return
        await self._send({"type": "history", "messages": history_entries(messages)})

    async def _run_outbox(self) -> None:
        """Deliver user messages one at a time, in order, waiting out gateway restarts."""
        while True:
            frame = await self.outbox.get()
            try:
                await self._deliver(frame)
            except GatewayError as exc:
                await self._error(
                    "send_failed",
                    f"Your message was not delivered: {exc.message}",
                    id=frame["id"],
                )

    async def _deliver(self, frame: dict[str, Any]) -> None:
        try:
            await asyncio.wait_for(self.ready.wait(), READY_TIMEOUT)
        except TimeoutError:
            raise GatewayUnavailable("your agent did not start in time.") from None
        if self.client is None or self.failed:
            raise GatewayUnavailable(self.failed or "your agent is unavailable.")
        res = await self.client.chat_send(
            frame["text"],
            session_key=SESSION_KEY,
            idempotency_key=frame["id"],
            timeout=SEND_TIMEOUT,
        )
        await self._send({"type": "ack", "id": frame["id"], "runId": res.get("runId")})

    # --- from the browser ------------------------------------------------------------------
    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        await self._touch()
        if not self.frames.take():
            await self._error("rate_limited", "Too many frames; slow down.")
            return
        if text_data is None:
            await self._error("bad_frame", "Only JSON text frames are accepted.")
            return
        if len(text_data) > MAX_FRAME_CHARS:
            await self._error("too_large", f"Frames are limited to {MAX_FRAME_CHARS} characters.")
            return
        try:
            frame = json.loads(text_data)
        except ValueError:
            await self._error("bad_json", "That frame is not valid JSON.")
            return
        if not isinstance(frame, dict):
            await self._error("bad_frame", "A frame must be a JSON object with a type.")
            return
        handler = self.HANDLERS.get(str(frame.get("type")))
        if handler is None:
            await self._error("bad_frame", f"Unknown frame type {str(frame.get('type'))[:40]!r}.")
            return
        if frame.get("type") in ("abort", "history"):
            self._spawn(handler(self, frame))  # these wait on the gateway; keep receiving
        else:
            await handler(self, frame)

    async def _on_send(self, frame: dict[str, Any]) -> None:
        msg_id, text = frame.get("id"), frame.get("text")
        if not isinstance(msg_id, str) or not MESSAGE_ID.match(msg_id):
            await self._error("bad_frame", "A send needs an id of 8-64 letters, digits, - or _.")
            return
        if not isinstance(text, str) or not text.strip():
            await self._error("bad_frame", "A send needs a non-empty text.", id=msg_id)
            return
        if len(text) > MAX_MESSAGE_CHARS:
            await self._error(
                "too_large", f"Messages are limited to {MAX_MESSAGE_CHARS} characters.", id=msg_id
            )
            return
        if not self.sends.take():
            await self._error(
                "rate_limited", "You are sending messages too fast; wait a moment.", id=msg_id
            )
            return
        self.outbox.put_nowait({"id": msg_id, "text": text})

    async def _on_abort(self, frame: dict[str, Any]) -> None:
        run_id = frame.get("runId")
        if run_id is not None and not isinstance(run_id, str):
            await self._error("bad_frame", "runId must be a string.")
            return
        if self.client is None or not self.ready.is_set():
            await self._error("abort_failed", "Your agent is not connected yet.")
            return
        try:
            await self.client.chat_abort(session_key=SESSION_KEY, run_id=run_id or None)
        except GatewayError as exc:
            await self._error("abort_failed", f"Could not stop the reply: {exc.message}")

    async def _on_history(self, frame: dict[str, Any]) -> None:
        if self.client is not None and self.ready.is_set() and not self.failed:
            await self._send_history()

    async def _on_ping(self, frame: dict[str, Any]) -> None:
        await self._send({"type": "pong"})

    HANDLERS: dict[str, Callable[[ChatConsumer, dict[str, Any]], Any]] = {
        "send": _on_send,
        "abort": _on_abort,
        "history": _on_history,
        "ping": _on_ping,
    }
