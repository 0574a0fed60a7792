"""A sleeping agent never misses its own scheduled jobs.

Before a sandbox dozes or sleeps, the portal reads its next due job through the gateway
(``cron.status``) and stores it; beat (``schedule.wake_due``) wakes it HERMIT_JOB_WAKE_LEAD
before, and the idle policy (``schedule.holds_awake``) lets it sleep again once the job ran.
The end-to-end tests run a real gateway, a real cron job calling the (fake) model, and real time.
They use the session's shared pooled gateway (``alice@chat.test``: no cold boot of their own)
and leave it running and thawed, as they found it, whatever happens.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.utils import timezone

from billing.models import Account, Plan
from sandboxes import actions, schedule
from sandboxes.models import Sandbox
from sandboxes.openclaw import cron
from sandboxes.openclaw.protocol import ClientInfo, DeviceIdentity, GatewayConnection
from tests.fakes.model_server import FakeModelServer

State = Sandbox.State
ADMIN = ClientInfo(client_id="cli", mode="cli", scopes=("operator.read", "operator.admin"))


# -- helpers --------------------------------------------------------------------------------


def gateway(sandbox: Sandbox, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """Call one gateway method as an operator admin (cron.add / cron.remove / cron.runs)."""

    async def call() -> dict[str, Any]:
        host, port = actions.gateway_endpoint(sandbox)
        conn = await GatewayConnection.open(
            f"ws://{host}:{port}",
            token=sandbox.gateway_token,
            identity=DeviceIdentity.generate(),
            info=ADMIN,
            timeout=20,
        )
        try:
            return await conn.request(method, params, timeout=20)
        finally:
            await conn.close()

    return asyncio.run(call())


def add_job(sandbox: Sandbox, due: datetime, message: str) -> dict[str, Any]:
    """Schedule a one-shot agent turn at ``due`` (kept after it ran, so its runs can be read)."""
    return gateway(
        sandbox,
        "cron.add",
        {
            "name": "wake-probe",
            "enabled": True,
            "deleteAfterRun": False,
            "schedule": {"kind": "at", "at": due.isoformat().replace("+00:00", "Z")},
            "sessionTarget": "isolated",
            "wakeMode": "now",
            "payload": {"kind": "agentTurn", "message": message, "lightContext": True},
            "delivery": {"mode": "none"},
        },
    )


def probe_requests(model: FakeModelServer, marker: str) -> list[Any]:
    return [r for r in list(model.requests) if marker in str(r.json)]


def asleep(sandbox: Sandbox) -> Sandbox:
    Sandbox.objects.filter(pk=sandbox.pk).update(state=State.SLEEPING, backend_state={})
    sandbox.refresh_from_db()
    return sandbox


@pytest.fixture
def queued_wakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, str]]]:
    """Record the wake tasks wake_due queues, instead of running them."""
    queued: list[tuple[int, str]] = []
    monkeypatch.setattr(schedule.wake_for_job, "delay", lambda pk, due="": queued.append((pk, due)))
    yield queued


# -- fast tests: who is woken, and when ----------------------------------------------------


@pytest.mark.django_db
def test_wake_due_wakes_only_sleepers_whose_job_is_near(
    settings: Any, alice: Any, bob: Any, queued_wakes: list[tuple[int, str]]
) -> None:
    from tests.factories import make_user

    settings.HERMIT_JOB_WAKE_LEAD = 60
    now = timezone.now().replace(microsecond=0)
    carol, dave, erin = (make_user(f"{n}@example.com") for n in ("carol", "dave", "erin"))
    Account.objects.filter(user=bob).update(plan=Plan.objects.get(slug="pro"))

    def sandbox(user: Any, state: str, due: datetime | None) -> Sandbox:
        Sandbox.objects.filter(owner=user).update(state=state, next_job_at=due)
        return Sandbox.objects.get(owner=user)

    soon = sandbox(alice, State.SLEEPING, now + timedelta(seconds=45))
    pro = sandbox(bob, State.SLEEPING, now + timedelta(seconds=45))  # never sleeps: reconcile
    far = sandbox(carol, State.SLEEPING, now + timedelta(seconds=75))
    awake = sandbox(dave, State.RUNNING, now + timedelta(seconds=10))
    dozing = sandbox(erin, State.DOZING, now - timedelta(seconds=5))  # overdue: wake at once

    assert schedule.wake_due(now) == 2
    assert sorted(pk for pk, _ in queued_wakes) == sorted([soon.pk, dozing.pk])
    assert dict(queued_wakes)[soon.pk] == (now + timedelta(seconds=45)).isoformat()
    assert schedule.wake_due(now) == 0, "a wake on the way is not queued again"
    # The far one is woken once its job is within the lead; the others never.
    assert schedule.wake_due(now + timedelta(seconds=16)) == 1
    assert queued_wakes[-1][0] == far.pk
    assert {pro.pk, awake.pk}.isdisjoint(pk for pk, _ in queued_wakes)


@pytest.mark.django_db
def test_wake_due_skips_stopped_inactive_and_backed_off_sandboxes(
    settings: Any, alice: Any, bob: Any, queued_wakes: list[tuple[int, str]]
) -> None:
    from tests.factories import make_user

    now = timezone.now().replace(microsecond=0)
    due = now + timedelta(seconds=30)
    carol = make_user("carol@example.com")
    Sandbox.objects.filter(owner=alice).update(state=State.STOPPED, next_job_at=due)
    Sandbox.objects.filter(owner=bob).update(state=State.SLEEPING, next_job_at=due)
    bob.is_active = False
    bob.save()
    Sandbox.objects.filter(owner=carol).update(
        state=State.SLEEPING, next_job_at=due, restart_after=now + timedelta(minutes=5)
    )
    assert schedule.wake_due(now) == 0
    assert queued_wakes == []
    Sandbox.objects.filter(owner=carol).update(restart_after=now - timedelta(seconds=1))
    assert schedule.wake_due(now) == 1


@pytest.mark.django_db
def test_holds_awake_around_the_job_without_asking_a_gateway(settings: Any, alice: Any) -> None:
    settings.HERMIT_JOB_WAKE_LEAD = 60
    settings.HERMIT_JOB_START_GRACE = 30
    now = timezone.now().replace(microsecond=0)
    sandbox = Sandbox.objects.get(owner=alice)
    sandbox.state = State.DOZING  # frozen: its gateway cannot be asked, only the stored time
    sandbox.next_job_at = now + timedelta(seconds=60)
    assert not schedule.holds_awake(sandbox, now - timedelta(seconds=1))
    assert schedule.holds_awake(sandbox, now)
    assert schedule.holds_awake(sandbox, now + timedelta(seconds=89))
    assert not schedule.holds_awake(sandbox, now + timedelta(seconds=90))
    sandbox.next_job_at = None
    assert not schedule.holds_awake(sandbox, now)


@pytest.mark.django_db
def test_an_unreachable_gateway_has_no_next_job(
    settings: Any, alice: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from sandboxes.consumers.chat import device_identity_for

    # A sandbox the backend says is running on a port where nothing listens.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sandbox = Sandbox.objects.get(owner=alice)
    Sandbox.objects.filter(pk=sandbox.pk).update(
        state=State.RUNNING, gateway_token="t" * 32, next_job_at=timezone.now()
    )
    sandbox.refresh_from_db()
    device_identity_for(sandbox)
    monkeypatch.setattr(actions, "gateway_endpoint", lambda _sandbox: ("127.0.0.1", port))
    started = time.monotonic()
    assert cron.next_job_at(sandbox, timeout=2) is None
    assert not cron.busy(sandbox, timeout=2)
    late = timezone.now() + timedelta(seconds=31)  # past the start grace: the gateway is asked
    assert not schedule.holds_awake(sandbox, late)
    assert time.monotonic() - started < 10
    monkeypatch.undo()
    # Not running at all (no endpoint): None as well, without raising.
    Sandbox.objects.filter(pk=sandbox.pk).update(state=State.SLEEPING, backend_state={})
    sandbox.refresh_from_db()
    assert cron.next_job_at(sandbox, timeout=2) is None


def test_from_ms_reads_only_real_timestamps() -> None:
    assert cron.from_ms(1_800_000_000_000) == datetime(2027, 1, 15, 8, 0, tzinfo=UTC)
    for value in (None, 0, -5, "1800000000000", True, 1e30):
        assert cron.from_ms(value) is None


# -- end to end: a real gateway, a real job, real time ----------------------------------------

POOLED = "alice@chat.test"  # pooled for other suites too: no gateway start of its own


def back_to_running(sandbox: Sandbox) -> None:
    """Leave the shared gateway as the next test expects it: running and not frozen (a dozing
    one is thawed; an asleep one is woken, from its checkpoint)."""
    sandbox.refresh_from_db()
    if sandbox.state == State.DOZING:
        from sandboxes import sleep

        sleep.thaw(sandbox)
    elif sandbox.state != State.RUNNING:
        for _ in actions.wake_sandbox(sandbox):
            pass
    sandbox.refresh_from_db()


def finished_runs(sandbox: Sandbox, job_id: str) -> list[dict[str, Any]]:
    entries = gateway(sandbox, "cron.runs", {"id": job_id}).get("entries") or []
    return [e for e in entries if e.get("action") == "finished"]


def earliest_job(sandbox: Sandbox) -> datetime | None:
    """The earliest next run over the agent's enabled jobs, from the full job list."""
    jobs = gateway(sandbox, "cron.list", {"compact": True, "limit": 200}).get("jobs") or []
    times = [cron.from_ms(j.get("nextRunAtMs")) for j in jobs if j.get("enabled")]
    return min((t for t in times if t is not None), default=None)


