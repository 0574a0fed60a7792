"""The OpenClaw protocol client against a real gateway (tests/fixtures/chat.py) and the capture."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sandboxes.openclaw.protocol import (
    CONNECTED_EVENT,
    DISCONNECTED_EVENT,
    Backoff,
    ClientInfo,
    DeviceIdentity,
    GatewayClient,
    GatewayError,
    GatewayEvent,
    GatewayUnavailable,
    build_connect_params,
    coalesce_deltas,
    device_auth_payload,
)
from tests.fakes.model_server import FakeModelServer
from tests.fixtures.chat import BareGateway, free_port

CAPTURE = Path("/work/shared/openclaw/captures/ws1.jsonl")
TERMINAL = {"final", "error", "aborted"}


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def session_key() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


async def collect_run(
    client: GatewayClient, run_id: str, timeout: float = 60.0
) -> list[dict[str, Any]]:
    """Return the ``chat`` payloads of one run, up to and including its terminal state."""
    frames: list[dict[str, Any]] = []

    async def read() -> None:
        async for event in client.events():
            if event.event == "chat" and event.payload.get("runId") == run_id:
                frames.append(event.payload)
                if event.payload.get("state") in TERMINAL:
                    return

    await asyncio.wait_for(read(), timeout)
    return frames


async def next_event(client: GatewayClient, name: str, timeout: float = 60.0) -> GatewayEvent:
    async def find() -> GatewayEvent:
        async for event in client.events():
            if event.event == name:
                return event
        raise AssertionError(f"events ended before {name}")

    return await asyncio.wait_for(find(), timeout)


@pytest.fixture
async def client(gateway: BareGateway) -> Any:
    # Retries capped at 1 s (the default cap is 5 s): after a restart test brings the gateway
    # back, the client finds it within a second rather than up to six.
    c = GatewayClient(
        gateway.url,
        token=gateway.token,
        identity=DeviceIdentity.generate(),
        backoff=Backoff(maximum=1.0),
    )
    await c.start()
    try:
        yield c
    finally:
        await c.close()


def test_it_signs_the_connect_payload_the_way_the_gateway_checks_it() -> None:
    frames = [json.loads(line)["frame"] for line in CAPTURE.read_text().splitlines()]
    params = next(f["params"] for f in frames if f.get("method") == "connect")
    device = params["device"]
    info = ClientInfo(
        client_id=params["client"]["id"],
        mode=params["client"]["mode"],
        platform=params["client"]["platform"],
        role=params["role"],
        scopes=tuple(params["scopes"]),
    )
    payload = device_auth_payload(
        device_id=device["id"],
        info=info,
        signed_at_ms=device["signedAt"],
        token=params["auth"]["token"],
        nonce=device["nonce"],
    )
    public = Ed25519PublicKey.from_public_bytes(_b64url_decode(device["publicKey"]))
    public.verify(_b64url_decode(device["signature"]), payload.encode())  # raises if wrong


def test_it_builds_a_connect_request_with_a_stable_device_identity() -> None:
    identity = DeviceIdentity.generate()
    again = DeviceIdentity.from_private_key_b64(identity.private_key_b64())
    assert again.device_id == identity.device_id
    assert len(identity.device_id) == 64
    params = build_connect_params(token="t", identity=identity, nonce="n", info=ClientInfo())
    assert params["minProtocol"] == params["maxProtocol"] == 4
    assert params["device"]["id"] == identity.device_id
    assert params["device"]["nonce"] == "n"
    assert identity.private_key_b64() not in repr(identity)
    with pytest.raises(ValueError, match="base64"):
        DeviceIdentity.from_private_key_b64("not base64!!")


async def test_it_streams_a_reply_in_several_deltas(
    client: GatewayClient, model_server: FakeModelServer
) -> None:
    model_server.script(reply="One two three four five six.", chunks=4, delay=0.05)
    key = session_key()
    res = await client.chat_send("Say something", session_key=key)
    assert res["status"] == "started"
    frames = await collect_run(client, res["runId"])
    deltas = [f for f in frames if f["state"] == "delta"]
    assert len(deltas) >= 2
    assert "".join(f["deltaText"] for f in deltas) == "One two three four five six."
    assert frames[-1]["state"] == "final"
    assert frames[-1]["message"]["content"][0]["text"] == "One two three four five six."


async def test_it_loads_history_on_a_new_connection(
    gateway: BareGateway, client: GatewayClient, model_server: FakeModelServer
) -> None:
    model_server.script(reply="Remembered.", chunks=2)
    key = session_key()
    res = await client.chat_send("Remember this", session_key=key)
    await collect_run(client, res["runId"])
    async with GatewayClient(
        gateway.url, token=gateway.token, identity=DeviceIdentity.generate()
    ) as other:
        history = await other.chat_history(session_key=key)
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[0]["content"] == "Remember this"
    assert history[1]["content"][0]["text"] == "Remembered."


async def test_it_aborts_a_reply(client: GatewayClient, model_server: FakeModelServer) -> None:
    model_server.script(reply=" ".join(f"word{i}" for i in range(60)), chunks=60, delay=0.1)
    key = session_key()
    res = await client.chat_send("Talk for a long time", session_key=key)
    frames: list[dict[str, Any]] = []
    async for event in client.events():
        if event.event == "chat" and event.payload.get("state") == "delta":
            frames.append(event.payload)
            break
    aborted = await client.chat_abort(session_key=key, run_id=res["runId"])
    assert aborted["aborted"] is True
    frames += await collect_run(client, res["runId"], timeout=15)
    assert frames[-1]["state"] == "aborted"


async def test_it_deduplicates_a_resent_message(
    client: GatewayClient, model_server: FakeModelServer
) -> None:
    key = session_key()
    first = await client.chat_send("once", session_key=key, idempotency_key="same-key-1")
    second = await client.chat_send("once", session_key=key, idempotency_key="same-key-1")
    assert first["runId"] == second["runId"] == "same-key-1"
    await collect_run(client, "same-key-1")
    history = await client.chat_history(session_key=key)
    assert [m["role"] for m in history] == ["user", "assistant"]


async def test_it_reports_a_gateway_error_clearly(client: GatewayClient) -> None:
    with pytest.raises(GatewayError) as caught:
        await client.request("chat.history", {"nope": 1})
    assert caught.value.code == "INVALID_REQUEST"
    assert caught.value.message
    # the connection survives the error
    assert await client.chat_history(session_key=session_key()) == []


async def test_it_refuses_a_wrong_token(gateway: BareGateway) -> None:
    c = GatewayClient(
        gateway.url, token="wrong", identity=DeviceIdentity.generate(), connect_timeout=10
    )
    with pytest.raises(GatewayError) as caught:
        await c.start()
    assert not isinstance(caught.value, GatewayUnavailable)
    assert "token" in caught.value.message.lower() or "auth" in caught.value.code.lower()
    await c.close()


async def test_it_gives_up_clearly_when_no_gateway_answers() -> None:
    c = GatewayClient(
        f"ws://127.0.0.1:{free_port()}",
        token="t",
        identity=DeviceIdentity.generate(),
        connect_timeout=1.5,
        backoff=Backoff(initial=0.1),
    )
    with pytest.raises(GatewayUnavailable, match="did not answer within"):
        await c.start()
    await c.close()


async def test_it_delivers_a_message_sent_while_the_gateway_restarts(
    gateway: BareGateway, client: GatewayClient, model_server: FakeModelServer
) -> None:
    key = session_key()
    model_server.script(reply="Before the restart.", chunks=2)
    res = await client.chat_send("first", session_key=key)
    await collect_run(client, res["runId"])

    await asyncio.to_thread(gateway.stop)
    await next_event(client, DISCONNECTED_EVENT, timeout=15)
    model_server.script(reply="After the restart.", chunks=3, delay=0.02)
    send = asyncio.create_task(client.chat_send("second", session_key=key, timeout=90))
    # The gateway boots meanwhile (seconds before it listens): the message waits for it.
    start = asyncio.create_task(asyncio.to_thread(gateway.start))
    try:
        await asyncio.sleep(0.5)
        assert not send.done()
    finally:
        await start
    res = await asyncio.wait_for(send, 90)
    frames = await collect_run(client, res["runId"])
    assert frames[-1]["state"] == "final"
    assert frames[-1]["message"]["content"][0]["text"] == "After the restart."
    history = await client.chat_history(session_key=key)
    assert [m["content"] for m in history if m["role"] == "user"] == ["first", "second"]


async def test_it_tells_the_caller_when_the_gateway_does_not_come_back(
    gateway: BareGateway, client: GatewayClient
) -> None:
    await asyncio.to_thread(gateway.stop)
    try:
        await next_event(client, DISCONNECTED_EVENT, timeout=15)
        with pytest.raises(GatewayUnavailable, match="not delivered"):
            await client.chat_send("lost?", session_key=session_key(), timeout=0.5)
    finally:
        await asyncio.to_thread(gateway.start)
    await next_event(client, CONNECTED_EVENT, timeout=30)
    assert await client.chat_history(session_key=session_key()) == []


def chat(state: str, run: str = "r1", text: str = "", session: str = "agent:main:main") -> Any:
    payload = {"runId": run, "sessionKey": session, "state": state, "deltaText": text}
    return GatewayEvent("chat", payload)


def test_it_merges_waiting_deltas_of_one_run_and_keeps_everything_else_in_order() -> None:
    batch = [
        chat("delta", text="a "),
        chat("delta", text="b "),
        chat("delta", run="r2", text="x "),  # another run: not merged with r1's
        chat("delta", text="c "),
        GatewayEvent("tick", {}),
        chat("delta", text="d "),
        chat("delta", text="e ", session="other"),  # another session
        chat("final", text=""),
    ]
    merged = coalesce_deltas(batch)
    assert [(e.event, e.payload["state"] if e.event == "chat" else "") for e in merged] == [
        ("chat", "delta"),
        ("chat", "delta"),
        ("chat", "delta"),
        ("tick", ""),
        ("chat", "delta"),
        ("chat", "delta"),
        ("chat", "final"),
    ]
    assert [e.payload.get("deltaText") for e in merged if e.event == "chat"] == [
        "a b ", "x ", "c ", "d ", "e ", "",
    ]  # fmt: skip
    assert coalesce_deltas([]) == [] and coalesce_deltas(batch[:1]) == batch[:1]


async def test_a_reader_that_fell_behind_gets_what_waits_in_one_batch(
    gateway: BareGateway, client: GatewayClient, model_server: FakeModelServer
) -> None:
    """A reply streamed while nobody reads arrives as batches in order: merged, its deltas
    are the whole reply, and the final follows them."""
    model_server.script(reply="one two three four five six", chunks=6, delay=0.05)
    async with GatewayClient(
        gateway.url, token=gateway.token, identity=DeviceIdentity.generate()
    ) as watcher:  # another connection, which sees the reply end; ``client`` reads nothing
        res = await client.chat_send("Count.", session_key="main")
        await collect_run(watcher, res["runId"], timeout=30)  # streams and ends meanwhile
    text, states, sizes = "", [], []
    async with asyncio.timeout(30):
        async for batch in client.event_batches():
            sizes.append(len(batch))
            for event in coalesce_deltas(batch):
                if event.event != "chat" or event.payload["state"] == "status":
                    continue
                states.append(event.payload["state"])
                text += event.payload.get("deltaText") or ""
                if event.payload["state"] == "final":
                    break
            if states and states[-1] == "final":
                break
    assert max(sizes) > 1 and max(sizes) <= 64, sizes  # what waited came in batches
    assert states[-1] == "final" and set(states[:-1]) == {"delta"}
    assert text.split() == ["one", "two", "three", "four", "five", "six"]
