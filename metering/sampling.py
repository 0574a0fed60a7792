"""Metering: read each awake sandbox's resource use once an interval, and backups once a day.

Contract of :func:`meter_interval` (run by beat, see metering.tasks):

- The interval is HERMIT_METERING_INTERVAL seconds long, aligned to the epoch; ``now`` picks it.
  Every running or dozing sandbox gets one UsageSample for it; sleeping, stopped and failed
  sandboxes cost no CPU or RAM and get none.
- CPU: the backend's counter is cumulative since the sandbox's cgroup was made, which happens
  at each start or restore (``Sandbox.started_at`` changes then; a doze and its thaw keep both).
  An interval counts the counter's growth since the sandbox's previous sample; if the counter
  has a new epoch, has no previous sample, or went down (a restart we did not see), the whole
  new value is counted. CPU a sandbox used after its last sample before a restart is not
  counted (at most one interval's worth).
- Memory: the memory read at the sample * the interval's length, while running or dozing (a
  dozing sandbox keeps its RAM; its frozen counter adds no CPU).
- Exactly once: all samples of an interval are inserted, and added to the users' DailyUsage
  rows, in one transaction. The unique (sandbox, interval) key makes a second run of the same
  interval fail as a whole and change nothing; a run that finds the interval already metered
  returns at once, before asking any backend. Beat runs the task twice an interval, so a late
  beat never skips one.
- A run that cannot write its interval (another run wrote it first, or a row conflicts, such
  as a user deleted meanwhile) writes nothing and logs it: at info for the race, as a warning
  otherwise.
- A backend that fails to report one sandbox is logged and that sandbox skips the interval;
  the others are metered. No backend is asked inside a database transaction, and none walks
  a data dir for it (``stats(disk=False)``: a real gateway's cgroup reads take well under a
  millisecond, its data dir's walk tens).

:func:`meter_storage`, once a UTC day (its first run that day), records each sandbox's backup
storage: the sum of ``added_bytes`` over the snapshots its repository still keeps, i.e. what
each kept snapshot added to the (deduplicated) repository when it was taken. It needs no restic
and no lease, and counts no deduplicated byte twice. It is an estimate of what object storage
bills: restic reports the added data before compression (reads high by the compression ratio),
and when ``forget`` drops an old snapshot whose data later ones still use, that data is no
longer counted (reads low). The same pass prunes samples older than HERMIT_METERING_KEEP_DAYS.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, OuterRef, Subquery, Sum
from django.utils import timezone

from billing.models import Account, default_plan
from metering.models import DailyUsage, StorageSample, UsageSample
from sandboxes import actions
from sandboxes.backends import get_backend
from sandboxes.models import Sandbox, Snapshot

log = logging.getLogger(__name__)
State = Sandbox.State
METERED_STATES = (State.RUNNING, State.DOZING)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def interval_start(now: datetime, seconds: int) -> datetime:
    """Return the start of the ``seconds``-long interval (aligned to the epoch) holding ``now``."""
    elapsed = int((now - EPOCH).total_seconds())
    return EPOCH + timedelta(seconds=elapsed - elapsed % seconds)


def counted_cpu(
    counter: float, since: datetime | None, prev_counter: float | None, prev_since: Any
) -> float:
    """Return the CPU seconds to count for a reading ``counter`` of a counter started at
    ``since``, given the previous reading (None if there was none)."""
    if prev_counter is None or since != prev_since or counter < prev_counter:
        return counter
    return counter - prev_counter


@dataclass
class DayTotals:
    """What to add to one user's DailyUsage row."""

    cpu_ms: int = 0
    memory_byte_seconds: int = 0
    awake_seconds: int = 0
    dozing_seconds: int = 0
    storage_bytes: int = 0

    def add(self, **amounts: int) -> None:
        for name, amount in amounts.items():
            setattr(self, name, getattr(self, name) + amount)


TOTAL_FIELDS = ("cpu_ms", "memory_byte_seconds", "awake_seconds", "dozing_seconds", "storage_bytes")


def meter_interval(now: datetime | None = None) -> int:
    """Meter the interval holding ``now`` (default: now). Return the samples written (0 when
    it was metered already or nothing is awake)."""
    seconds = int(settings.HERMIT_METERING_INTERVAL)
    start = interval_start(now or timezone.now(), seconds)
    if UsageSample.objects.filter(interval_start=start).exists():
        return 0
    samples = [s for s in map(_read, _awake_sandboxes()) if s is not None]
    for sample in samples:
        sample.interval_start, sample.seconds = start, seconds
    if not samples:
        return 0
    totals: dict[int, DayTotals] = defaultdict(DayTotals)
    for s in samples:
        key = "dozing_seconds" if s.dozing else "awake_seconds"
        totals[s.user_id].add(
            cpu_ms=s.cpu_ms, memory_byte_seconds=s.memory_bytes * seconds, **{key: seconds}
        )
    try:
        with transaction.atomic():
            UsageSample.objects.bulk_create(samples)
            add_to_day(start.astimezone(UTC).date(), totals)
    except IntegrityError as exc:
        raced = UsageSample.objects.filter(interval_start=start).exists()
        _not_written(f"the interval at {start.isoformat()}", raced, exc)
        return 0
    return len(samples)