def chat_scopes_still_work(sandbox: Sandbox) -> None:
    from sandboxes.consumers.chat import device_identity_for

    async def connect() -> None:
        host, port = actions.gateway_endpoint(sandbox)
        conn = await GatewayConnection.open(
            f"ws://{host}:{port}",
            token=sandbox.gateway_token,
            identity=device_identity_for(sandbox),
            timeout=20,
        )
        try:
            await conn.request("chat.history", {"sessionKey": "main", "limit": 1}, timeout=20)
        finally:
            await conn.close()

    asyncio.run(connect())


def beat_until_called(
    sandbox: Sandbox, model: FakeModelServer, marker: str, due: datetime
) -> tuple[float, float]:
    """Run wake_due every second in real time (the wake task inline, as a worker would run it)
    until the job's model call arrives; return when the wake was queued and when it was up."""
    from portal.celery import app

    queued_at = woken_at = None
    app.conf.task_always_eager = True
    try:
        while time.time() < due.timestamp() + 90 and not probe_requests(model, marker):
            before = time.time()
            if schedule.wake_due(timezone.now()):
                assert queued_at is None, "one wake per job"
                queued_at = before
                sandbox.refresh_from_db()
                assert sandbox.state == State.RUNNING
                woken_at = time.time()
            if woken_at is not None:
                assert schedule.holds_awake(sandbox, timezone.now()), "up for its job"
            time.sleep(1)
    finally:
        app.conf.task_always_eager = False
    assert probe_requests(model, marker), "the job never called the model"
    assert queued_at is not None and woken_at is not None
    return queued_at, woken_at


