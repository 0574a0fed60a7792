"""The fleet overview on the admin's index: sandboxes by state, RAM in use against the host's,
failed and stuck sandboxes with their last error, and the last day's wake and start durations
as an SVG chart; each part links to the filtered sandbox list."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import time_machine
from django.contrib.auth.models import Group
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from metering.models import UsageSample
from portal import fleet
from sandboxes.models import Sandbox, SandboxEvent
from tests.factories import make_user
from tests.mfa import enroll_totp

pytestmark = pytest.mark.django_db
State = Sandbox.State
NOW = timezone.now().replace(microsecond=0)


def sandbox_in(email: str, state: str, **fields: Any) -> Sandbox:
    sandbox = Sandbox.objects.get(owner=make_user(email))
    Sandbox.objects.filter(pk=sandbox.pk).update(state=state, **fields)
    sandbox.refresh_from_db()
    return sandbox


def state_events(sandbox: Sandbox, *steps: tuple[str, float]) -> None:
    """Record state events: (state, seconds before NOW)."""
    for state, ago in steps:
        SandboxEvent.objects.create(
            sandbox=sandbox, kind="state", state=state, created_at=NOW - timedelta(seconds=ago)
        )


def sample(sandbox: Sandbox, memory: int, ago: int = 30) -> None:
    UsageSample.objects.create(
        sandbox=sandbox, user=sandbox.owner, interval_start=NOW - timedelta(seconds=ago),
        seconds=60, cpu_counter=1.0, cpu_ms=10, memory_bytes=memory,
    )  # fmt: skip


def index(client: Client) -> str:
    response = client.get(reverse("admin:index"))
    assert response.status_code == 200
    return response.content.decode()


def test_it_counts_sandboxes_by_state_with_links(client: Client, staff: Any) -> None:
    sandbox_in("a@example.com", State.RUNNING)
    sandbox_in("b@example.com", State.RUNNING)
    sandbox_in("c@example.com", State.SLEEPING)
    client.force_login(staff)
    page = index(client)
    url = reverse("admin:sandboxes_sandbox_changelist")
    assert f'href="{url}?state=running">2 running</a>' in page
    assert f'href="{url}?state=sleeping">1 sleeping</a>' in page
    assert f">{Sandbox.objects.count()} sandboxes</a>" in page  # the staff member's own too


def test_it_adds_up_ram_in_use_from_the_latest_samples(client: Client, staff: Any) -> None:
    one = sandbox_in("a@example.com", State.RUNNING)
    two = sandbox_in("b@example.com", State.DOZING)
    sandbox_in("c@example.com", State.RUNNING)  # not sampled yet
    asleep = sandbox_in("d@example.com", State.SLEEPING)
    sample(one, 300 * 2**20, ago=90)  # an older sample of the same sandbox
    sample(one, 500 * 2**20)
    sample(two, 400 * 2**20)
    sample(asleep, 999 * 2**20)  # asleep now: holds no RAM
    with time_machine.travel(NOW, tick=False):
        overview = fleet.overview()
    assert (overview.ram_used, overview.not_sampled) == (900 * 2**20, 1)
    assert overview.ram_total == fleet.host_memory_bytes() > 0
    client.force_login(staff)
    with time_machine.travel(NOW, tick=False):
        page = index(client)
    assert "<strong>900.0\xa0MB</strong> of the host" in page
    assert "1 awake not sampled yet" in page


def test_it_lists_failed_and_stuck_sandboxes_with_their_last_error(
    client: Client, staff: Any
) -> None:
    broken = sandbox_in(
        "a@example.com", State.FAILED, error_message="The gateway ran out of memory."
    )
    stuck = sandbox_in("b@example.com", State.STARTING)
    busy = sandbox_in("c@example.com", State.STARTING)
    SandboxEvent.objects.create(
        sandbox=stuck, kind="progress", message="Starting the agent gateway"
    )
    later = timezone.now() + fleet.stuck_after() + timedelta(seconds=5)
    client.force_login(staff)
    with time_machine.travel(later, tick=False):
        SandboxEvent.objects.create(sandbox=busy, kind="progress", message="2 ahead of you")
        page = index(client)
    assert reverse("admin:sandboxes_sandbox_change", args=[broken.pk]) in page
    assert "The gateway ran out of memory." in page
    assert "starting since" in page and "last step: Starting the agent gateway" in page
    assert reverse("admin:sandboxes_sandbox_change", args=[stuck.pk]) in page
    assert reverse("admin:sandboxes_sandbox_change", args=[busy.pk]) not in page
    assert "?state=failed" in page


def test_it_charts_the_last_days_wakes_and_starts(client: Client, staff: Any) -> None:
    woken = sandbox_in("a@example.com", State.RUNNING)
    started = sandbox_in("b@example.com", State.RUNNING)
    old = sandbox_in("c@example.com", State.RUNNING)
    state_events(woken, ("running", 3600), ("stopping", 3000), ("sleeping", 2990),
                 ("starting", 601.5), ("running", 600))  # fmt: skip
    state_events(started, ("stopped", 7200), ("starting", 320), ("running", 300),
                 ("stopping", 200), ("stopped", 190),
                 ("starting", 110), ("running", 100))  # fmt: skip
    state_events(old, ("sleeping", 90000), ("starting", 88000), ("running", 87990))
    with time_machine.travel(NOW, tick=False):
        wakes, starts = fleet.durations(timezone.now())
    assert [s for _, s in wakes.points] == [1.5]
    assert [s for _, s in starts.points] == [20.0, 10.0]
    client.force_login(staff)
    with time_machine.travel(NOW, tick=False):
        page = index(client)
    assert "Wakes from sleep: 1, median 1.5 s, slowest 1.5 s" in page
    assert "starts: 2, median 15.0 s, slowest 20.0 s" in page
    assert page.count('class="dot-wake"') == 1 and page.count('class="dot-start"') == 2
    assert 'id="fleet-chart"' in page and "start of 20.0 s at" in page


def test_it_shows_the_fleet_only_to_staff_who_may_view_sandboxes(client: Client) -> None:
    clerk = make_user("clerk@example.com", is_staff=True)
    enroll_totp(clerk)
    client.force_login(clerk)
    assert 'id="fleet"' not in index(client)
    clerk.groups.add(Group.objects.get(name="support"))
    assert 'id="fleet"' in index(client)
