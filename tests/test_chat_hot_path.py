"""The chat relay's per-frame cost: a delta streamed from the gateway to the browser makes no
dozing-hint lookup (the frame proves the gateway is not frozen), while a frame from the browser
still makes one, so it thaws a dozing agent."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.cache import caches

from sandboxes import sleep
from sandboxes.consumers.chat import ChatConsumer, TokenBucket


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


async def test_a_browser_frame_is_dispatched_without_a_thread_hop(
    lookups: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Channels closes stale database connections in a worker thread before each message it
    dispatches; the relay's sockets skip that (their database calls close them themselves)."""
    import channels.consumer

    hops: list[str] = []

    async def aclose_old_connections() -> None:
        hops.append("close_old_connections")

    monkeypatch.setattr(channels.consumer, "aclose_old_connections", aclose_old_connections)
    consumer = Counted()
    consumer.sandbox = FakeSandbox()  # type: ignore[assignment]
    consumer.frames = TokenBucket(capacity=30, rate=10)
    await consumer.dispatch({"type": "websocket.receive", "text": '{"type": "ping"}'})
    assert consumer.sent == [{"type": "pong"}]
    assert lookups == [42], "the browser frame still asked whether the agent dozes"
    assert hops == []


def use_redis_cache(settings: Any, location: str) -> Any:
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": location,
            "KEY_PREFIX": "hot-path-test",
        }
    }
    return caches["default"]


@pytest.fixture
def redis_cache(settings: Any) -> Any:
    cache = use_redis_cache(settings, settings.REDIS_URL or "redis://127.0.0.1:6379/0")
    yield cache
    cache.delete("hermit:dozing:7")


async def test_the_dozing_hint_is_read_from_redis_without_a_thread(
    redis_cache: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hint is asked with EXISTS from the event loop, not through Django's cache methods
    (which run in a worker thread); it answers as the cache does."""
    from asgiref.sync import sync_to_async

    await sync_to_async(redis_cache.set)("hermit:dozing:7", 1, 60)

    def no_thread(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the cache's sync methods were used")

    monkeypatch.setattr(redis_cache, "has_key", no_thread)
    monkeypatch.setattr(redis_cache, "get", no_thread)
    assert await sleep.ais_dozing(7) is True
    assert await sleep.ais_dozing(8) is False


async def test_a_cache_that_does_not_answer_does_not_end_the_session(
    settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis down: the frame is relayed as if the agent were awake, with a warning."""
    use_redis_cache(settings, "redis://127.0.0.1:1/0")  # nothing listens on port 1
    assert await sleep.ais_dozing(7) is False
    assert "cannot tell whether sandbox 7 is dozing" in caplog.text


def test_the_portals_daphne_sends_frames_without_colouring_autobahns_debug_arguments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """autobahn builds a debug message's arguments for every frame it sends (debug logging on
    or not); the portal's daphne has them made as plain text, not four click.style calls."""
    import autobahn.util
    import click

    from portal import daphne_uvloop

    monkeypatch.setattr(autobahn.util, "_HAS_CLICK", True)
    styled: list[str] = []
    real_style = click.style

    def style(text: str, **kwargs: Any) -> str:
        styled.append(text)
        return real_style(text, **kwargs)

    monkeypatch.setattr(click, "style", style)
    assert autobahn.util.hl("frame") != "frame" and styled == ["frame"]  # as installed

    daphne_uvloop.plain_debug_arguments()
    styled.clear()
    assert autobahn.util.hltype(daphne_uvloop.main) == "<portal.daphne_uvloop.main>"
    assert autobahn.util.hlval(42) == "42"
    assert styled == []