def assert_ran_on_time(
    sandbox: Sandbox, model: FakeModelServer, marker: str, job_id: str, due: datetime
) -> None:
    """The job's one run started within 2 s of its due time and made the model call."""
    deadline = time.time() + 120
    while not (runs := finished_runs(sandbox, job_id)) and time.time() < deadline:
        time.sleep(1)
    assert len(runs) == 1, runs
    assert runs[0]["status"] == "ok", runs[0]
    started = runs[0]["runAtMs"] / 1000
    assert due.timestamp() <= started <= due.timestamp() + 2, (
        f"the job started {started - due.timestamp():+.1f} s from its due time"
    )
    called = probe_requests(model, marker)[0].received_at
    assert started <= called <= started + runs[0]["durationMs"] / 1000


def test_a_dozing_agent_is_thawed_for_its_job(
    sandbox_for: Callable[..., Sandbox], model_server: FakeModelServer, settings: Any
) -> None:
    from sandboxes import sleep

    settings.HERMIT_JOB_WAKE_LEAD = lead = 10  # a thaw takes milliseconds
    sandbox = sandbox_for(POOLED)
    marker = f"cron-probe-{uuid.uuid4().hex[:12]}"
    # Due 35 s ahead: the job is added and the agent dozes within a second or two, and it
    # then dozes for the 20 s asserted below before it is thawed, the lead (10 s) ahead.
    due = (timezone.now() + timedelta(seconds=35)).replace(microsecond=0)
    job_id = str(add_job(sandbox, due, f"Scheduled check {marker}: reply with one word.")["id"])
    try:
        assert sleep.doze(sandbox)
        sandbox.refresh_from_db()
        assert sandbox.state == State.DOZING
        assert sandbox.next_job_at == due, "the doze stored the next job's time"
        dozed_at = time.time()
        queued_at, woken_at = beat_until_called(sandbox, model_server, marker, due)
        assert queued_at - dozed_at > 20, "it really dozed"
        assert due.timestamp() - lead - 1.5 <= queued_at <= due.timestamp() - lead + 1.5
        assert woken_at - queued_at < 2, "a thaw is quick"
        assert_ran_on_time(sandbox, model_server, marker, job_id, due)
    finally:
        back_to_running(sandbox)  # never leave the shared gateway frozen
        if sandbox.state == State.RUNNING:
            gateway(sandbox, "cron.remove", {"id": job_id})


