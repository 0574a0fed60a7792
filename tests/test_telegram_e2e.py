"""Telegram end to end, on a real OpenClaw gateway in a real sandbox.

The user links a bot (the fake Bot API on 127.0.0.1 stands in for Telegram); the gateway is
restarted with its Telegram channel (API root: the portal's egress relay) and ``/hooks/agent``
on. The agent is put to sleep; an update posted to the portal's webhook wakes it, reaches it
through ``/hooks/agent``, and the agent's answer (the fake model's) reaches the fake API's
``sendMessage``. A replay with the same idempotency key is not answered twice: a later update
in the same chat, which OpenClaw queues behind any run of that chat's session, is answered and
nothing else is. The bot token appears in no log: the portal's (caplog), the sandbox's output,
nor the gateway's log file.

One dedicated pooled gateway (``telegram@agents.test``), since linking a bot restarts it with
another config. It is stopped before the bot is unlinked, so the unlink boots nothing; the pool
starts it again (without the channel) only if a later test asks for it. Its backups (each stop
and sleep queues one, run here at once) use a copy of an initialised repository, not a
``restic init`` of their own.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from doorbell import actions
from doorbell.models import TelegramUpdate
from doorbell.views import SECRET_HEADER
from portal.celery import app
from sandboxes import actions as sandbox_actions
from sandboxes.backends import get_backend
from sandboxes.models import Sandbox
from tests.fakes.model_server import FakeModelServer, Script
from tests.fakes.telegram_api import FakeTelegram, Sent
from tests.fixtures.backend import volume_of

State = Sandbox.State
POOLED = "telegram@agents.test"
REPLY = "Hello from your agent on Telegram."
LATER_TEXT = "Still there?"
LATER_REPLY = "And hello again."


@pytest.fixture(scope="session")
def fake_telegram() -> Iterator[FakeTelegram]:
    with FakeTelegram() as server:
        yield server


@pytest.fixture
def eager() -> Iterator[None]:
    before = app.conf.task_always_eager
    app.conf.task_always_eager = True
    yield
    app.conf.task_always_eager = before


def gateway_logs(sandbox: Sandbox) -> str:
    """Everything the gateway wrote: the sandbox's output and OpenClaw's own log files."""
    backend = get_backend(sandbox.backend)
    text = backend.logs(sandbox_actions.spec_for(sandbox), sandbox.backend_state, lines=100_000)
    for path in (volume_of(sandbox) / "logs").glob("*"):
        if path.is_file() and not path.is_symlink():
            text += path.read_text(errors="replace")
    return text


def later_reply(body: Any) -> Script | None:
    """LATER_REPLY to a model call that carries the later update (its run's, the only one after
    it); None (the default script: REPLY) to any other."""
    return Script(reply=LATER_REPLY) if LATER_TEXT in json.dumps(body) else None


def wait_for_text(telegram: FakeTelegram, chat_id: int, text: str, timeout: float) -> list[Sent]:
    """The messages sent to ``chat_id`` once one of them is ``text`` (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not any(s.text == text for s in telegram.messages_to(chat_id)):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return telegram.messages_to(chat_id)


def test_a_message_to_a_sleeping_agent_is_answered_on_telegram(
    sandbox_for: Callable[..., Sandbox],
    model_server: FakeModelServer,
    fake_telegram: FakeTelegram,
    settings: Any,
    client: Any,
    eager: None,
    caplog: pytest.LogCaptureFixture,
    initialized_repository: Callable[[Sandbox], Any],
) -> None:
    caplog.set_level(logging.DEBUG)
    fake_telegram.reset()
    settings.HERMIT_TELEGRAM_API_ROOT = fake_telegram.url
    settings.SITE_URL = "https://hermit.test"
    model_server.script(reply=REPLY)
    sandbox = sandbox_for(POOLED)
    initialized_repository(sandbox)
    token = fake_telegram.add_bot("e2e_bot")
    link = actions.connect(sandbox, token)  # eager: the gateway restarts with the channel
    sandbox.refresh_from_db()
    try:
        assert sandbox.state == State.RUNNING, sandbox.error_message
        sandbox_actions.sleep_sandbox(sandbox)
        sandbox.refresh_from_db()
        assert sandbox.state == State.SLEEPING

        def webhook(update: dict[str, Any]) -> int:
            path = f"/channels/telegram/{link.webhook_id}/"
            headers = {SECRET_HEADER: link.secret}
            response = client.post(path, update, content_type="application/json", headers=headers)
            return int(response.status_code)

        start = fake_telegram.make_update(f"/start {link.pairing_code}", chat_id=31337)
        assert webhook(start) == 200  # the owner pairs their account; the agent sleeps on
        sandbox.refresh_from_db()
        assert sandbox.state == State.SLEEPING

        update = fake_telegram.make_update("Are you there?", chat_id=31337)
        started = time.monotonic()
        assert webhook(update) == 200
        sent = fake_telegram.wait_for_message(31337, timeout=120)
        assert [s.text for s in sent] == [REPLY], gateway_logs(sandbox)[-4000:]
        assert sent[0].token == token
        print(f"asleep: update to reply in {time.monotonic() - started:.1f} s")
        sandbox.refresh_from_db()
        assert sandbox.state == State.RUNNING
        row = TelegramUpdate.objects.get(link=link)
        assert row.delivered_at is not None and row.attempts == 1

        # A replay of the same update (a worker died after the gateway took it) runs once.
        host, port = sandbox_actions.gateway_endpoint(sandbox)
        from doorbell.delivery import hook_payload

        replay = httpx.post(
            f"http://{host}:{port}/hooks/agent",
            json=hook_payload(link, update),
            headers={"Authorization": f"Bearer {link.hook_token}"},
            timeout=30,
        )
        assert replay.status_code == 200, replay.text
        # OpenClaw runs the hook runs of one session one after another, in the order they came:
        # once a later update of this chat is answered, a run the replay had started would have
        # been answered before it (REPLY: the later update was not in its session yet).
        model_server.respond_with(later_reply)
        later = fake_telegram.make_update(LATER_TEXT, chat_id=31337)
        assert webhook(later) == 200
        sent = wait_for_text(fake_telegram, 31337, LATER_REPLY, timeout=120)
        assert [s.text for s in sent] == [REPLY, LATER_REPLY], gateway_logs(sandbox)[-4000:]

        logs = gateway_logs(sandbox)
        assert logs, "the gateway wrote logs"
        for secret in (token, link.secret, link.hook_token):
            assert secret not in logs
            assert secret not in caplog.text
    finally:
        # Stopped first, the gateway is not restarted without the channel (a cold boot): the
        # pool starts it again, from rows without the link, if a later test asks for it.
        sandbox.refresh_from_db()
        if sandbox.state in (State.RUNNING, State.DOZING):
            sandbox_actions.stop_sandbox(sandbox)
        actions.disconnect(link)  # eager: a stopped gateway is left as it is
