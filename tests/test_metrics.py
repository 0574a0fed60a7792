"""/metrics: refused without the right token; the named series with the right values for
seeded rows (sandboxes, state and backup events, usage records), real starts and wakes on the
fake backend, open chat sessions across processes, and a real Celery queue's depth."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import time_machine
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from ai_gateway.models import Api, Upstream, UsageRecord
from billing.models import Account, Plan
from portal import metrics
from portal.asgi import application
from sandboxes import actions, chat_sessions, sleep
from sandboxes.backends.fake import FakeBackend
from sandboxes.models import Sandbox, SandboxEvent, Suspension
from tests.factories import make_user
from tests.fixtures.chat import session_cookie

ROOT = Path(__file__).resolve().parent.parent
State = Sandbox.State
TOKEN = "metrics-token-for-tests-0123456789"
NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: Client | None = None) -> Samples:
    """GET /metrics with the token; return {(sample name, labels): value}."""
    response = (client or Client()).get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == metrics.CONTENT_TYPE
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def histogram(samples: Samples, name: str) -> dict[str, float]:
    """Return {le: count, "count": n, "sum": s} of a gauge histogram."""
    found = {
        dict(labels)["le"]: v
        for (sample, labels), v in samples.items()
        if sample == f"{name}_bucket"
    }
    return {
        **found,
        "count": value(samples, f"{name}_gcount"),
        "sum": value(samples, f"{name}_gsum"),
    }


@pytest.fixture(autouse=True)
def _token(settings: Any) -> None:
    settings.HERMIT_METRICS_TOKEN = TOKEN
    settings.HERMIT_METRICS_WINDOW = 300


@pytest.fixture
def fake(fake_backend: FakeBackend) -> FakeBackend:
    return fake_backend


def sandbox_of(email: str, state: str = State.STOPPED, plan: str = "free") -> Sandbox:
    user = make_user(email)
    Account.objects.filter(user=user).update(plan=Plan.objects.get(slug=plan))
    Sandbox.objects.filter(owner=user).update(state=state, backend="fake")
    return Sandbox.objects.get(owner=user)


def event(sandbox: Sandbox, kind: str, at: datetime, state: str = "", message: str = "") -> None:
    SandboxEvent.objects.create(
        sandbox=sandbox, kind=kind, state=state, message=message, created_at=at
    )


# -- the token ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_refuses_a_missing_or_wrong_token(client: Client) -> None:
    missing = client.get("/metrics")
    assert missing.status_code == 401
    assert missing["WWW-Authenticate"] == 'Bearer realm="metrics"'
    assert client.get("/metrics", headers={"Authorization": TOKEN}).status_code == 401
    wrong = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}x"})
    assert wrong.status_code == 403
    assert b"hermit_" not in missing.content + wrong.content
    right = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert right.status_code == 200 and b"hermit_sandboxes" in right.content


@pytest.mark.django_db
def test_it_has_no_metrics_without_a_configured_token(client: Client, settings: Any) -> None:
    settings.HERMIT_METRICS_TOKEN = ""
    response = client.get("/metrics", headers={"Authorization": "Bearer "})
    assert response.status_code == 404
    assert client.get("/metrics", headers={"Authorization": "Bearer x"}).status_code == 404


# -- sandboxes ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_counts_sandboxes_by_state_and_plan() -> None:
    sandbox_of("a@example.com", State.RUNNING)
    sandbox_of("b@example.com", State.RUNNING)
    sandbox_of("c@example.com", State.SLEEPING)
    sandbox_of("d@example.com", State.RUNNING, plan="pro")

    samples = scrape()

    assert value(samples, "hermit_sandboxes", state="running", plan="free") == 2
    assert value(samples, "hermit_sandboxes", state="sleeping", plan="free") == 1
    assert value(samples, "hermit_sandboxes", state="running", plan="pro") == 1
    assert value(samples, "hermit_sandboxes", state="failed", plan="pro") == 0
    total = sum(v for (name, _), v in samples.items() if name == "hermit_sandboxes")
    assert total == 4


@pytest.mark.django_db
def test_it_times_starts_and_wakes_and_counts_their_failures_in_the_window() -> None:
    a = sandbox_of("a@example.com")
    b = sandbox_of("b@example.com")
    c = sandbox_of("c@example.com")
    t = NOW - timedelta(seconds=120)
    for state, seconds in [("stopped", 0), ("starting", 1), ("running", 5)]:  # a start: 4 s
        event(a, "state", t + timedelta(seconds=seconds), state)
    for state, seconds in [("sleeping", 0), ("starting", 10), ("running", 12.5)]:  # a wake
        event(b, "state", t + timedelta(seconds=seconds), state)
    for state, seconds in [("starting", 20), ("failed", 40)]:  # a failed start
        event(c, "state", t + timedelta(seconds=seconds), state)
    old = NOW - timedelta(seconds=900)  # ended before the window: not counted
    event(c, "state", old, "starting")
    event(c, "state", old + timedelta(seconds=50), "running")

    with time_machine.travel(NOW, tick=False):
        samples = scrape()

    start = histogram(samples, "hermit_sandbox_start_seconds")
    assert (start["2.0"], start["5.0"], start["+Inf"], start["count"], start["sum"]) == (
        0, 1, 1, 1, 4.0,
    )  # fmt: skip
    wake = histogram(samples, "hermit_sandbox_wake_seconds")
    assert (wake["2.0"], wake["5.0"], wake["count"], wake["sum"]) == (0, 1, 1, 2.5)
    assert value(samples, "hermit_sandbox_start_failures") == 1
    assert value(samples, "hermit_sandbox_wake_failures") == 0
    assert value(samples, "hermit_metrics_window_seconds") == 300


@pytest.mark.django_db
def test_it_times_real_starts_and_wakes_on_the_fake_backend(fake: FakeBackend) -> None:
    user = make_user("real@example.com")
    sandbox = Sandbox.objects.get(owner=user)
    Sandbox.objects.filter(pk=sandbox.pk).update(backend="fake")
    sandbox.refresh_from_db()
    actions.provision_sandbox(sandbox)  # a start
    sandbox.refresh_from_db()
    assert sleep.hibernate(sandbox) == "checkpointed"
    list(actions.wake_sandbox(sandbox))  # a wake, from the checkpoint
    sandbox.refresh_from_db()
    assert sandbox.state == State.RUNNING
    actions.stop_sandbox(sandbox)
    fake.fail_next(sandbox.slug, "start", times=2)  # the start and its one retry
    list(actions.start_sandbox(sandbox, explicit=True))
    sandbox.refresh_from_db()
    assert sandbox.state == State.FAILED

    samples = scrape()

    assert histogram(samples, "hermit_sandbox_start_seconds")["count"] == 1
    assert histogram(samples, "hermit_sandbox_wake_seconds")["count"] == 1
    assert value(samples, "hermit_sandbox_start_failures") == 1
    assert value(samples, "hermit_sandbox_wake_failures") == 0


@pytest.mark.django_db
def test_it_times_backups_and_counts_their_failures() -> None:
    a = sandbox_of("a@example.com", State.RUNNING)
    b = sandbox_of("b@example.com", State.RUNNING)
    t = NOW - timedelta(seconds=200)
    event(a, "backup", t, message="Backing up your agent (paused while it is read)")
    event(a, "backup", t + timedelta(seconds=42), message="Backed up snapshot 1a2b3c4d: 12 files")
    event(b, "backup", t, message="Backing up your agent")
    event(b, "backup", t + timedelta(seconds=3), message="Backup failed: restic exited 1")
    event(b, "backup", t + timedelta(seconds=60), message="Failed: the storage is unreachable")
    event(b, "backup", t + timedelta(seconds=70), message="Unchanged since the last snapshot")

    with time_machine.travel(NOW, tick=False):
        samples = scrape()

    backups = histogram(samples, "hermit_backup_seconds")
    assert (backups["30.0"], backups["60.0"], backups["count"], backups["sum"]) == (0, 1, 1, 42)
    assert value(samples, "hermit_backup_failures") == 2


# -- the AI gateway --------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_counts_model_calls_tokens_and_errors_by_upstream() -> None:
    openai = Upstream.objects.create(
        name="openai-main", provider="openai-compatible", base_url="http://127.0.0.1:9/v1"
    )
    anthropic = Upstream.objects.create(
        name="anthropic-main", provider="anthropic", base_url="http://127.0.0.1:9"
    )
    recent, old = NOW - timedelta(seconds=60), NOW - timedelta(seconds=600)
    for upstream, outcome, tokens, at in [
        (openai, "ok", (100, 20, 5), recent),
        (openai, "ok", (50, 10, 0), recent),
        (openai, "error", (0, 0, 0), recent),
        (anthropic, "ok", (7, 3, 0), recent),
        (None, "refused", (0, 0, 0), recent),
        (openai, "ok", (1000, 1000, 0), old),  # before the window
    ]:
        UsageRecord.objects.create(
            upstream=upstream, api=Api.OPENAI, outcome=outcome, created_at=at,
            input_tokens=tokens[0], output_tokens=tokens[1], cached_tokens=tokens[2],
        )  # fmt: skip

    with time_machine.travel(NOW, tick=False):
        samples = scrape()

    assert value(samples, "hermit_ai_calls", upstream="openai-main", outcome="ok") == 2
    assert value(samples, "hermit_ai_calls", upstream="openai-main", outcome="error") == 1
    assert value(samples, "hermit_ai_calls", upstream="anthropic-main", outcome="ok") == 1
    assert value(samples, "hermit_ai_calls", upstream="none", outcome="refused") == 1
    assert value(samples, "hermit_ai_tokens", upstream="openai-main", kind="input") == 150
    assert value(samples, "hermit_ai_tokens", upstream="openai-main", kind="output") == 30
    assert value(samples, "hermit_ai_tokens", upstream="openai-main", kind="cached") == 5
    assert value(samples, "hermit_ai_tokens", upstream="anthropic-main", kind="input") == 7
    assert value(samples, "hermit_ai_errors", upstream="openai-main") == 1
    assert value(samples, "hermit_ai_errors", upstream="anthropic-main") == 0
    assert value(samples, "hermit_ai_calls", upstream="anthropic-main", outcome="error") == 0


# -- chat sessions and the queue ---------------------------------------------------------------


async def test_it_counts_open_chat_sessions_across_processes_and_forgets_a_dead_one() -> None:
    with time_machine.travel(NOW, tick=False) as traveller:
        first = asyncio.ensure_future(chat_sessions.hold())
        second = asyncio.ensure_future(chat_sessions.hold())
        assert await open_sessions_become(2)  # both published
        # Another web process with three sessions, publishing as this one does.
        other = "hermit:chat:open:otherhost:1:abcd"
        chat_sessions.cache.set(other, 3, chat_sessions.TTL)
        registry = chat_sessions.cache.get(chat_sessions.REGISTRY)
        chat_sessions.cache.set(chat_sessions.REGISTRY, {**registry, other: NOW.timestamp()})
        assert chat_sessions.open_sessions() == 5

        # It dies; this process lives on and refreshes its count.
        traveller.shift(chat_sessions.TTL + 1)
        await chat_sessions._apublish()
        assert chat_sessions.open_sessions() == 2

        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        assert chat_sessions.open_sessions() == 1
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
        assert chat_sessions.open_sessions() == 0


@pytest.mark.django_db
def test_it_exports_open_chat_sessions() -> None:
    chat_sessions.cache.set(chat_sessions.PROCESS_KEY, 4, chat_sessions.TTL)
    chat_sessions.cache.set(chat_sessions.REGISTRY, {chat_sessions.PROCESS_KEY: 0.0})
    assert value(scrape(), "hermit_chat_sessions_open") == 4


@pytest.mark.django_db
def test_it_reports_the_celery_queue_depth() -> None:
    from portal.celery import app

    queue = f"hermit-metrics-test-{uuid.uuid4().hex[:8]}"
    previous, app.conf.task_default_queue = app.conf.task_default_queue, queue
    try:
        assert value(scrape(), "hermit_celery_queue_depth", queue=queue) == 0
        for _ in range(3):  # real messages through the configured broker, never consumed
            app.send_task("sandboxes.tasks.reconcile_sandboxes", queue=queue)
        assert value(scrape(), "hermit_celery_queue_depth", queue=queue) == 3
    finally:
        app.conf.task_default_queue = previous
        with app.connection_for_write() as connection:
            connection.default_channel.queue_purge(queue)


@pytest.mark.django_db
def test_its_grafana_dashboard_reads_exported_series_and_each_of_them() -> None:
    Upstream.objects.create(name="openai-main", provider="openai", base_url="http://x/v1")
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "hermit.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    read = {name for expr in exprs for name in re.findall(r"\bhermit_[a-z_]+", expr)}
    exported = {name for name, _ in scrape()}

    assert read <= exported, read - exported
    family = re.compile(r"_(bucket|gcount|gsum)$")
    assert {family.sub("", name) for name in read} == {family.sub("", n) for n in exported}


@pytest.mark.django_db(transaction=True)
async def test_it_counts_a_chat_session_from_connect_to_disconnect() -> None:
    # A suspended user's chat opens, says why and never wakes an agent: no gateway needed.
    user = await database_sync_to_async(make_user)("suspended@example.com")
    await database_sync_to_async(Suspension.objects.create)(user=user, reason="Spam runs")
    cookie = await database_sync_to_async(session_cookie)(user)
    headers = [(b"origin", b"http://testserver"), (b"host", b"testserver")]
    comm = WebsocketCommunicator(
        application, "/ws/chat/", headers=[*headers, (b"cookie", cookie.encode())]
    )
    connected, _ = await comm.connect(timeout=10)
    try:
        assert connected
        frame = json.loads(await comm.receive_from(timeout=10))
        assert (frame["type"], frame["state"]) == ("status", "failed")
        assert await open_sessions_become(1)
    finally:
        await comm.disconnect()
    assert await open_sessions_become(0)


async def open_sessions_become(count: int, timeout: float = 5.0) -> bool:
    """Return True once chat_sessions.open_sessions() == count (it publishes from a task)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await sync_to_async(chat_sessions.open_sessions)() != count:
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


