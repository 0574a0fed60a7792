"""The sandbox's admin page (what runs inside it now, its use and history) and the staff actions
on one or many sandboxes (start, stop, restart, sleep, wake, move to a runtime version), each
queued as a Celery task and recorded under the staff member's name, on the in-memory backend."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from ai_gateway.models import UsageRecord
from sandboxes import actions, bootqueue, tasks
from sandboxes.backends import get_backend
from sandboxes.backends.fake import FakeBackend
from sandboxes.models import RuntimeImage, Sandbox, SandboxEvent, Snapshot
from tests.factories import make_user
from tests.mfa import enroll_totp

pytestmark = pytest.mark.django_db
State = Sandbox.State
CHANGELIST = "admin:sandboxes_sandbox_changelist"


@pytest.fixture
def fake(settings: Any, tmp_path: Path) -> Iterator[FakeBackend]:
    backend = get_backend("fake")
    assert isinstance(backend, FakeBackend)
    backend.reset()
    settings.SANDBOX_BACKEND = "fake"
    settings.HERMIT_HOST_NAME = "host-a.test"
    yield backend
    backend.reset()


def make_image(tmp_path: Path, version: str, *, current: bool = False) -> RuntimeImage:
    (tmp_path / version).mkdir()
    image = RuntimeImage.objects.create(
        openclaw_version=version,
        node_version="24.0.0",
        path=str(tmp_path / version),
        status=RuntimeImage.Status.READY,
        is_current=current,
    )
    if current:
        RuntimeImage.objects.exclude(pk=image.pk).update(is_current=False)
    return image


@pytest.fixture
def current(fake: FakeBackend, tmp_path: Path) -> RuntimeImage:
    return make_image(tmp_path, "2026.11.1", current=True)


def running(email: str) -> Sandbox:
    sandbox = Sandbox.objects.get(owner=make_user(email))
    Sandbox.objects.filter(pk=sandbox.pk).update(backend="fake")
    sandbox.refresh_from_db()
    actions.provision_sandbox(sandbox)
    sandbox.refresh_from_db()
    assert sandbox.state == State.RUNNING, sandbox.error_message
    return sandbox


def post_action(client: Client, action: str, sandboxes: list[Sandbox], **extra: Any) -> str:
    data = {"action": action, "_selected_action": [s.pk for s in sandboxes], **extra}
    return client.post(reverse(CHANGELIST), data, follow=True).content.decode()


def run_queued(delay: mock.MagicMock, task: Any) -> None:
    """Run each queued call of ``task`` as a worker would (its arguments through JSON)."""
    for call in delay.call_args_list:
        task.apply(args=call.args).get()


def page_of(client: Client, sandbox: Sandbox) -> str:
    response = client.get(reverse("admin:sandboxes_sandbox_change", args=[sandbox.pk]))
    assert response.status_code == 200
    return response.content.decode()


# -- the page -----------------------------------------------------------------------------------


def test_it_shows_what_runs_inside_a_sandbox_with_secrets_redacted(
    client: Client, staff: Any, fake: FakeBackend, current: RuntimeImage
) -> None:
    sandbox = running("alice@example.com")
    fake.use(sandbox.slug, cpu_seconds=12.5, memory_bytes=700 * 2**20)
    fake.write_log(
        sandbox.slug,
        "gateway listening on 18789\n"
        f"connect token={sandbox.gateway_token}\n"
        "upstream said: Authorization: Bearer sk-ant-api03-abcdefghijklmnopqrstuvwx\n"
        "heartbeat ok",
    )
    UsageRecord.objects.create(
        user=sandbox.owner, sandbox=sandbox, api="openai", model="gpt-test",
        input_tokens=1200, output_tokens=345, cost=Decimal("0.0123"),
    )  # fmt: skip
    snapshot = Snapshot.objects.create(
        sandbox=sandbox, restic_id="ab12cd34" + "0" * 56, taken_at=timezone.now(), size_bytes=10
    )
    client.force_login(staff)
    page = page_of(client, sandbox)
    assert "running" in page and "alice@example.com" in page
    assert "Free" in page  # the plan
    assert "host-a.test (fake backend)" in page
    assert "openclaw 2026.11.1 / node 24.0.0 (current)" in page
    assert "Memory 700.0\xa0MB of 1.5\xa0GB" in page
    assert "CPU 0.0% now (12.5 s in all)" in page
    assert "openclaw gateway" in page  # the process list
    assert "gateway listening on 18789" in page and "heartbeat ok" in page
    assert sandbox.gateway_token not in page
    assert "sk-ant-api03-abcdefghijklmnopqrstuvwx" not in page
    assert "Bearer [REDACTED]" in page
    assert "1,545 tokens (1,200 in, 345 out) · USD 0.0123 · 1 calls" in page
    assert snapshot.short_id in page  # the last snapshot
    assert "Your agent is running" in page  # the events timeline


def test_it_says_why_it_cannot_measure_a_sandbox(
    client: Client, staff: Any, fake: FakeBackend, current: RuntimeImage
) -> None:
    sandbox = running("alice@example.com")
    fake.fail_next(sandbox.slug, "stats")
    client.force_login(staff)
    assert "The backend could not report: stats of sbx-" in page_of(client, sandbox)
    assert "The gateway did not answer: cannot reach the gateway" in page_of(client, sandbox)
    actions.stop_sandbox(sandbox)
    page = page_of(client, sandbox)
    assert "Not running (stopped): nothing to measure." in page
    assert "The agent is stopped: devices are read from its gateway." in page


def test_it_shows_a_backend_that_hangs_as_a_timeout(
    client: Client, staff: Any, fake: FakeBackend, current: RuntimeImage
) -> None:
    sandbox = running("alice@example.com")
    client.force_login(staff)
    slow = mock.patch.object(FakeBackend, "processes", side_effect=lambda *args: time.sleep(2))
    with slow, mock.patch("sandboxes.staff.LOOK_TIMEOUT", 0.3):
        started = timezone.now()
        page = page_of(client, sandbox)
    assert "The backend did not answer within 0.3 s." in page
    assert timezone.now() - started < timedelta(seconds=1.5)


# -- actions ------------------------------------------------------------------------------------


def assert_requested(sandbox: Sandbox, staff: Any, what: str) -> None:
    event = sandbox.events.filter(kind="staff").first()
    assert event is not None
    assert (event.actor, event.actor_user, event.message) == (
        SandboxEvent.Actor.STAFF,
        staff,
        f"Staff requested {what}",
    )


def test_it_stops_starts_and_restarts_sandboxes(
    client: Client, staff: Any, fake: FakeBackend, current: RuntimeImage
) -> None:
    both = [running("alice@example.com"), running("bob@example.com")]
    client.force_login(staff)
    for action, task, after in (
        ("stop", tasks.stop_sandbox, State.STOPPED),
        ("start", tasks.start_sandbox, State.RUNNING),
        ("restart", tasks.restart_sandbox, State.RUNNING),
    ):
        with mock.patch.object(task, "delay") as delay:
            page = post_action(client, action, both)
        assert f"Requested {action} for 2 sandbox(es)." in page
        assert sorted(c.args for c in delay.call_args_list) == sorted((s.pk,) for s in both)
        for sandbox in both:
            assert_requested(sandbox, staff, action)
        run_queued(delay, task)
        for sandbox in both:
            sandbox.refresh_from_db()
            assert sandbox.state == after
    assert [m for m, name in fake.calls if name == both[0].slug].count("start") == 3


def test_it_puts_sandboxes_to_sleep_and_wakes_them_recording_the_result(
    client: Client, staff: Any, fake: FakeBackend, current: RuntimeImage
) -> None:
    alices, bobs = running("alice@example.com"), running("bob@example.com")
    actions.stop_sandbox(bobs)
    client.force_login(staff)
    with mock.patch.object(tasks.sleep_sandbox, "delay") as delay:
        assert "Requested sleep for 2 sandbox(es)." in post_action(client, "sleep", [alices, bobs])
    assert sorted(c.args for c in delay.call_args_list) == sorted(
        [(alices.pk, staff.pk), (bobs.pk, staff.pk)]
    )
    run_queued(delay, tasks.sleep_sandbox)
    alices.refresh_from_db()
    assert alices.state == State.SLEEPING
    result = alices.events.get(kind="staff-result")
    assert (result.actor_user, result.message) == (staff, "Sleep: asleep, checkpointed")
    assert bobs.events.get(kind="staff-result").message == "Sleep: nothing to do, it is stopped"
    assert_requested(alices, staff, "sleep")

    with mock.patch.object(tasks.wake_sandbox, "delay") as delay:
        post_action(client, "wake", [alices, bobs])
    run_queued(delay, tasks.wake_sandbox)
    for sandbox in (alices, bobs):
        sandbox.refresh_from_db()
        assert sandbox.state == State.RUNNING
        assert sandbox.events.filter(kind="staff-result").first().message == "Wake: running"  # type: ignore[union-attr]
        assert_requested(sandbox, staff, "wake")
    assert alices.events.filter(kind="state", actor="staff", actor_user=staff).exists()


def test_it_records_a_failed_wake(
    client: Client, staff: Any, fake: FakeBackend, current: RuntimeImage
) -> None:
    sandbox = running("alice@example.com")
    actions.stop_sandbox(sandbox)
    fake.fail_next(sandbox.slug, "start", times=5)
    client.force_login(staff)
    with mock.patch.object(tasks.wake_sandbox, "delay") as delay:
        post_action(client, "wake", [sandbox])
    run_queued(delay, tasks.wake_sandbox)
    result = sandbox.events.get(kind="staff-result")
    assert result.message.startswith("Wake failed: start of sbx-")
    assert "failed" in page_of(client, sandbox)


def test_it_moves_sandboxes_to_a_runtime_version_and_back(
    client: Client, staff: Any, fake: FakeBackend, current: RuntimeImage, tmp_path: Path
) -> None:
    older = make_image(tmp_path, "2026.10.1")
    alices, bobs = running("alice@example.com"), running("bob@example.com")
    actions.stop_sandbox(bobs)
    client.force_login(staff)
    with mock.patch.object(tasks.move_sandbox, "delay") as delay:
        page = post_action(client, "move_to_runtime", [alices, bobs])
        assert 'id="move-form"' in page and "openclaw 2026.10.1" in page
        assert not delay.called and not alices.events.filter(kind="staff").exists()
        post_action(client, "move_to_runtime", [alices, bobs], apply="yes", runtime=older.pk)
    assert sorted(c.args for c in delay.call_args_list) == sorted(
        [(alices.pk, older.pk, staff.pk), (bobs.pk, older.pk, staff.pk)]
    )
    assert_requested(alices, staff, f"a move to {older}")
    run_queued(delay, tasks.move_sandbox)
    alices.refresh_from_db()
    bobs.refresh_from_db()
    assert (alices.state, alices.runtime, alices.runtime_pinned) == (State.RUNNING, older, True)
    assert alices.events.get(kind="staff-result").message == f"Move to {older}: running on it"
    assert (bobs.state, bobs.runtime_pinned) == (State.STOPPED, True)
    assert "pinned; it starts on it next time" in bobs.events.get(kind="staff-result").message
    for _ in actions.start_sandbox(bobs):  # a pinned sandbox starts on its own runtime
        pass
    bobs.refresh_from_db()
    assert bobs.runtime == older
    assert "pinned by staff" in page_of(client, bobs)

    with mock.patch.object(tasks.move_sandbox, "delay") as delay:
        post_action(client, "move_to_runtime", [alices], apply="yes", runtime=current.pk)
    run_queued(delay, tasks.move_sandbox)
    alices.refresh_from_db()
    assert (alices.state, alices.runtime, alices.runtime_pinned) == (State.RUNNING, current, False)


def test_it_shows_each_sandboxs_latest_staff_action_on_the_list(
    client: Client, staff: Any, fake: FakeBackend, current: RuntimeImage
) -> None:
    sandbox = running("alice@example.com")
    client.force_login(staff)
    with mock.patch.object(tasks.stop_sandbox, "delay") as delay:
        post_action(client, "stop", [sandbox])
    listing = client.get(reverse(CHANGELIST)).content.decode()
    assert "stop (" in listing and ") → queued" in listing
    run_queued(delay, tasks.stop_sandbox)
    listing = client.get(reverse(CHANGELIST)).content.decode()
    assert ") → Stopped" in listing


def test_it_runs_the_new_actions_only_for_staff_who_may_operate(
    client: Client, fake: FakeBackend, current: RuntimeImage
) -> None:
    sandbox = running("alice@example.com")
    viewer = make_user("viewer@example.com", is_staff=True)
    viewer.user_permissions.set(Permission.objects.filter(codename="view_sandbox"))
    enroll_totp(viewer)
    client.force_login(viewer)
    listing = client.get(reverse(CHANGELIST)).content.decode()
    for action in ("sleep", "wake", "move_to_runtime"):
        assert f'value="{action}"' not in listing
    with mock.patch.object(tasks.sleep_sandbox, "delay") as delay:
        post_action(client, "sleep", [sandbox])
    assert not delay.called
    approve = reverse("admin:sandboxes_sandbox_device", args=[sandbox.pk, "approve"])
    assert client.post(approve, {"request_id": "abc"}).status_code == 403
    assert not sandbox.events.filter(actor="staff").exists()
    assert bootqueue.host_name() == "host-a.test"


def test_it_shows_the_last_weeks_events_on_the_page(
    client: Client, staff: Any, fake: FakeBackend, current: RuntimeImage
) -> None:
    sandbox = running("alice@example.com")
    SandboxEvent.objects.create(
        sandbox=sandbox, kind="note", message="an old step",
        created_at=timezone.now() - timedelta(days=8),
    )  # fmt: skip
    SandboxEvent.objects.create(sandbox=sandbox, kind="note", message="a recent step")
    client.force_login(staff)
    page = page_of(client, sandbox)
    assert "a recent step" in page and "an old step" not in page
    events = client.get(reverse("admin:sandboxes_sandboxevent_changelist")).content.decode()
    assert "an old step" in events
