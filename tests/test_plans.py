"""Plans: the seeded tiers, their defaults, and every new user starting on free."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from billing.models import Plan, plan_for
from sandboxes.models import Sandbox

pytestmark = pytest.mark.django_db


def test_it_seeds_free_and_pro() -> None:
    free = Plan.objects.get(slug="free")
    pro = Plan.objects.get(slug="pro")
    assert free.is_default and not pro.is_default
    assert free.sleeps and free.sleep_after == timedelta(minutes=15)
    assert free.sleeps_after() == timedelta(minutes=15)
    assert not pro.sleeps and pro.sleeps_after() is None
    assert pro.monthly_token_quota > free.monthly_token_quota > 0
    assert pro.requests_per_minute > free.requests_per_minute
    assert pro.memory_mb >= free.memory_mb and pro.cpu_millis >= free.cpu_millis


def test_it_starts_every_new_user_on_free(alice: object) -> None:
    assert plan_for(alice).slug == "free"


def test_it_honours_a_staff_chosen_default(bob: object) -> None:
    Plan.objects.update(is_default=False)
    Plan.objects.filter(slug="pro").update(is_default=True)
    from tests.factories import make_user

    assert plan_for(make_user("carol@example.com")).slug == "pro"


def test_it_sleeps_only_idle_sandboxes_on_sleeping_plans(alice: object) -> None:
    sandbox = Sandbox.objects.get(owner=alice)
    sandbox.state = Sandbox.State.RUNNING
    now = timezone.now()
    sandbox.last_activity_at = now - timedelta(minutes=16)
    free, pro = Plan.objects.get(slug="free"), Plan.objects.get(slug="pro")
    assert sandbox.is_idle(now, free.sleeps_after())
    assert not sandbox.is_idle(now, pro.sleeps_after())
    sandbox.last_activity_at = now - timedelta(minutes=14)
    assert not sandbox.is_idle(now, free.sleeps_after())


def test_an_always_on_plan_made_in_the_admin_never_sleeps(alice: object) -> None:
    """The admin's add form leaves sleep_after at its 15-minute default when "sleeps" is
    unticked: the flag alone must decide."""
    always_on = Plan.objects.create(slug="always-on", name="Always on", sleeps=False)
    assert always_on.sleep_after == timedelta(minutes=15)  # the default the form keeps
    assert always_on.sleeps_after() is None
    sandbox = Sandbox.objects.get(owner=alice)
    sandbox.state = Sandbox.State.RUNNING
    now = timezone.now()
    sandbox.last_activity_at = now - timedelta(days=2)
    assert not sandbox.is_idle(now, always_on.sleeps_after())
