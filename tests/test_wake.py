"""Wakes on real gateways: a doze thawed by the next chat frame, a hibernated agent restored
with its history, and a spoilt checkpoint falling back to a cold start that loses nothing.

The policy and bookkeeping around these (when each stage applies, the budget, races) are in
tests/test_sleep_stages.py on the in-memory backend.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from channels.db import database_sync_to_async

from sandboxes import sleep
from sandboxes.backends import cgroups
from sandboxes.models import Checkpoint, Sandbox
from tests.fakes.model_server import FakeModelServer
from tests.fixtures.chat import session_cookie
from tests.test_chat import connected_chat, is_type, new_id, receive_until

State = Sandbox.State
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def agent(sandbox_for: Callable[..., Sandbox]) -> Sandbox:
    return sandbox_for("alice@chat.test")


def messages(sandbox: Sandbox) -> list[str]:
    return list(sandbox.events.order_by("created_at", "id").values_list("message", flat=True))


async def chat_once(cookie: str, text: str) -> list[dict[str, object]]:
    comm, _ = await connected_chat(cookie)
    try:
        await comm.send_json_to({"type": "send", "id": new_id(), "text": text})
        return await receive_until(comm, is_type("final"))
    finally:
        await comm.disconnect()


async def test_a_dozing_agent_thaws_on_the_next_chat_frame(
    agent: Sandbox, model_server: FakeModelServer
) -> None:
    cookie = await database_sync_to_async(session_cookie)(agent.owner)
    comm, _ = await connected_chat(cookie)
    try:
        assert await database_sync_to_async(sleep.doze)(agent)
        await database_sync_to_async(agent.refresh_from_db)()
        assert agent.state == State.DOZING and cgroups.is_frozen(agent.backend_state["cgroups"])

        model_server.script(reply="Awake again.", chunks=2)
        await comm.send_json_to({"type": "send", "id": new_id(), "text": "Are you there?"})
        frames = await receive_until(comm, is_type("final"), timeout=30)
        assert frames[-1]["text"] == "Awake again."
    finally:
        await comm.disconnect()
    await database_sync_to_async(agent.refresh_from_db)()
    assert agent.state == State.RUNNING and not cgroups.is_frozen(agent.backend_state["cgroups"])
    assert "Woke from a doze" in await database_sync_to_async(messages)(agent)


async def test_a_hibernated_agent_comes_back_from_its_checkpoint_with_its_history(
    agent: Sandbox, model_server: FakeModelServer
) -> None:
    cookie = await database_sync_to_async(session_cookie)(agent.owner)
    text = f"remember {new_id()}"
    model_server.script(reply="Noted before sleeping.", chunks=2)
    await chat_once(cookie, text)
    paths = dict(agent.backend_state["cgroups"])

    assert await database_sync_to_async(sleep.hibernate)(agent) == "checkpointed"
    await database_sync_to_async(agent.refresh_from_db)()
    assert agent.state == State.SLEEPING and agent.backend_state == {}
    assert not any(Path(path).exists() for path in paths.values())  # its memory is freed
    checkpoint = await database_sync_to_async(Checkpoint.objects.get)(sandbox=agent)
    assert checkpoint.size_bytes > 50 * 2**20 and Path(checkpoint.location).is_dir()

    comm, frames = await connected_chat(cookie)  # opening the chat wakes it
    try:
        history = frames[-1]["messages"]
        assert {"role": "user", "text": text, "runId": None} in history
        model_server.script(reply="Back from my checkpoint.", chunks=2)
        await comm.send_json_to({"type": "send", "id": new_id(), "text": "Still there?"})
        final = await receive_until(comm, is_type("final"), timeout=30)
        assert final[-1]["text"] == "Back from my checkpoint."
    finally:
        await comm.disconnect()
    await database_sync_to_async(agent.refresh_from_db)()
    assert agent.state == State.RUNNING
    events = await database_sync_to_async(messages)(agent)
    assert "Asleep (hibernated: wakes in about a second)" in events
    assert not [m for m in events if m.startswith("Could not resume")]
    assert not Path(checkpoint.location).exists()  # used once, then deleted
    assert not await database_sync_to_async(Checkpoint.objects.filter(sandbox=agent).exists)()


async def test_a_spoilt_checkpoint_falls_back_to_a_cold_start_that_loses_nothing(
    agent: Sandbox, model_server: FakeModelServer
) -> None:
    cookie = await database_sync_to_async(session_cookie)(agent.owner)
    text = f"keep {new_id()}"
    model_server.script(reply="Kept.", chunks=2)
    await chat_once(cookie, text)
    assert await database_sync_to_async(sleep.hibernate)(agent) == "checkpointed"
    checkpoint = await database_sync_to_async(Checkpoint.objects.get)(sandbox=agent)
    images = sorted(Path(checkpoint.location).rglob("*.img"))
    assert images
    for image in images:  # every image file cut short: CRIU cannot read it
        with image.open("r+b") as handle:
            handle.truncate(max(0, image.stat().st_size // 3))

    comm, frames = await connected_chat(cookie)
    try:
        assert {"role": "user", "text": text, "runId": None} in frames[-1]["messages"]
    finally:
        await comm.disconnect()
    await database_sync_to_async(agent.refresh_from_db)()
    assert agent.state == State.RUNNING
    events = await database_sync_to_async(messages)(agent)
    assert any(m.startswith("Could not resume from the checkpoint") for m in events)
    assert not Path(checkpoint.location).exists()
