"""Telegram end to end, on a real OpenClaw gateway in a real sandbox.

The user links a bot (the fake Bot API on 127.0.0.1 stands in for Telegram); the gateway is
restarted with its Telegram channel (API root: the portal's egress relay) and ``/hooks/agent``
on. The agent is put to sleep; an update posted to the portal's webhook wakes it, reaches it
through ``/hooks/agent``, and the agent's answer (the fake model's) reaches the fake API's
``sendMessage``. A replay with the same idempotency key is not answered twice. The bot token
appears in no log: the portal's (caplog), the sandbox's output, nor the gateway's log file.

One dedicated pooled gateway (``telegram@agents.test``), since linking a bot restarts it with
another config.
"""

from __future__ import annotations

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
from tests.fakes.model_server import FakeModelServer
from tests.fakes.telegram_api import FakeTelegram
from tests.fixtures.backend import volume_of

State = Sandbox.State
POOLED = "telegram@agents.test"
REPLY = "Hello from your agent on Telegram."


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


def test_a_message_to_a_sleeping_agent_is_answered_on_telegram(
    sandbox_for: Callable[..., Sandbox],
    model_server: FakeModelServer,
    fake_telegram: FakeTelegram,
    settings: Any,
    client: Any,
    eager: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    fake_telegram.reset()
    settings.HERMIT_TELEGRAM_API_ROOT = fake_telegram.url
    settings.SITE_URL = "https://hermit.test"
    model_server.script(reply=REPLY)
    sandbox = sandbox_for(POOLED)
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
        time.sleep(8)
        assert len(fake_telegram.messages_to(31337)) == 1

        logs = gateway_logs(sandbox)
        assert logs, "the gateway wrote logs"
        for secret in (token, link.secret, link.hook_token):
            assert secret not in logs
            assert secret not in caplog.text
    finally:
        actions.disconnect(link)  # eager: the gateway restarts without the channel
