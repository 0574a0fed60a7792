"""Crash back-off: a gateway that keeps crashing is not restarted in a loop.

The crash is what the local backend reports for a sandbox the database says is running but
that has no gateway (an empty backend state): no real gateway is started here. Starts that are
let through end failed at once (no runtime image is built in these tests), which is enough to
tell a start that was attempted ("Starting your agent") from one that was held off.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import time_machine
from django.utils import timezone

from billing.models import Account, Plan
from sandboxes import actions, tasks
from sandboxes.backends.base import BackendError
from sandboxes.models import Sandbox, SandboxEvent

pytestmark = pytest.mark.django_db
State = Sandbox.State
MINUTE = timedelta(minutes=1)


@pytest.fixture(autouse=True)
def _backoff_settings(settings: Any) -> None:
    settings.HERMIT_CRASH_LIMIT = 3
    settings.HERMIT_CRASH_WINDOW = 600
    settings.HERMIT_CRASH_BACKOFF = 60
    settings.HERMIT_CRASH_BACKOFF_MAX = 1800


def _running(user: Any, *, uptime: timedelta = timedelta(seconds=5)) -> Sandbox:
    """The user's sandbox as the database sees it after a start ``uptime`` ago (no gateway)."""
    sandbox = Sandbox.objects.get(owner=user)
    now = timezone.now()
    Sandbox.objects.filter(pk=sandbox.pk).update(
        state=State.RUNNING, started_at=now - uptime, backend_state={}
    )
    sandbox.refresh_from_db()
    return sandbox


def _crash(user: Any, **kwargs: Any) -> Sandbox:
    sandbox = _running(user, **kwargs)
    assert actions.mark_crashed(sandbox)
    sandbox.refresh_from_db()
    return sandbox


def _starts(sandbox: Sandbox) -> int:
    return sandbox.events.filter(message="Starting your agent").count()


def test_it_backs_off_after_the_third_crash_in_a_row(alice: Any) -> None:
    with time_machine.travel(timezone.now(), tick=False):
        now = timezone.now()
        for _ in range(2):
            sandbox = _crash(alice)
            assert sandbox.restart_after is None
        sandbox = _crash(alice)
        assert sandbox.state == State.FAILED
        assert (sandbox.crash_count, sandbox.restart_after) == (3, now + MINUTE)
        assert "crashed repeatedly; it will be retried at" in sandbox.error_message
        assert f"{(now + MINUTE):%H:%M} UTC" in sandbox.error_message


def test_the_pause_doubles_and_is_capped(alice: Any) -> None:
    with time_machine.travel(timezone.now(), tick=False):
        now = timezone.now()
        pauses = []
        for _ in range(9):
            sandbox = _crash(alice)
            pauses.append(sandbox.restart_after - now if sandbox.restart_after else None)
    assert pauses == [None, None, *(m * MINUTE for m in (1, 2, 4, 8, 16, 30, 30))]


def test_a_gateway_that_ran_longer_than_the_window_starts_a_new_count(alice: Any) -> None:
    for _ in range(2):
        _crash(alice)
    sandbox = _crash(alice, uptime=timedelta(minutes=10))
    assert (sandbox.crash_count, sandbox.restart_after) == (1, None)
    crash = sandbox.events.filter(kind="crashed").first()
    assert crash is not None and "restarting it" in crash.message


def test_reconcile_does_not_restart_a_sandbox_in_back_off(alice: Any) -> None:
    Account.objects.filter(user=alice).update(plan=Plan.objects.get(slug="pro"))
    for _ in range(2):
        _crash(alice)
    sandbox = _running(alice)
    before = _starts(sandbox)
    assert actions.reconcile_sandbox(sandbox) == "backoff"
    sandbox.refresh_from_db()
    assert sandbox.state == State.FAILED and _starts(sandbox) == before
    with time_machine.travel(timezone.now() + 2 * MINUTE + timedelta(seconds=5)):
        sandbox.refresh_from_db()
        assert actions.reconcile_sandbox(sandbox) == "retried"  # the pause is over
    assert _starts(sandbox) == before + 1


def test_reconcile_holds_off_the_always_on_retry_until_the_pause_ends(alice: Any) -> None:
    Account.objects.filter(user=alice).update(plan=Plan.objects.get(slug="pro"))
    for _ in range(5):  # the fifth crash: a 4-minute pause
        sandbox = _crash(alice)
    before = _starts(sandbox)
    with time_machine.travel(timezone.now() + 3 * MINUTE):  # past FAILED_RETRY_AFTER only
        assert tasks.reconcile_sandboxes() == {"backoff": 1}
    assert _starts(sandbox) == before


def test_a_chat_wake_is_refused_with_the_retry_time(alice: Any) -> None:
    for _ in range(3):
        sandbox = _crash(alice)
    before = _starts(sandbox)
    with pytest.raises(BackendError, match="crashed repeatedly; it will be retried at"):
        for _ in actions.wake_sandbox(sandbox, actor_user=alice):
            pass
    assert _starts(sandbox) == before


def test_an_explicit_start_is_allowed_once_a_minute(alice: Any) -> None:
    for _ in range(4):  # a 2-minute pause
        sandbox = _crash(alice)
    before = _starts(sandbox)
    tasks.start_sandbox(sandbox.pk)  # the dashboard's "Try again", straight after the crash
    assert _starts(sandbox) == before
    with time_machine.travel(timezone.now() + MINUTE + timedelta(seconds=1)):
        tasks.start_sandbox(sandbox.pk)
    assert _starts(sandbox) == before + 1


def test_staff_may_restart_a_sandbox_in_back_off_after_the_pause(alice: Any) -> None:
    for _ in range(3):
        sandbox = _crash(alice)
    before = _starts(sandbox)
    with pytest.raises(actions.CrashBackoff):
        for _ in actions.restart_sandbox(sandbox, actor=SandboxEvent.Actor.STAFF):
            pass
    with time_machine.travel(timezone.now() + MINUTE + timedelta(seconds=1)):
        sandbox.refresh_from_db()
        for _ in actions.restart_sandbox(sandbox, actor=SandboxEvent.Actor.STAFF):
            pass
    assert _starts(sandbox) == before + 1
