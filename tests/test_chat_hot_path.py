"""The chat relay's per-frame cost: a delta streamed from the gateway to the browser makes no
dozing-hint lookup (the frame proves the gateway is not frozen), while a frame from the browser
still makes one, so it thaws a dozing agent."""

from __future__ import annotations

from typing import Any

import pytest

from sandboxes import sleep
from sandboxes.consumers.chat import ChatConsumer


class Counted(ChatConsumer):
    """A consumer with its browser side recorded instead of sent."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[dict[str, Any]] = []
        self.last_activity = float("inf")  # no activity write: only the lookups are counted
        self.active_runs: set[str] = set()

    async def _send(self, frame: dict[str, Any]) -> None:
        self.sent.append(frame)


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    seen: list[int] = []

    async def ais_dozing(sandbox_id: int) -> bool:
        seen.append(sandbox_id)
        return False

    monkeypatch.setattr(sleep, "ais_dozing", ais_dozing)
    return seen


class FakeSandbox:
    pk = 42


async def test_it_relays_gateway_deltas_without_a_dozing_lookup(lookups: list[int]) -> None:
    consumer = Counted()
    consumer.sandbox = FakeSandbox()  # type: ignore[assignment]
    for n in range(50):
        await consumer._relay_chat({"runId": "r1", "state": "delta", "deltaText": f"w{n} "})
    await consumer._relay_chat({"runId": "r1", "state": "final", "message": {"content": "done"}})
    assert [f["type"] for f in consumer.sent] == ["delta"] * 50 + ["final"]
    assert lookups == []


async def test_it_still_checks_for_a_doze_on_a_browser_frame(lookups: list[int]) -> None:
    consumer = Counted()
    consumer.sandbox = FakeSandbox()  # type: ignore[assignment]
    await consumer._touch()
    assert lookups == [42]
