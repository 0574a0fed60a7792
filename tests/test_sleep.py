"""The sleep schedule: free sandboxes idle past their plan's limit sleep; pro ones never do."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import time_machine
from django.utils import timezone

from billing.models import Account, Plan
from sandboxes import actions, tasks
from sandboxes.models import Sandbox

pytestmark = pytest.mark.django_db
State = Sandbox.State


def _running(user: Any) -> Sandbox:
    sandbox = Sandbox.objects.get(owner=user)
    Sandbox.objects.filter(pk=sandbox.pk).update(
        state=State.RUNNING, last_activity_at=timezone.now()
    )
    sandbox.refresh_from_db()
    return sandbox


def test_it_sleeps_idle_free_sandboxes_only(alice: Any, bob: Any) -> None:
    Account.objects.filter(user=bob).update(plan=Plan.objects.get(slug="pro"))
    free, pro = _running(alice), _running(bob)
    with time_machine.travel(timezone.now() + timedelta(minutes=14)):
        assert tasks.sleep_idle_sandboxes()["hibernated"] == 0
    with time_machine.travel(timezone.now() + timedelta(minutes=16)):
        assert tasks.sleep_idle_sandboxes()["hibernated"] == 1
        assert tasks.sleep_idle_sandboxes()["hibernated"] == 0  # idempotent
    free.refresh_from_db()
    pro.refresh_from_db()
    assert (free.state, pro.state) == (State.SLEEPING, State.RUNNING)
    messages = list(free.events.values_list("message", flat=True)[:2])
    assert messages == ["Asleep", "Idle: hibernating"]


def test_activity_postpones_sleep(alice: Any) -> None:
    sandbox = _running(alice)
    with time_machine.travel(timezone.now() + timedelta(minutes=10)):
        actions.record_activity(sandbox)
    with time_machine.travel(timezone.now() + timedelta(minutes=20)):
        assert tasks.sleep_idle_sandboxes()["hibernated"] == 0
    with time_machine.travel(timezone.now() + timedelta(minutes=26)):
        assert tasks.sleep_idle_sandboxes()["hibernated"] == 1


def test_it_never_sleeps_a_sandbox_on_an_always_on_plan_with_a_sleep_time_set(alice: Any) -> None:
    """An always-on plan made in the admin keeps the form's 15-minute sleep_after."""
    always_on = Plan.objects.create(slug="always-on", name="Always on", sleeps=False)
    assert always_on.sleep_after == timedelta(minutes=15)
    Account.objects.filter(user=alice).update(plan=always_on)
    sandbox = _running(alice)
    with time_machine.travel(timezone.now() + timedelta(hours=6)):
        assert tasks.sleep_idle_sandboxes() == {
            "dozed": 0,
            "hibernated": 0,
            "woke": 0,
            "pressure": 0,
            "swept": 0,
        }
    sandbox.refresh_from_db()
    assert sandbox.state == State.RUNNING