def _not_written(what: str, raced: bool, error: IntegrityError) -> None:
    """Log that a run wrote nothing for ``what``: at info if another run wrote it first (beat
    runs the tasks twice a period, so that is expected), else as a warning with the error (a
    user deleted mid-run, say); then nothing is written and the next run tries again."""
    if raced:
        log.info("metering: another run metered %s first", what)
    else:
        log.warning("metering: %s was not written (a later run tries again): %s", what, error)


def _awake_sandboxes() -> Any:
    previous = UsageSample.objects.filter(sandbox=OuterRef("pk")).order_by("-interval_start")
    return (
        Sandbox.objects.filter(state__in=METERED_STATES)
        .annotate(
            prev_counter=Subquery(previous.values("cpu_counter")[:1]),
            prev_since=Subquery(previous.values("counter_since")[:1]),
        )
        .only("pk", "owner_id", "state", "backend", "backend_state", "started_at")
        .order_by("pk")
        .iterator(chunk_size=500)
    )


def _read(sandbox: Any) -> UsageSample | None:
    """Return an unsaved sample of ``sandbox`` (no interval yet), or None if its backend failed."""
    try:
        backend = get_backend(sandbox.backend)
        stats = backend.stats(actions.spec_for(sandbox), sandbox.backend_state, disk=False)
    except Exception:
        log.exception("metering: stats of sandbox %s failed; it skips this interval", sandbox.pk)
        return None
    cpu = counted_cpu(
        stats.cpu_seconds, sandbox.started_at, sandbox.prev_counter, sandbox.prev_since
    )
    return UsageSample(
        sandbox_id=sandbox.pk,
        user_id=sandbox.owner_id,
        dozing=sandbox.state == State.DOZING,
        cpu_counter=stats.cpu_seconds,
        counter_since=sandbox.started_at,
        cpu_ms=round(cpu * 1000),
        memory_bytes=stats.memory_bytes,
    )


def add_to_day(day: date, totals: dict[int, DayTotals]) -> None:
    """Add ``totals`` (by user id) to the users' DailyUsage rows for ``day``, creating them, and
    record each user's current plan on them. Call inside the transaction that writes the
    samples the totals come from. Each row is changed by one ``col = col + n`` UPDATE, so runs
    for other intervals at the same time add up correctly."""
    users = list(totals)
    plans = dict(Account.objects.filter(user_id__in=users).values_list("user_id", "plan_id"))
    fallback = default_plan().pk if len(plans) < len(users) else None
    DailyUsage.objects.bulk_create(
        [DailyUsage(user_id=u, day=day) for u in users], ignore_conflicts=True
    )
    rows = list(DailyUsage.objects.filter(user_id__in=users, day=day).only("pk", "user_id"))
    for row in rows:
        add = totals[row.user_id]
        for name in TOTAL_FIELDS:
            setattr(row, name, F(name) + getattr(add, name))
        row.plan_id = plans.get(row.user_id, fallback)
    DailyUsage.objects.bulk_update(rows, [*TOTAL_FIELDS, "plan"], batch_size=500)


def meter_storage(now: datetime | None = None) -> int:
    """Record each sandbox's backup storage for the UTC day holding ``now``, once a day, and
    prune old samples. Return the samples written (0 when the day was done already)."""
    now = now or timezone.now()
    day = now.astimezone(UTC).date()
    if StorageSample.objects.filter(day=day).exists():
        return 0
    _prune(now)
    stored = (
        Snapshot.objects.values("sandbox_id", "sandbox__owner_id")
        .annotate(stored=Sum("added_bytes"))
        .order_by("sandbox_id")
    )
    samples = [
        StorageSample(
            sandbox_id=row["sandbox_id"],
            user_id=row["sandbox__owner_id"],
            day=day,
            stored_bytes=row["stored"] or 0,
        )
        for row in stored
    ]
    if not samples:
        return 0
    totals: dict[int, DayTotals] = defaultdict(DayTotals)
    for s in samples:
        totals[s.user_id].add(storage_bytes=s.stored_bytes)
    try:
        with transaction.atomic():
            StorageSample.objects.bulk_create(samples)
            add_to_day(day, totals)
    except IntegrityError as exc:
        raced = StorageSample.objects.filter(day=day).exists()
        _not_written(f"the backup storage of {day}", raced, exc)
        return 0
    return len(samples)


def _prune(now: datetime) -> None:
    cutoff = now - timedelta(days=int(settings.HERMIT_METERING_KEEP_DAYS))
    UsageSample.objects.filter(interval_start__lt=cutoff).delete()
    StorageSample.objects.filter(day__lt=cutoff.date()).delete()
