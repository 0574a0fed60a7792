"""Metering a real gateway on the local backend (the session's pooled alice@chat.test): its
cgroup's counters read as metering assumes, CPU cumulative within one start and memory the
gateway's own. The rest of metering is tested on the in-memory backend (test_metering.py)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import time_machine

from metering import sampling
from metering.models import DailyUsage, UsageSample
from sandboxes import actions
from sandboxes.backends import get_backend

pytestmark = pytest.mark.django_db(transaction=True)
T0 = datetime(2026, 11, 10, 12, 0, 5, tzinfo=UTC)


def test_it_meters_a_real_gateway(sandbox_for: Callable[..., Any], settings: Any) -> None:
    settings.HERMIT_METERING_INTERVAL = 60
    sandbox = sandbox_for("alice@chat.test")
    backend = get_backend(sandbox.backend)
    spec = actions.spec_for(sandbox)
    assert backend.stats(spec, sandbox.backend_state).disk_bytes > 0
    first = backend.stats(spec, sandbox.backend_state, disk=False)
    assert first.disk_bytes == 0  # metering's reads never walk the data dir
    with time_machine.travel(T0, tick=False):
        assert sampling.meter_interval() >= 1
    with time_machine.travel(T0 + timedelta(seconds=60), tick=False):
        assert sampling.meter_interval() >= 1
    one, two = UsageSample.objects.filter(sandbox=sandbox).order_by("interval_start")
    assert one.cpu_counter >= first.cpu_seconds > 0
    assert 0 <= two.cpu_ms == round((two.cpu_counter - one.cpu_counter) * 1000)
    assert one.cpu_ms >= round(first.cpu_seconds * 1000)  # a new counter: counted whole
    assert 50 * 2**20 < two.memory_bytes <= first.memory_limit_bytes
    usage = DailyUsage.objects.get(user=sandbox.owner, day=T0.date())
    assert usage.awake_seconds == 120
    assert usage.memory_byte_seconds == 60 * (one.memory_bytes + two.memory_bytes)
