"""The fleet at a glance, for the admin's index: sandboxes by state, RAM in use against the
host's total, the failed and stuck ones with their last error, and the last day's wake and
start durations as a small server-rendered SVG chart.

Everything comes from the database, so the page costs a few queries whatever the fleet's size
and never waits for a backend: RAM in use is the sum of each awake sandbox's latest metering
sample (metering.sampling, one an interval; a sandbox not sampled in the last two intervals is
counted as "not sampled yet"); durations are read from the sandboxes' state events (from
"starting" to "running": a *wake* when the sandbox was asleep before, else a *start*; thawing a
dozing agent takes milliseconds and is not counted). "Stuck" is starting or stopping with no
progress for sandboxes.actions.stuck_after().
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Count, OuterRef, Subquery
from django.urls import reverse
from django.utils import timezone
from django.utils.http import urlencode

from metering.models import UsageSample
from sandboxes.actions import stuck_after
from sandboxes.models import Sandbox, SandboxEvent

State = Sandbox.State
AWAKE = (State.RUNNING, State.DOZING)
ASLEEP = (State.SLEEPING, State.DOZING)
CHART_WIDTH, CHART_HEIGHT, CHART_PAD = 480, 140, 28
LIST_LIMIT = 20


@dataclass
class Trouble:
    sandbox: Sandbox
    why: str
    since: datetime
    url: str


@dataclass
class Series:
    name: str
    points: list[tuple[datetime, float]] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return statistics.median(s for _, s in self.points) if self.points else None

    @property
    def worst(self) -> float | None:
        return max(s for _, s in self.points) if self.points else None


@dataclass
class Fleet:
    by_state: list[tuple[str, int, str]]  # state, count, filtered changelist URL (count > 0)
    total: int
    ram_used: int
    ram_total: int
    not_sampled: int
    failed: list[Trouble]
    stuck: list[Trouble]
    wakes: Series
    starts: Series
    chart: dict[str, Any]
    changelist: str

    @property
    def ram_percent(self) -> int:
        return min(100, round(self.ram_used * 100 / self.ram_total)) if self.ram_total else 0


def _changelist(**filters: str) -> str:
    url = reverse("admin:sandboxes_sandbox_changelist")
    return f"{url}?{urlencode(filters)}" if filters else url


def host_memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _ram_in_use(now: datetime) -> tuple[int, int]:
    """Return (bytes used by awake sandboxes at their latest sample, awake ones not sampled)."""
    recent = now - timedelta(seconds=2 * settings.HERMIT_METERING_INTERVAL)
    latest = UsageSample.objects.filter(sandbox=OuterRef("pk"), interval_start__gte=recent)
    awake = Sandbox.objects.filter(state__in=AWAKE).annotate(
        memory=Subquery(latest.order_by("-interval_start").values("memory_bytes")[:1])
    )
    used, missing = 0, 0
    for memory in awake.values_list("memory", flat=True):
        if memory is None:
            missing += 1
        else:
            used += memory
    return used, missing


def _troubles(now: datetime) -> tuple[list[Trouble], list[Trouble]]:
    events = SandboxEvent.objects.filter(sandbox=OuterRef("pk")).order_by("-created_at", "-id")
    rows = Sandbox.objects.select_related("owner").annotate(
        last_message=Subquery(events.values("message")[:1]),
        last_at=Subquery(events.values("created_at")[:1]),
    )
    failed = [
        Trouble(s, s.error_message or s.last_message or "", s.updated_at, _page(s))
        for s in rows.filter(state=State.FAILED).order_by("-updated_at")[:LIST_LIMIT]
    ]
    quiet_since = now - stuck_after()
    stuck: list[Trouble] = []
    for one in rows.filter(state__in=(State.STARTING, State.STOPPING)).order_by("updated_at"):
        last_step: str = one.last_message or "none"
        last = max(one.updated_at, one.last_at or one.updated_at)
        if last < quiet_since and len(stuck) < LIST_LIMIT:
            why = f"{one.state} since {one.updated_at:%H:%M} UTC; last step: {last_step}"
            stuck.append(Trouble(one, why, last, _page(one)))
    return failed, stuck


def _page(sandbox: Sandbox) -> str:
    return reverse("admin:sandboxes_sandbox_change", args=[sandbox.pk])


def durations(now: datetime) -> tuple[Series, Series]:
    """Return the wakes and starts that ended in the last day (see the module docstring)."""
    since = now - timedelta(days=1)
    rows = (
        SandboxEvent.objects.filter(kind="state", created_at__gte=since - timedelta(hours=1))
        .order_by("sandbox_id", "created_at", "id")
        .values_list("sandbox_id", "state", "created_at")
    )
    wakes, starts = Series("wake"), Series("start")
    current, before, began, woke = None, "", None, False
    for sandbox_id, state, at in rows.iterator():
        if sandbox_id != current:
            current, before, began = sandbox_id, "", None
        if state == State.STARTING:
            began, woke = at, before in ASLEEP
        elif state == State.RUNNING and began is not None and at >= since:
            (wakes if woke else starts).points.append((at, (at - began).total_seconds()))
        if state != State.STARTING:
            began = None
        if state not in (State.STARTING, State.STOPPING):
            before = state
    return wakes, starts


def chart(now: datetime, *series: Series) -> dict[str, Any]:
    """Lay the series out as SVG circles: x is the time of day (the last 24 h), y the seconds."""
    top = max([s.worst or 0 for s in series] + [1.0])
    width, height = CHART_WIDTH - 2 * CHART_PAD, CHART_HEIGHT - 2 * CHART_PAD
    since = now - timedelta(days=1)
    plotted = []
    for one in series:
        dots = [
            {
                "x": round(CHART_PAD + (at - since).total_seconds() / 86400 * width, 1),
                "y": round(CHART_PAD + height - seconds / top * height, 1),
                "title": f"{one.name} of {seconds:.1f} s at {at:%H:%M} UTC",
            }
            for at, seconds in one.points
        ]
        plotted.append({"name": one.name, "dots": dots})
    return {
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "pad": CHART_PAD,
        "bottom": CHART_HEIGHT - CHART_PAD,
        "right": CHART_WIDTH - CHART_PAD,
        "top_label": f"{top:.1f} s",
        "series": plotted,
    }


def overview(now: datetime | None = None) -> Fleet:
    """Return the fleet overview at ``now`` (default: now)."""
    now = now or timezone.now()
    counts = dict(Sandbox.objects.values_list("state").annotate(n=Count("id")))
    by_state = [
        (state, counts[state], _changelist(state=state))
        for state in State.values
        if state in counts
    ]
    used, missing = _ram_in_use(now)
    failed, stuck = _troubles(now)
    wakes, starts = durations(now)
    return Fleet(
        by_state=by_state,
        total=sum(counts.values()),
        ram_used=used,
        ram_total=host_memory_bytes(),
        not_sampled=missing,
        failed=failed,
        stuck=stuck,
        wakes=wakes,
        starts=starts,
        chart=chart(now, wakes, starts),
        changelist=_changelist(),
    )
