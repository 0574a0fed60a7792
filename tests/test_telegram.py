"""Telegram, with a doorbell: the portal side, on the in-memory backend.

A user links a bot on the Channels page (the token checked with ``getMe`` on a local fake of
the Bot API, stored encrypted, the webhook registered with a secret); the webhook takes
updates at once, drops duplicates and refuses a wrong secret; delivery wakes a sleeping agent
and hands the updates to its gateway's ``/hooks/agent`` (a stand-in here: tests/fakes/
hooks_double.py) in order, once each, surviving a worker killed mid-delivery; the bot token
is never logged. The real gateway answering on Telegram is tests/test_telegram_e2e.py.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from django.db import connection

from doorbell import actions, gateway_config
from doorbell.models import TelegramLink, TelegramUpdate
from doorbell.views import SECRET_HEADER
from portal.celery import app
from sandboxes import actions as sandbox_actions
from sandboxes.backends.fake import FakeBackend
from sandboxes.models import Sandbox
from tests.factories import PASSWORD
from tests.fakes.hooks_double import HooksDouble
from tests.fakes.telegram_api import FakeTelegram
from tests.fixtures.backend import running_fake_sandbox

State = Sandbox.State


@pytest.fixture(scope="session")
def fake_telegram() -> Iterator[FakeTelegram]:
    with FakeTelegram() as server:
        yield server


@pytest.fixture
def telegram(fake_telegram: FakeTelegram, settings: Any) -> Iterator[FakeTelegram]:
    fake_telegram.reset()
    settings.HERMIT_TELEGRAM_API_ROOT = fake_telegram.url
    settings.SITE_URL = "https://hermit.test"
    yield fake_telegram
    fake_telegram.reset()


@pytest.fixture
def eager() -> Iterator[None]:
    """Celery tasks run in the caller, at once (as a worker would run them)."""
    before = app.conf.task_always_eager
    app.conf.task_always_eager = True
    yield
    app.conf.task_always_eager = before


def signed_in(client: Any, sandbox: Sandbox) -> Any:
    assert client.login(username=sandbox.owner.username, password=PASSWORD)
    return client


PAIRED = (4242, 99)  # the chat (and sender) ids the tests write from


def linked(sandbox: Sandbox, telegram: FakeTelegram) -> tuple[TelegramLink, str]:
    """Link a new bot to ``sandbox`` and pair the test senders, as their /start would."""
    token = telegram.add_bot()
    link = actions.connect(sandbox, token)
    for user_id in PAIRED:
        start = telegram.make_update(f"/start {link.pairing_code}", chat_id=user_id)
        assert actions.accept_update(link, start) == "paired"
    return link, token


def purge_queues() -> None:
    from sandboxes.hosts import local_name, queue_for

    with app.connection_for_write() as conn:
        for queue in (app.conf.task_default_queue, queue_for(local_name())):
            conn.default_channel.queue_purge(queue)


def post(client: Any, link: TelegramLink, update: dict[str, Any], secret: str | None = None) -> Any:
    headers = {SECRET_HEADER: link.secret if secret is None else secret}
    path = f"/channels/telegram/{link.webhook_id}/"
    return client.post(path, update, content_type="application/json", headers=headers)


# -- linking a bot --------------------------------------------------------------------------


def test_it_links_a_bot_with_its_token_encrypted(
    transactional_db: None, fake_backend: FakeBackend, telegram: FakeTelegram, client: Any
) -> None:
    sandbox = running_fake_sandbox("alice@tg.test")
    token = telegram.add_bot("alices_bot")
    page = signed_in(client, sandbox).post("/channels/", {"token": token}, follow=True)
    assert page.status_code == 200
    assert "@alices_bot" in page.content.decode()
    link = TelegramLink.objects.get(sandbox=sandbox)
    assert link.bot_token == token and link.bot_username == "alices_bot"
    bot = telegram.bots[token]
    assert bot.webhook_url == f"https://hermit.test/channels/telegram/{link.webhook_id}/"
    assert bot.webhook_secret == link.secret and len(link.secret) >= 32
    other = actions.connect(running_fake_sandbox("bob@tg.test"), telegram.add_bot())
    assert len(link.webhook_id) >= 32 and link.webhook_id != other.webhook_id  # opaque, random
    with connection.cursor() as cursor:
        cursor.execute("SELECT bot_token, secret FROM doorbell_telegramlink")
        stored = cursor.fetchone()
    assert token not in stored[0] and link.secret not in stored[1]  # encrypted at rest


def test_it_refuses_a_bad_token_with_a_clear_error(
    transactional_db: None, fake_backend: FakeBackend, telegram: FakeTelegram, client: Any
) -> None:
    sandbox = running_fake_sandbox("alice@tg.test")
    signed_in(client, sandbox)
    unknown = "123456789:AAbcdefghijklmnopqrstuvwxyz0123456789"
    page = client.post("/channels/", {"token": unknown})
    assert page.status_code == 200
    assert "Telegram refused it: Unauthorized" in page.content.decode()
    malformed = client.post("/channels/", {"token": "not a token"})
    assert "does not look like a bot token" in malformed.content.decode()
    assert not TelegramLink.objects.exists()


def test_it_disconnects_and_removes_the_webhook(
    transactional_db: None, fake_backend: FakeBackend, telegram: FakeTelegram, client: Any
) -> None:
    sandbox = running_fake_sandbox("alice@tg.test")
    _, token = linked(sandbox, telegram)
    assert telegram.bots[token].webhook_url
    page = signed_in(client, sandbox).post("/channels/", {"action": "disconnect"}, follow=True)
    assert "Telegram bot disconnected" in page.content.decode()
    assert not TelegramLink.objects.exists()
    assert telegram.bots[token].webhook_url == ""
    assert ("deleteWebhook", token) in telegram.requests


def test_a_user_sees_only_their_own_link(
    transactional_db: None, fake_backend: FakeBackend, telegram: FakeTelegram, client: Any
) -> None:
    alice = running_fake_sandbox("alice@tg.test")
    bob = running_fake_sandbox("bob@tg.test")
    linked(alice, telegram)
    page = signed_in(client, bob).get("/channels/")
    assert "hermit_test_bot" not in page.content.decode()
    signed_in(client, bob).post("/channels/", {"action": "disconnect"})
    assert TelegramLink.objects.filter(sandbox=alice).exists()


def test_the_gateway_config_names_the_secrets_and_the_environment_holds_them(
    transactional_db: None, fake_backend: FakeBackend, telegram: FakeTelegram
) -> None:
    sandbox = running_fake_sandbox("alice@tg.test")
    link, token = linked(sandbox, telegram)
    part = gateway_config.for_sandbox(sandbox)
    text = str(part.config)
    assert token not in text and link.secret not in text and link.hook_token not in text
    channel = part.config["channels"]["telegram"]
    assert channel["apiRoot"].endswith("/telegram") and channel["webhookSecret"].startswith("${")
    assert part.config["hooks"]["enabled"] is True
    assert part.env[gateway_config.BOT_TOKEN_ENV] == token
    assert part.env[gateway_config.HOOKS_TOKEN_ENV] == link.hook_token


# -- the webhook ----------------------------------------------------------------------------


def test_a_bad_secret_is_refused_and_nothing_is_kept(
    transactional_db: None, fake_backend: FakeBackend, telegram: FakeTelegram, client: Any
) -> None:
    sandbox = running_fake_sandbox("alice@tg.test")
    link, _ = linked(sandbox, telegram)
    update = telegram.make_update("hello")
    assert post(client, link, update, secret="wrong").status_code == 403
    assert post(client, link, update, secret="").status_code == 403
    path = "/channels/telegram/nosuchlink/"
    headers = {SECRET_HEADER: link.secret}
    unknown = client.post(path, update, content_type="application/json", headers=headers)
    assert unknown.status_code == 404
    assert post(client, link, {"no": "update"}).status_code == 400
    assert not TelegramUpdate.objects.exists()


def test_only_paired_accounts_reach_the_agent(
    transactional_db: None, fake_backend: FakeBackend, telegram: FakeTelegram, client: Any
) -> None:
    sandbox = running_fake_sandbox("alice@tg.test")
    link = actions.connect(sandbox, telegram.add_bot("alices_bot"))
    page = signed_in(client, sandbox).get("/channels/").content.decode()
    assert f"https://t.me/alices_bot?start={link.pairing_code}" in page
    assert "No account paired yet" in page
    stranger = telegram.make_update("let me in", chat_id=666)
    assert post(client, link, stranger).status_code == 200  # Telegram must not re-send it
    guess = telegram.make_update("/start not-the-code", chat_id=666)
    assert post(client, link, guess).status_code == 200
    assert not TelegramUpdate.objects.exists()
    start = telegram.make_update(f"/start {link.pairing_code}", chat_id=4242)
    assert post(client, link, start).status_code == 200
    link.refresh_from_db()
    assert link.allowed_user_ids == [4242]
    assert not TelegramUpdate.objects.exists()  # the /start itself is not for the agent
    assert "1 account paired" in client.get("/channels/").content.decode()
    assert post(client, link, telegram.make_update("hello", chat_id=4242)).status_code == 200
    assert post(client, link, telegram.make_update("still me?", chat_id=666)).status_code == 200
    assert [u.payload["message"]["text"] for u in TelegramUpdate.objects.all()] == ["hello"]


def test_duplicates_are_dropped_and_delivered_once(
    transactional_db: None,
    fake_backend: FakeBackend,
    telegram: FakeTelegram,
    client: Any,
    eager: None,
) -> None:
    sandbox = running_fake_sandbox("alice@tg.test")
    link, _ = linked(sandbox, telegram)
    with HooksDouble(link.hook_token) as gateway:
        Sandbox.objects.filter(pk=sandbox.pk).update(
            backend_state={**sandbox.backend_state, "endpoint_port": gateway.port}
        )
        update = telegram.make_update("only once")
        for _ in range(3):
            assert post(client, link, update).status_code == 200
        assert TelegramUpdate.objects.filter(link=link).count() == 1
        assert [b["message"] for b in gateway.accepted] == ["only once"]
    row = TelegramUpdate.objects.get(link=link)
    assert row.delivered_at is not None and row.attempts == 1


def test_a_message_to_a_sleeping_agent_wakes_it_and_arrives_in_order(
    transactional_db: None,
    fake_backend: FakeBackend,
    telegram: FakeTelegram,
    client: Any,
    eager: None,
) -> None:
    sandbox = running_fake_sandbox("alice@tg.test")
    link, _ = linked(sandbox, telegram)
    with HooksDouble(link.hook_token) as gateway:
        fake_backend.serve(sandbox.slug, gateway.port)
        sandbox_actions.stop_sandbox(sandbox, to=State.SLEEPING)
        assert Sandbox.objects.get(pk=sandbox.pk).state == State.SLEEPING
        app.conf.task_always_eager = False  # queued while no worker runs: they wait
        updates = [telegram.make_update(f"message {n}", chat_id=99) for n in range(3)]
        for update in reversed(updates):  # Telegram may deliver out of order after retries
            assert post(client, link, update).status_code == 200  # at once, agent asleep
        assert Sandbox.objects.get(pk=sandbox.pk).state == State.SLEEPING
        assert gateway.received == []
        app.conf.task_always_eager = True
        assert actions.requeue_stale(older_than=timedelta(0)) == 1
    assert Sandbox.objects.get(pk=sandbox.pk).state == State.RUNNING
    assert [b["message"] for b in gateway.accepted] == ["message 0", "message 1", "message 2"]
    first = gateway.accepted[0]
    assert first["channel"] == "telegram" and first["to"] == "99" and first["deliver"] is True
    assert first["sessionKey"] == "hook:telegram:99" and first["sessionMode"] == "persistent"
    assert first["idempotencyKey"] == f"telegram:{link.webhook_id}:{updates[0]['update_id']}"
    assert not TelegramUpdate.objects.filter(delivered_at=None).exists()


def test_a_gateway_that_refuses_leaves_the_update_pending_for_later(
    transactional_db: None, fake_backend: FakeBackend, telegram: FakeTelegram, client: Any
) -> None:
    sandbox = running_fake_sandbox("alice@tg.test")
    link, _ = linked(sandbox, telegram)
    with HooksDouble(link.hook_token) as gateway:
        Sandbox.objects.filter(pk=sandbox.pk).update(
            backend_state={**sandbox.backend_state, "endpoint_port": gateway.port}
        )
        first, second = telegram.make_update("first"), telegram.make_update("second")
        for update in (first, second):
            assert post(client, link, update).status_code == 200
        gateway.status = 503
        outcome = actions.deliver_pending(sandbox.pk)
        assert outcome.pending and outcome.delivered == 0
        stuck = TelegramUpdate.objects.get(update_id=first["update_id"])
        assert stuck.delivered_at is None and stuck.attempts == 1 and "503" in stuck.last_error
        assert len(gateway.received) == 1  # the second waits behind the first: order is kept
        gateway.status = 200
        assert actions.deliver_pending(sandbox.pk).delivered == 2
        assert [b["message"] for b in gateway.accepted] == ["first", "second"]


def test_updates_survive_a_worker_killed_mid_delivery(
    transactional_db: None,
    fake_backend: FakeBackend,
    telegram: FakeTelegram,
    client: Any,
    start_server: Any,
) -> None:
    """A real worker takes the delivery and is killed -9 while the gateway has not answered;
    the update stays pending, beat's requeue hands it to a new worker, which delivers it and
    marks it once, with the same idempotency key."""
    sandbox = running_fake_sandbox("alice@tg.test")
    app.conf.task_always_eager = True  # the link's gateway restart, here and now
    try:
        link, _ = linked(sandbox, telegram)
    finally:
        app.conf.task_always_eager = False
    sandbox.refresh_from_db()
    purge_queues()  # what earlier tests queued for sandboxes now gone
    env = {"SANDBOX_BACKEND": "fake", "HERMIT_TELEGRAM_API_ROOT": telegram.url}
    argv = [
        *(sys.executable, "-m", "celery", "-A", "portal", "worker", "-l", "info", "-P", "solo"),
        *("-Q", app.conf.task_default_queue),
    ]
    with HooksDouble(link.hook_token) as gateway:
        Sandbox.objects.filter(pk=sandbox.pk).update(
            backend_state={**sandbox.backend_state, "endpoint_port": gateway.port}
        )
        gateway.hold = True
        worker = start_server(
            argv, name="doomed-worker", HERMIT_CELERY_QUEUE=app.conf.task_default_queue, **env
        )
        update = telegram.make_update("survive me")
        assert post(client, link, update).status_code == 200
        assert len(gateway.wait_received(1, timeout=60)) == 1, worker.output()[-3000:]
        os.killpg(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait(10)
        row = TelegramUpdate.objects.get(link=link)
        deadline = time.monotonic() + 10  # the dead worker's transaction is rolled back
        while row.attempts and time.monotonic() < deadline:
            time.sleep(0.1)
            row.refresh_from_db()
        assert row.delivered_at is None
        gateway.hold = False
        gateway.release.set()
        next_worker = start_server(
            argv, name="next-worker", HERMIT_CELERY_QUEUE=app.conf.task_default_queue, **env
        )
        try:
            assert actions.requeue_stale(older_than=timedelta(0)) == 1
            deadline = time.monotonic() + 60
            while row.delivered_at is None and time.monotonic() < deadline:
                time.sleep(0.2)
                row.refresh_from_db()
        finally:
            next_worker.stop()  # servers outlive their test: it would take later tests' tasks
    assert row.delivered_at is not None and row.attempts == 1
    # The gateway saw the update twice: the dead worker's request (it stays admitted) and the
    # new worker's replay, under one idempotency key, which OpenClaw runs once (the replay is
    # dropped: shown on the real gateway in tests/test_telegram_e2e.py).
    assert [b["message"] for b in gateway.received] == ["survive me", "survive me"]
    keys = {b["idempotencyKey"] for b in gateway.received}
    assert keys == {f"telegram:{link.webhook_id}:{update['update_id']}"}


def test_beat_requeues_only_updates_left_pending(
    transactional_db: None, fake_backend: FakeBackend, telegram: FakeTelegram, client: Any
) -> None:
    sandbox = running_fake_sandbox("alice@tg.test")
    link, _ = linked(sandbox, telegram)
    assert post(client, link, telegram.make_update("fresh")).status_code == 200
    assert actions.requeue_stale(older_than=timedelta(minutes=1)) == 0
    TelegramUpdate.objects.update(
        received_at=TelegramUpdate.objects.get().received_at - timedelta(minutes=5)
    )
    assert actions.requeue_stale(older_than=timedelta(minutes=1)) == 1


# -- the egress relay (agents' replies) -------------------------------------------------------


def test_the_relay_forwards_a_linked_bots_calls_only(
    transactional_db: None,
    fake_backend: FakeBackend,
    telegram: FakeTelegram,
    ai_gateway_server: Any,
    settings: Any,
) -> None:
    sandbox = running_fake_sandbox("alice@tg.test")
    _, token = linked(sandbox, telegram)
    base = f"{ai_gateway_server.url}/telegram"
    sent = httpx.post(f"{base}/bot{token}/sendMessage", json={"chat_id": 7, "text": "hi"})
    assert sent.status_code == 200 and sent.json()["result"]["text"] == "hi"
    assert [(s.chat_id, s.text) for s in telegram.sent] == [("7", "hi")]
    stranger = telegram.add_bot("stranger_bot")
    refused = httpx.post(f"{base}/bot{stranger}/sendMessage", json={"chat_id": 7, "text": "x"})
    assert refused.status_code == 401 and refused.json()["description"] == "Unauthorized"
    kept = httpx.post(f"{base}/bot{token}/setWebhook", json={"url": "https://evil.test/"})
    assert kept.json()["ok"] is True
    assert telegram.bots[token].webhook_url.startswith("https://hermit.test/")  # still ours
    polled = httpx.post(f"{base}/bot{token}/getUpdates", json={})
    assert polled.status_code == 409
    assert len(telegram.sent) == 1


# -- secrets --------------------------------------------------------------------------------


def test_the_bot_token_is_never_logged(
    transactional_db: None,
    fake_backend: FakeBackend,
    telegram: FakeTelegram,
    client: Any,
    caplog: pytest.LogCaptureFixture,
    eager: None,
) -> None:
    caplog.set_level(logging.DEBUG)
    sandbox = running_fake_sandbox("alice@tg.test")
    token = telegram.add_bot()
    signed_in(client, sandbox).post("/channels/", {"token": token})
    link = TelegramLink.objects.get(sandbox=sandbox)
    with HooksDouble(link.hook_token) as gateway:
        Sandbox.objects.filter(pk=sandbox.pk).update(
            backend_state={**sandbox.backend_state, "endpoint_port": gateway.port}
        )
        gateway.status = 503
        post(client, link, telegram.make_update("log me not"))
        post(client, link, telegram.make_update("x"), secret="wrong")
    telegram.bots.pop(token)  # revoked: the disconnect's deleteWebhook fails (and is logged)
    client.post("/channels/", {"action": "disconnect"})
    client.post("/channels/", {"token": token})  # refused now, with an error shown
    assert caplog.records, "something was logged"
    for record in caplog.records:
        text = record.getMessage() + str(record.exc_text or "")
        assert token not in text and link.secret not in text and link.hook_token not in text
    assert token not in caplog.text


# -- staff ---------------------------------------------------------------------------------------


def test_staff_see_links_and_waiting_updates_but_no_secret_or_message_and_may_unlink(
    transactional_db: None, fake_backend: FakeBackend, telegram: FakeTelegram, client: Any
) -> None:
    from django.contrib.auth.models import Group
    from django.urls import reverse

    from sandboxes.roles import OPERATOR, SUPPORT
    from tests.factories import make_user
    from tests.mfa import enroll_totp

    sandbox = running_fake_sandbox("staffed@tg.test")
    link, token = linked(sandbox, telegram)
    words = "my private words for the agent"
    assert actions.accept_update(link, telegram.make_update(words, chat_id=PAIRED[0])) == "stored"
    waiting = TelegramUpdate.objects.get(link=link, delivered_at=None)
    staff = {}
    for group in (SUPPORT, OPERATOR):
        user = make_user(f"{group}@hermit.test", is_staff=True)
        user.groups.add(Group.objects.get(name=group))
        enroll_totp(user)
        staff[group] = user

    client.force_login(staff[SUPPORT])
    links = reverse("admin:doorbell_telegramlink_changelist")
    pages = [
        links,
        reverse("admin:doorbell_telegramlink_change", args=[link.pk]),
        reverse("admin:doorbell_telegramupdate_changelist"),
        reverse("admin:doorbell_telegramupdate_change", args=[waiting.pk]),
    ]
    for url in pages:
        response = client.get(url)
        assert response.status_code == 200, url
        page = response.content.decode()
        for secret in (token, link.secret, link.hook_token, link.pairing_code, words):
            assert secret not in page, (url, secret)
    listed = client.get(links).content.decode()
    assert "@" + link.bot_username in listed and "staffed@tg.test" in listed
    row = listed[listed.index("@" + link.bot_username) :]
    assert '<td class="field-paired">2</td>' in row and '<td class="field-waiting">1</td>' in row
    assert 'value="unlink"' not in listed  # support may not unlink
    forbidden = client.post(links, {"action": "unlink", "_selected_action": [link.pk]})
    assert forbidden.status_code in (200, 302) and TelegramLink.objects.filter(pk=link.pk).exists()

    client.force_login(staff[OPERATOR])
    assert 'value="unlink"' in client.get(links).content.decode()
    done = client.post(links, {"action": "unlink", "_selected_action": [link.pk]}, follow=True)
    assert "Unlinked 1 bot(s)." in done.content.decode()
    assert not TelegramLink.objects.filter(pk=link.pk).exists()
    assert telegram.bots[token].webhook_url == ""  # its webhook was removed at Telegram
    purge_queues()  # the delivery the stored update queued: no worker here takes it
