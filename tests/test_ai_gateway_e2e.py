"""End to end: a real OpenClaw gateway in a real sandbox chats through the AI gateway.

The sandbox (bubblewrap, its own network namespace) reaches only the AI gateway's port; its
OpenClaw config names the gateway as its one model provider with the sandbox's own key
(``HERMIT_AI_KEY``, issued by ``rotate_credential`` when it started). The gateway forwards to
the fake model server with the operator's key, and the usage lands on the sandbox's owner.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from ai_gateway.models import Price, UsageRecord
from ai_gateway.usage import month_usage
from sandboxes import actions
from sandboxes.consumers.chat import device_identity_for
from sandboxes.models import Sandbox
from sandboxes.openclaw.protocol import GatewayClient
from tests.fakes.model_server import FakeModelServer

pytestmark = pytest.mark.django_db(transaction=True)

REPLY = "Hello through the metered gateway."


async def chat_once(url: str, token: str, identity: Any, message: str) -> str:
    """Send one chat message; return the final reply text, or raise with the error shown."""
    async with GatewayClient(url, token=token, identity=identity, connect_timeout=60) as client:
        sent = await client.chat_send(message)
        run_id = sent.get("runId")
        async for event in client.events():
            payload = event.payload
            if event.event != "chat" or payload.get("runId") != run_id:
                continue
            if payload.get("state") == "final":
                content = (payload.get("message") or {}).get("content") or [{}]
                return str(content[0].get("text", ""))
            if payload.get("state") in ("error", "aborted"):
                raise AssertionError(f"chat ended {payload.get('state')}: {payload}")
    raise AssertionError("the event stream ended before the reply")


def test_it_meters_a_real_openclaw_chat_to_its_owner(
    sandbox_for: Callable[..., Sandbox], model_server: FakeModelServer
) -> None:
    # Alice's pooled sandbox, which the chat and Control UI tests use too (one start for all).
    sandbox = sandbox_for("alice@chat.test")
    owner = sandbox.owner
    Price.objects.all().delete()  # the seeded prices (exact names) would win over the glob
    Price.objects.create(model="*", input_per_million=Decimal(1), output_per_million=Decimal(2))
    model_server.script(reply=REPLY, chunks=5, prompt_tokens=4321, completion_tokens=17)
    host, port = actions.gateway_endpoint(sandbox)
    identity = device_identity_for(sandbox)

    reply = asyncio.run(
        asyncio.wait_for(
            chat_once(f"ws://{host}:{port}", sandbox.gateway_token, identity, "Say hello"), 150
        )
    )
    assert reply.strip() == REPLY

    # The sandbox authenticated with its own key; the upstream only ever saw the operator's.
    chats = [r for r in model_server.requests if r.path.endswith("/chat/completions")]
    assert chats, "OpenClaw made no model call"
    for request in chats:
        assert request.headers["Authorization"] == "Bearer sk-test-operator"
        assert request.json["stream"] is True
    deadline = time.monotonic() + 5  # a record is written just after its response ends
    while True:
        rows = list(UsageRecord.objects.filter(sandbox=sandbox, outcome="ok"))
        if len(rows) >= len(chats) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(rows) == len(chats)
    assert {row.user_id for row in rows} == {owner.pk}
    assert {(row.input_tokens, row.output_tokens) for row in rows} == {(4321, 17)}
    assert rows[0].cost == Decimal("0.004355")  # 4321 x 1 + 17 x 2, per million
    usage = month_usage(owner)
    assert usage["tokens"] == len(rows) * (4321 + 17)
    assert not UsageRecord.objects.exclude(user=owner).filter(sandbox=sandbox).exists()