def test_a_sleeping_agent_is_woken_for_its_job_and_sleeps_again(
    sandbox_for: Callable[..., Sandbox], model_server: FakeModelServer, settings: Any
) -> None:
    # It hibernates (a CRIU checkpoint). CRIU restores a process with its monotonic clock
    # continuing from the dump, so the gateway's own timer for the job runs late by the time it
    # was asleep; OpenClaw re-checks its schedule against the wall clock at least every 60 s, so
    # the lead (default 90 s) must leave room for that re-check before the job is due.
    settings.HERMIT_JOB_WAKE_LEAD = lead = 75
    settings.HERMIT_JOB_START_GRACE = grace = 5
    sandbox = sandbox_for(POOLED)
    marker = f"cron-probe-{uuid.uuid4().hex[:12]}"
    # The job's model call takes 10 s: long enough to see it running.
    model_server.script(reply="Done with the scheduled check.", first_byte_delay=10)
    due = (timezone.now() + timedelta(seconds=100)).replace(microsecond=0)
    job_id = str(add_job(sandbox, due, f"Scheduled check {marker}: reply with one word.")["id"])
    try:
        assert cron.next_job_at(sandbox) == due == earliest_job(sandbox)

        assert actions.sleep_sandbox(sandbox) == "checkpointed"
        sandbox.refresh_from_db()
        assert sandbox.state in schedule.ASLEEP
        assert sandbox.next_job_at == due, "the sleep stored the next job's time"
        slept_at = time.time()

        queued_at, woken_at = beat_until_called(sandbox, model_server, marker, due)
        assert queued_at - slept_at > 20, "it really slept"
        assert due.timestamp() - lead - 1.5 <= queued_at <= due.timestamp() - lead + 1.5
        assert woken_at < due.timestamp(), "it was up before its job was due"

        # The model call is under way: the gateway reports the job running, which holds the
        # sandbox up past the start grace.
        assert cron.busy(sandbox)
        past_grace = max(timezone.now(), due + timedelta(seconds=grace + 1))
        assert schedule.holds_awake(sandbox, past_grace)

        assert_ran_on_time(sandbox, model_server, marker, job_id, due)

        # Once the job ran, the idle policy may put it to sleep again: the sleep stores the
        # next due job (the one-shot is done; OpenClaw's own daily memory job, if enabled).
        assert not cron.busy(sandbox)
        assert not schedule.holds_awake(sandbox, timezone.now())
        with pytest.MonkeyPatch.context() as patch:  # remembered: the gateway is not asked again
            patch.setattr(cron, "read_status", lambda *a, **k: pytest.fail("asked again"))
            assert not schedule.holds_awake(sandbox, timezone.now())
        following = earliest_job(sandbox)
        assert following is None or following > due
        assert cron.next_job_at(sandbox) == following
        # The read-only connects above used the sandbox's own device key: the webchat still
        # connects with it and its usual scopes.
        chat_scopes_still_work(sandbox)
    except BaseException:
        back_to_running(sandbox)  # never leave the shared gateway asleep or frozen
        raise
    finally:
        sandbox.refresh_from_db()
        if sandbox.state == State.RUNNING:
            gateway(sandbox, "cron.remove", {"id": job_id})
    # The sleep policy's next pass, once the agent has been idle a while, dozes it again and
    # stores its next job.
    from sandboxes import sleep

    later = timezone.now() + timedelta(seconds=settings.HERMIT_DOZE_AFTER + 30)
    try:
        assert sleep.sleep_idle(later)["dozed"] == 1
        sandbox.refresh_from_db()
        assert sandbox.state == State.DOZING
        assert sandbox.next_job_at == following
        near = following is not None and following <= later + timedelta(seconds=lead)
        assert (sandbox in schedule.due_for_wake(later)) == near
    finally:
        back_to_running(sandbox)  # the shared gateway goes on serving the tests after this one
