"""The webchat consumer through the real ASGI router, against real OpenClaw gateways running in
real sandboxes (tests/fixtures/sandboxes.py), with the fake model server behind the AI gateway."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.utils import timezone

from portal.asgi import application
from sandboxes import actions
from sandboxes.backends import get_backend
from sandboxes.consumers.chat import (
    MAX_FRAME_CHARS,
    RESTARTED_MESSAGE,
    RESUMED_NOTICE,
    history_entries,
)
from sandboxes.models import Sandbox, SandboxEvent
from tests.factories import make_user
from tests.fakes.model_server import FakeModelServer
from tests.fixtures.chat import session_cookie

ORIGIN = b"http://testserver"
Frame = dict[str, Any]


def new_id() -> str:
    return uuid.uuid4().hex


async def open_chat(cookie: str | None, origin: bytes = ORIGIN) -> WebsocketCommunicator:
    headers = [(b"origin", origin), (b"host", b"testserver")]
    if cookie:
        headers.append((b"cookie", cookie.encode()))
    return WebsocketCommunicator(application, "/ws/chat/", headers=headers)


async def receive_until(
    comm: WebsocketCommunicator, done: Callable[[Frame], bool], timeout: float = 60.0
) -> list[Frame]:
    """Collect frames until one satisfies ``done`` (included); fail after ``timeout`` s."""
    frames: list[Frame] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AssertionError(f"no matching frame in {timeout}s; got {frames[-10:]}")
        frame = json.loads(await comm.receive_from(timeout=remaining))
        frames.append(frame)
        if done(frame):
            return frames


def is_type(kind: str, **match: Any) -> Callable[[Frame], bool]:
    return lambda f: f.get("type") == kind and all(f.get(k) == v for k, v in match.items())


async def connected_chat(cookie: str) -> tuple[WebsocketCommunicator, list[Frame]]:
    """Open a chat, wait until it is ready and its history arrived; return both."""
    comm = await open_chat(cookie)
    connected, code = await comm.connect(timeout=10)
    assert connected, code
    frames = await receive_until(comm, is_type("history"))
    assert any(f["type"] == "status" and f["state"] == "ready" for f in frames)
    return comm, frames


@pytest.fixture
def alice_sandbox(sandbox_for: Callable[..., Sandbox]) -> Sandbox:
    return sandbox_for("alice@chat.test")


@pytest.fixture
def alice_chat(alice_sandbox: Sandbox) -> str:
    return session_cookie(alice_sandbox.owner)


@pytest.fixture
def broken_bubblewrap(settings: Any, alice_sandbox: Sandbox) -> Any:
    """Make every sandbox start fail (quickly, cleanly) for the duration of a test."""
    settings.HERMIT_BWRAP = "/nonexistent/bwrap"
    get_backend.cache_clear()
    yield
    get_backend.cache_clear()


async def test_it_streams_a_reply_in_several_deltas(
    alice_chat: str, model_server: FakeModelServer
) -> None:
    model_server.script(reply="Streaming works, token by token.", chunks=5, delay=0.05)
    comm, _ = await connected_chat(alice_chat)
    try:
        msg = new_id()
        await comm.send_json_to({"type": "send", "id": msg, "text": "Hello agent"})
        frames = await receive_until(comm, is_type("final"))
        ack = next(f for f in frames if f["type"] == "ack")
        assert ack["id"] == msg and ack["runId"]
        deltas = [f for f in frames if f["type"] == "delta"]
        assert len(deltas) >= 2
        assert {f["runId"] for f in deltas} == {ack["runId"]}
        assert "".join(f["delta"] for f in deltas) == "Streaming works, token by token."
        assert frames[-1]["text"] == "Streaming works, token by token."
        assert all("token" not in k.lower() for f in frames for k in f)  # no secrets relayed
    finally:
        await comm.disconnect()


async def test_it_loads_history_after_a_reconnect(
    alice_chat: str, model_server: FakeModelServer
) -> None:
    model_server.script(reply="I will remember.", chunks=2)
    comm, _ = await connected_chat(alice_chat)
    text = f"remember {new_id()}"
    await comm.send_json_to({"type": "send", "id": new_id(), "text": text})
    await receive_until(comm, is_type("final"))
    await comm.disconnect()

    comm, frames = await connected_chat(alice_chat)
    try:
        history = frames[-1]["messages"]
        assert history[-2:] == [
            {"role": "user", "text": text, "runId": None},
            {"role": "assistant", "text": "I will remember.", "runId": history[-1]["runId"]},
        ]
        await comm.send_json_to({"type": "history"})
        again = await receive_until(comm, is_type("history"))
        assert again[-1]["messages"] == history
    finally:
        await comm.disconnect()


async def test_it_aborts_a_reply(alice_chat: str, model_server: FakeModelServer) -> None:
    model_server.script(reply=" ".join(f"w{i}" for i in range(80)), chunks=80, delay=0.1)
    comm, _ = await connected_chat(alice_chat)
    try:
        await comm.send_json_to({"type": "send", "id": new_id(), "text": "talk a lot"})
        first = (await receive_until(comm, is_type("delta")))[-1]
        await comm.send_json_to({"type": "abort", "runId": first["runId"]})
        frames = await receive_until(comm, lambda f: f["type"] in ("aborted", "final"), 20)
        assert frames[-1]["type"] == "aborted"
        assert frames[-1]["runId"] == first["runId"]
        assert frames[-1]["text"].startswith("w0")
    finally:
        await comm.disconnect()


async def test_it_keeps_the_conversation_through_a_gateway_restart(
    alice_chat: str, alice_sandbox: Sandbox, model_server: FakeModelServer, sandbox_pool: Any
) -> None:
    comm, _ = await connected_chat(alice_chat)
    try:
        # a reply cut off by the restart is reported, not left hanging
        model_server.script(reply=" ".join(f"w{i}" for i in range(200)), chunks=200, delay=0.1)
        await comm.send_json_to({"type": "send", "id": new_id(), "text": "a long answer"})
        cut = (await receive_until(comm, is_type("delta")))[-1]
        # the sandbox is stopped under the chat; the chat wakes it again by itself
        await database_sync_to_async(actions.stop_sandbox)(alice_sandbox)
        await receive_until(comm, is_type("status", state="reconnecting"), 20)

        # a message sent while the gateway is down is delivered once it is back
        model_server.script(reply="Back again.", chunks=3)
        msg = new_id()
        await comm.send_json_to({"type": "send", "id": msg, "text": "are you there?"})
        frames = await receive_until(comm, is_type("ack"), 120)
        assert any(f["type"] == "status" and f["state"] == "waking" for f in frames)
        assert frames[-1]["id"] == msg
        assert {"type": "run_error", "runId": cut["runId"], "message": RESTARTED_MESSAGE} in frames

        # the gateway resumes the interrupted turn and answers the new message: the
        # conversation ends with an answer after "are you there?"
        def answered(history: list[Frame]) -> bool:
            users = [i for i, m in enumerate(history) if m["text"] == "are you there?"]
            return (
                bool(users)
                and history[-1]["role"] == "assistant"
                and history[-1]["text"] == "Back again."
                and users[-1] < len(history) - 1
            )

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 90
        history: list[Frame] = []
        while not answered(history):
            assert loop.time() < deadline, history[-4:]
            await receive_until(comm, lambda f: f["type"] == "final" and f["text"], 90)
            await comm.send_json_to({"type": "history"})
            history = (await receive_until(comm, is_type("history")))[-1]["messages"]
        assert {"role": "user", "text": "a long answer", "runId": None} in history
        # OpenClaw's own "[System] Your previous turn was interrupted ..." prompt is not shown
        # as the user's: it is a notice
        assert not any("[System]" in m["text"] for m in history), history
        assert {"role": "notice", "text": RESUMED_NOTICE, "runId": None} in history
    finally:
        await comm.disconnect()
        # the pool restores rows from its snapshot before each test: record the new gateway
        await database_sync_to_async(sandbox_pool.snapshot)("alice@chat.test")


async def test_it_tells_the_user_plainly_when_a_message_cannot_be_delivered(
    alice_chat: str, alice_sandbox: Sandbox, broken_bubblewrap: None
) -> None:
    comm, _ = await connected_chat(alice_chat)
    try:
        await database_sync_to_async(actions.stop_sandbox)(alice_sandbox)
        frames = await receive_until(comm, is_type("status", state="failed"), 60)
        assert "could not start" in frames[-1]["message"]
        msg = new_id()
        await comm.send_json_to({"type": "send", "id": msg, "text": "hello?"})
        frames = await receive_until(comm, is_type("error", code="send_failed"), 20)
        assert frames[-1]["id"] == msg
        assert frames[-1]["message"].startswith("Your message was not delivered")
    finally:
        await comm.disconnect()


async def test_it_answers_bad_frames_with_an_error_and_keeps_the_session(
    alice_chat: str,
) -> None:
    comm, _ = await connected_chat(alice_chat)
    try:
        cases: list[tuple[str | bytes, str]] = [
            ("not json", "bad_json"),
            ("[1, 2]", "bad_frame"),
            (json.dumps({"type": "launch-missiles"}), "bad_frame"),
            (json.dumps({"type": "send", "text": "no id"}), "bad_frame"),
            (json.dumps({"type": "send", "id": "short", "text": "x"}), "bad_frame"),
            (json.dumps({"type": "send", "id": new_id(), "text": "   "}), "bad_frame"),
            (json.dumps({"type": "abort", "runId": 5}), "bad_frame"),
            ("x" * (MAX_FRAME_CHARS + 1), "too_large"),
            (b"\x00\x01binary", "bad_frame"),
        ]
        for payload, code in cases:
            if isinstance(payload, bytes):
                await comm.send_to(bytes_data=payload)
            else:
                await comm.send_to(text_data=payload)
            frame = json.loads(await comm.receive_from(timeout=5))
            assert frame["type"] == "error" and frame["code"] == code, (payload[:40], frame)
            assert frame["message"]
        await comm.send_json_to({"type": "ping"})
        assert json.loads(await comm.receive_from(timeout=5)) == {"type": "pong"}
    finally:
        await comm.disconnect()


async def test_it_caps_the_message_rate(alice_chat: str, model_server: FakeModelServer) -> None:
    comm, _ = await connected_chat(alice_chat)
    try:
        for _ in range(40):
            await comm.send_json_to({"type": "ping"})
        frames = [json.loads(await comm.receive_from(timeout=5)) for _ in range(40)]
        limited = [f for f in frames if f["type"] == "error"]
        assert limited and all(f["code"] == "rate_limited" for f in limited)
        assert sum(f["type"] == "pong" for f in frames) >= 20
    finally:
        await comm.disconnect()


async def test_it_counts_frames_as_activity(alice_sandbox: Sandbox, alice_chat: str) -> None:
    an_hour_ago = timezone.now() - timedelta(hours=1)
    await sync_to_async(Sandbox.objects.filter(pk=alice_sandbox.pk).update)(
        last_activity_at=an_hour_ago
    )
    comm, _ = await connected_chat(alice_chat)
    try:
        sandbox = await Sandbox.objects.aget(pk=alice_sandbox.pk)
        assert sandbox.last_activity_at > an_hour_ago + timedelta(minutes=59)
    finally:
        await comm.disconnect()


async def test_it_refuses_anonymous_users_and_foreign_origins(alice_chat: str) -> None:
    comm = await open_chat(None)
    connected, code = await comm.connect(timeout=10)
    assert not connected and code == 4401
    comm = await open_chat(alice_chat, origin=b"http://evil.example")
    connected, _ = await comm.connect(timeout=10)
    assert not connected


async def test_bob_cannot_open_alices_chat(
    alice_chat: str,
    alice_sandbox: Sandbox,
    model_server: FakeModelServer,
    broken_bubblewrap: None,
) -> None:
    secret = f"alice's secret {new_id()}"
    comm, _ = await connected_chat(alice_chat)
    await comm.send_json_to({"type": "send", "id": new_id(), "text": secret})
    await receive_until(comm, is_type("final"))
    await comm.disconnect()

    # bob without a sandbox gets nothing at all
    bob = await sync_to_async(make_user)("bob@chat.test")
    await sync_to_async(Sandbox.objects.filter(owner=bob).delete)()
    bob_cookie = await sync_to_async(session_cookie)(bob)
    comm = await open_chat(bob_cookie)
    connected, code = await comm.connect(timeout=10)
    assert not connected and code == 4404

    # bob's chat only ever reaches bob's own sandbox (which cannot start here), never alice's
    bob_sandbox = await sync_to_async(Sandbox.objects.create)(owner=bob, state="stopped")
    comm = await open_chat(bob_cookie)
    connected, _ = await comm.connect(timeout=10)
    assert connected
    try:
        frames = await receive_until(comm, is_type("status", state="failed"), 60)
        assert secret not in json.dumps(frames)
        assert not any(f["type"] == "history" for f in frames)
    finally:
        await comm.disconnect()
    await sync_to_async(bob_sandbox.refresh_from_db)()
    assert bob_sandbox.state == "failed" and bob_sandbox.pk != alice_sandbox.pk
    await sync_to_async(alice_sandbox.refresh_from_db)()
    assert alice_sandbox.state == "running"


# A restart-recovery turn as the real gateway returns it in chat.history (openclaw 2026.9.6,
# recorded after a restart mid-reply; the prompt text is cut short here).
RECOVERY_TURN: Frame = {
    "role": "user",
    "content": "[System] Your previous turn was interrupted by a gateway restart while "
    "OpenClaw was waiting on tool/model work. The restart did not cancel the user's task.",
    "timestamp": 1795384536922,
    "idempotencyKey": "8362a588-a5da-420c-90e8-6392bd535479:user",
    "provenance": {
        "kind": "internal_system",
        "sourceSessionKey": "agent:main:main",
        "sourceTool": "main_session_restart_recovery",
    },
    "__openclaw": {"senderIsOwner": False, "id": "b02f7581", "seq": 2},
}


def test_it_shows_the_gateways_own_turns_as_notices_or_not_at_all() -> None:
    other_internal = {**RECOVERY_TURN, "provenance": {"kind": "internal_system"}}
    user_typed = {"role": "user", "content": "[System] I typed this myself"}
    reply = {
        "role": "assistant",
        "content": [{"type": "text", "text": "Resumed."}],
        "__openclaw": {"runId": "r1"},
    }
    assert history_entries([RECOVERY_TURN, other_internal, user_typed, reply]) == [
        {"role": "notice", "text": RESUMED_NOTICE, "runId": None},
        {"role": "user", "text": "[System] I typed this myself", "runId": None},
        {"role": "assistant", "text": "Resumed.", "runId": "r1"},
    ]


async def test_it_restarts_a_killed_gateway_at_once_and_only_once(
    alice_chat: str, alice_sandbox: Sandbox, model_server: FakeModelServer, sandbox_pool: Any
) -> None:
    """Two tabs see the gateway die (kill -9 mid-reply): the restart begins within seconds,
    without reconcile (not running here), and happens once."""
    first, _ = await connected_chat(alice_chat)
    second, _ = await connected_chat(alice_chat)
    try:
        model_server.script(reply=" ".join(f"w{i}" for i in range(200)), chunks=200, delay=0.1)
        await first.send_json_to({"type": "send", "id": new_id(), "text": "a long answer"})
        await receive_until(first, is_type("delta"))
        killed_at = timezone.now()
        os.kill(alice_sandbox.backend_state["main"][0], signal.SIGKILL)

        def starts() -> list[SandboxEvent]:
            return list(
                SandboxEvent.objects.filter(
                    sandbox=alice_sandbox, kind="state", state="starting", created_at__gt=killed_at
                )
            )

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 8
        while not await sync_to_async(starts)():
            assert loop.time() < deadline, "no restart began within 8 s of the crash"
            await asyncio.sleep(0.2)

        for comm in (first, second):
            await receive_until(comm, is_type("status", state="ready"), 120)
        model_server.script(reply="Back again.", chunks=2)
        await second.send_json_to({"type": "send", "id": new_id(), "text": "still there?"})
        await receive_until(second, lambda f: f["type"] == "final" and f["text"], 90)

        assert len(await sync_to_async(starts)()) == 1
        crashes = await sync_to_async(
            SandboxEvent.objects.filter(sandbox=alice_sandbox, kind="crashed").count
        )()
        assert crashes == 1
        sandbox = await Sandbox.objects.aget(pk=alice_sandbox.pk)
        assert sandbox.state == Sandbox.State.RUNNING
    finally:
        await first.disconnect()
        await second.disconnect()
        await database_sync_to_async(sandbox_pool.snapshot)("alice@chat.test")