@pytest.mark.django_db
def test_it_reports_each_sandbox_host_and_its_queue() -> None:
    from portal.celery import app
    from sandboxes.hosts import queue_for
    from sandboxes.models import SandboxHost

    now = timezone.now()
    SandboxHost.objects.create(
        name="metrics-h1", address="10.0.0.1", last_heartbeat=now - timedelta(seconds=12),
        free_ram_mb=2048, awake_sandboxes=3,
    )  # fmt: skip
    SandboxHost.objects.create(
        name="metrics-h2", address="10.0.0.2", state=SandboxHost.State.LOST,
        last_heartbeat=now - timedelta(seconds=400),
    )  # fmt: skip
    SandboxHost.objects.create(name="metrics-new", address="10.0.0.3")
    lost_queue = queue_for("metrics-h2")
    try:
        for _ in range(2):  # tasks that piled up for the lost host, never consumed
            app.send_task("sandboxes.tasks.reconcile_sandboxes", queue=lost_queue)
        series = scrape()
        age = "hermit_host_heartbeat_age_seconds"
        assert 12 <= value(series, age, host="metrics-h1", state="active") < 60
        assert 400 <= value(series, age, host="metrics-h2", state="lost") < 450
        assert value(series, age, host="metrics-new", state="active") == -1
        assert value(series, "hermit_host_free_ram_bytes", host="metrics-h1") == 2048 * 2**20
        assert value(series, "hermit_host_sandboxes_awake", host="metrics-h1") == 3
        depth = "hermit_celery_queue_depth"
        assert value(series, depth, queue=lost_queue) == 2
        assert value(series, depth, queue=queue_for("metrics-h1")) == 0
        assert value(series, depth, queue=str(app.conf.task_default_queue)) >= 0
    finally:
        with app.connection_for_write() as connection:
            connection.default_channel.queue_purge(lost_queue)
