"""Metering on the in-memory backend, with frozen time: one row per sandbox per interval, CPU
from a cumulative counter (restarts included), memory while running or dozing, nothing while
asleep, backup storage once a day, and a sandbox whose stats fail skipped alone."""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
import time_machine
from django.contrib.auth import get_user_model
from django.db import connection

from billing.models import Plan
from metering import sampling, tasks
from metering.models import DailyUsage, StorageSample, UsageSample
from sandboxes import actions, sleep
from sandboxes.backends.fake import FakeBackend
from sandboxes.models import Sandbox, Snapshot
from tests.factories import make_user
from tests.fixtures.metering import make_running

pytestmark = pytest.mark.django_db
State = Sandbox.State
GIB = 2**30
T0 = datetime(2026, 11, 10, 12, 0, 5, tzinfo=UTC)  # 5 s into an interval


@pytest.fixture
def fake(fake_backend: FakeBackend, settings: Any) -> FakeBackend:
    settings.HERMIT_METERING_INTERVAL = 60
    return fake_backend


def meter_at(moment: datetime) -> int:
    with time_machine.travel(moment, tick=False):
        return int(tasks.meter_usage()["samples"])


def day_of(user: Any, day: date | None = None) -> DailyUsage:
    return DailyUsage.objects.get(user=user, day=day or T0.date())


def test_it_writes_one_row_per_sandbox_per_interval(fake: FakeBackend) -> None:
    with time_machine.travel(T0 - timedelta(minutes=5), tick=False):
        sandbox = make_running("one@example.com")
    fake.use(sandbox.slug, cpu_seconds=5, memory_bytes=GIB)
    assert meter_at(T0) == 1
    fake.use(sandbox.slug, cpu_seconds=7)
    assert meter_at(T0 + timedelta(seconds=50)) == 0  # the same interval: nothing changes
    rows = list(UsageSample.objects.filter(sandbox=sandbox))
    assert [(r.interval_start, r.seconds, r.cpu_ms, r.memory_bytes) for r in rows] == [
        (datetime(2026, 11, 10, 12, 0, tzinfo=UTC), 60, 5000, GIB)
    ]
    usage = day_of(sandbox.owner)
    assert (usage.cpu_ms, usage.memory_byte_seconds, usage.awake_seconds) == (5000, GIB * 60, 60)
    assert usage.plan == Plan.objects.get(slug="free")

    assert meter_at(T0 + timedelta(seconds=60)) == 1  # the next interval counts the growth
    usage.refresh_from_db()
    assert (usage.cpu_ms, usage.memory_byte_seconds, usage.awake_seconds) == (
        12000,
        GIB * 120,
        120,
    )


def test_it_counts_the_whole_counter_after_a_restart(fake: FakeBackend) -> None:
    with time_machine.travel(T0 - timedelta(minutes=5), tick=False):
        sandbox = make_running("restart@example.com")
    fake.use(sandbox.slug, cpu_seconds=30)
    meter_at(T0)
    with time_machine.travel(T0 + timedelta(seconds=20), tick=False):
        for _ in actions.restart_sandbox(sandbox):
            pass
    fake.use(sandbox.slug, cpu_seconds=40)  # a new counter, already past the old one
    meter_at(T0 + timedelta(seconds=60))
    fake.use(sandbox.slug, cpu_seconds=2.5)
    meter_at(T0 + timedelta(seconds=120))
    counted = UsageSample.objects.filter(sandbox=sandbox).order_by("interval_start")
    assert [s.cpu_ms for s in counted] == [30000, 40000, 2500]
    assert day_of(sandbox.owner).cpu_ms == 72500


def test_it_counts_a_counter_that_went_down_as_new() -> None:
    since = T0
    assert sampling.counted_cpu(12.0, since, 10.0, since) == 2.0
    assert sampling.counted_cpu(3.0, since, 10.0, since) == 3.0  # reset unseen: count it all
    assert sampling.counted_cpu(3.0, since, None, None) == 3.0
    assert sampling.counted_cpu(30.0, since + timedelta(1), 10.0, since) == 30.0


def test_it_counts_memory_but_no_cpu_while_dozing(fake: FakeBackend) -> None:
    with time_machine.travel(T0 - timedelta(minutes=5), tick=False):
        sandbox = make_running("dozing@example.com")
    fake.use(sandbox.slug, cpu_seconds=3, memory_bytes=GIB // 2)
    meter_at(T0)
    assert sleep.doze(sandbox)
    fake.use(sandbox.slug, cpu_seconds=50)  # frozen: its counter stands still
    meter_at(T0 + timedelta(seconds=60))
    meter_at(T0 + timedelta(seconds=120))
    samples = UsageSample.objects.filter(sandbox=sandbox).order_by("interval_start")
    assert [(s.dozing, s.cpu_ms, s.memory_bytes) for s in samples] == [
        (False, 3000, GIB // 2),
        (True, 0, GIB // 2),
        (True, 0, GIB // 2),
    ]
    usage = day_of(sandbox.owner)
    assert (usage.awake_seconds, usage.dozing_seconds) == (60, 120)
    assert usage.memory_byte_seconds == GIB // 2 * 180


def test_it_counts_nothing_while_asleep(fake: FakeBackend) -> None:
    with time_machine.travel(T0 - timedelta(minutes=5), tick=False):
        sandbox = make_running("asleep@example.com")
    assert actions.sleep_sandbox(sandbox)
    sandbox.refresh_from_db()
    assert sandbox.state == State.SLEEPING
    assert meter_at(T0) == 0
    assert not UsageSample.objects.exists() and not DailyUsage.objects.exists()


def test_it_meters_the_others_when_one_sandboxs_stats_fail(fake: FakeBackend) -> None:
    with time_machine.travel(T0 - timedelta(minutes=5), tick=False):
        broken, fine = make_running("broken@example.com"), make_running("fine@example.com")
    fake.use(broken.slug, cpu_seconds=4)
    fake.use(fine.slug, cpu_seconds=6)
    fake.fail_next(broken.slug, "stats")
    assert meter_at(T0) == 1
    assert list(UsageSample.objects.values_list("sandbox_id", flat=True)) == [fine.pk]
    assert meter_at(T0 + timedelta(seconds=60)) == 2  # back next interval, nothing lost
    assert day_of(broken.owner).cpu_ms == 4000
    assert day_of(fine.owner).cpu_ms == 6000


def test_it_keeps_usage_with_whoever_owned_the_sandbox(fake: FakeBackend) -> None:
    with time_machine.travel(T0 - timedelta(minutes=5), tick=False):
        sandbox = make_running("first@example.com")
    first = sandbox.owner
    second = make_user("second@example.com")
    Sandbox.objects.filter(owner=second).delete()
    fake.use(sandbox.slug, cpu_seconds=8)
    meter_at(T0)
    Sandbox.objects.filter(pk=sandbox.pk).update(owner=second)  # as a warm-pool adoption does
    fake.use(sandbox.slug, cpu_seconds=1)
    meter_at(T0 + timedelta(seconds=60))
    assert day_of(first).cpu_ms == 8000
    assert day_of(second).cpu_ms == 1000


def test_it_samples_backup_storage_once_a_day(fake: FakeBackend) -> None:
    user = make_user("stored@example.com")
    sandbox = Sandbox.objects.get(owner=user)
    for n, added in enumerate((3 * GIB, GIB // 4)):
        Snapshot.objects.create(
            sandbox=sandbox, restic_id=f"{n:064x}", taken_at=T0, added_bytes=added
        )
    assert meter_at(T0) == 0  # asleep or not, storage is a matter of its backups
    with time_machine.travel(T0 + timedelta(hours=3), tick=False):
        assert tasks.meter_usage()["storage"] == 0  # once a day
    assert list(StorageSample.objects.values_list("day", "stored_bytes")) == [
        (T0.date(), 3 * GIB + GIB // 4)
    ]
    assert day_of(user).storage_bytes == 3 * GIB + GIB // 4
    with time_machine.travel(T0 + timedelta(days=1), tick=False):
        assert tasks.meter_usage()["storage"] == 1
    assert day_of(user, T0.date() + timedelta(days=1)).storage_bytes == 3 * GIB + GIB // 4


def test_it_prunes_old_samples_and_keeps_the_daily_totals(fake: FakeBackend, settings: Any) -> None:
    settings.HERMIT_METERING_KEEP_DAYS = 2
    with time_machine.travel(T0 - timedelta(minutes=5), tick=False):
        sandbox = make_running("old@example.com")
    fake.use(sandbox.slug, cpu_seconds=1)
    meter_at(T0)
    meter_at(T0 + timedelta(days=3))
    assert UsageSample.objects.count() == 1
    assert day_of(sandbox.owner).cpu_ms == 1000


def _awake_boxes(count: int, users: list[Any], start: int) -> None:
    Sandbox.objects.bulk_create(
        Sandbox(
            owner=users[n % len(users)],
            name=f"box-{start + n}",
            state=State.RUNNING,
            backend="fake",
            backend_state={"backend": "fake", "instance": 0},
            started_at=T0 - timedelta(hours=1),
        )
        for n in range(count)
    )


def test_it_meters_many_sandboxes_in_the_same_few_queries(fake: FakeBackend) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    users = [make_user(f"many{n}@example.com") for n in range(5)]
    _awake_boxes(10, users, 0)
    with CaptureQueriesContext(connection) as few:
        assert meter_at(T0) == 10
    _awake_boxes(290, users, 10)
    with CaptureQueriesContext(connection) as many:
        assert meter_at(T0 + timedelta(seconds=60)) == 300
    assert len(few.captured_queries) <= 13  # SQLite splits a big INSERT in a few batches:
    assert len(many.captured_queries) - len(few.captured_queries) <= 3  # none per sandbox
    assert sum(u.awake_seconds for u in DailyUsage.objects.all()) == 60 * 310


@pytest.mark.django_db(transaction=True)
def test_it_meters_an_interval_once_when_two_runs_race(
    fake: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from django.db import connection

    with time_machine.travel(T0 - timedelta(minutes=5), tick=False):
        sandbox = make_running("race@example.com")
    fake.use(sandbox.slug, cpu_seconds=9, memory_bytes=GIB)
    both_read = threading.Barrier(2, timeout=10)
    read = fake.stats

    def stats_once_both_have_looked(*args: Any, **kwargs: Any) -> Any:
        both_read.wait()  # each run is past its "already metered?" check
        return read(*args, **kwargs)

    monkeypatch.setattr(fake, "stats", stats_once_both_have_looked)
    results: list[int] = []

    def run() -> None:
        try:
            results.append(sampling.meter_interval(T0))
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert sorted(results) == [0, 1]
    assert UsageSample.objects.count() == 1
    usage = day_of(sandbox.owner)
    assert (usage.cpu_ms, usage.memory_byte_seconds) == (9000, GIB * 60)


def test_it_logs_an_interval_it_could_not_write(
    fake: FakeBackend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with time_machine.travel(T0 - timedelta(minutes=5), tick=False):
        first, second = make_running("one@example.com"), make_running("two@example.com")
    read = fake.stats
    interval = datetime(2026, 11, 10, 12, 0, tzinfo=UTC)

    def another_run_wrote_it(*args: Any, **kwargs: Any) -> Any:
        if not UsageSample.objects.exists():
            UsageSample.objects.create(
                sandbox=first, user=first.owner, interval_start=interval, seconds=60,
                cpu_counter=0, cpu_ms=0, memory_bytes=0,
            )  # fmt: skip
        return read(*args, **kwargs)

    monkeypatch.setattr(fake, "stats", another_run_wrote_it)
    caplog.set_level(logging.INFO, logger="metering.sampling")
    assert sampling.meter_interval(T0) == 0
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "metering: another run metered the interval at 2026-11-10T12:00:00+00:00 first")
    ]
    caplog.clear()

    def owner_gone(*args: Any, **kwargs: Any) -> Any:
        get_user_model().objects.filter(pk=second.owner_id).delete()
        return read(*args, **kwargs)

    monkeypatch.setattr(fake, "stats", owner_gone)
    with connection.cursor() as cursor:  # as at the commit the test's transaction never makes
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
    assert sampling.meter_interval(T0 + timedelta(seconds=60)) == 0
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert (
        caplog.records[0]
        .getMessage()
        .startswith(
            "metering: the interval at 2026-11-10T12:01:00+00:00 was not written (a later run "
            "tries again): "
        )
    )
    assert not UsageSample.objects.filter(interval_start=interval + timedelta(seconds=60)).exists()
