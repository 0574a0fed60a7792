"""A line for cold boots: at most HERMIT_MAX_CONCURRENT_BOOTS gateways start at once per host.

A cold boot is CPU-bound (about 12 CPU-seconds on a small host); started all together, boots
share the cores and each takes several times longer, long enough to miss its start timeout.
So a start first takes one of its host's boot slots (:func:`acquire`), boots, and gives the
slot back (:func:`release`); the starts that find no free slot wait in line, first come first
served, and show the user their place ("Waiting for a free moment to start your agent: 2 ahead
of you").

Contract and limits:

* Slots are BootSlot rows (host, number 0..N-1), made on demand. Rows numbered N or more (left
  by a larger N earlier) are never used. A slot is taken only with a conditional UPDATE (free, or
  its lease run out), so two workers never hold one, and held with a lease of
  5 x HERMIT_START_TIMEOUT + 60 s: a worker that died while booting frees its slot when the lease
  runs out. :func:`renew` extends the lease during a long boot.
* The line is Sandbox.boot_queued_at (ties broken by primary key). A waiting sandbox takes a
  free slot only while fewer sandboxes are ahead of it than slots are free, so the order is FIFO.
  The line is one for all hosts (Sandbox has no host field): a waiter on another host counts as
  ahead too, which can only make a wait longer, never break the limit.
* A waiter proves it is alive by touching Sandbox.updated_at every few seconds (which also tells
  reconcile that a waiting start is not stuck). A waiter silent for WAITER_STALE_AFTER (its
  worker died) is no longer counted as ahead of anyone.
* Waiting polls the database every POLL_INTERVAL; it works on PostgreSQL and SQLite. Call it
  outside a transaction: other workers must see the rows it writes.
* The Progress yielded while waiting has a percent between 6 and 9 (after "Starting your agent"
  at 5, before the backend's steps from 10), never going down.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Generator
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection
from django.db.models import Q
from django.db.models.functions import Now
from django.utils import timezone

from sandboxes.backends.base import BackendError, Progress
from sandboxes.models import BootSlot, Sandbox

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.3  # seconds between looks at the line while waiting
REPEAT_EVERY = 5.0  # a waiter says where it is (and that it is alive) at least this often
WAITER_STALE_AFTER = timedelta(seconds=30)  # a waiter silent this long is not counted
LEASE_MARGIN = timedelta(seconds=60)
HOST_MAX_LENGTH = 200  # BootSlot.host
WAITING = "Waiting for a free moment to start your agent"


def host_name() -> str:
    """Return this host's name: HERMIT_HOST_NAME if set, else the machine's host name."""
    name = getattr(settings, "HERMIT_HOST_NAME", "") or socket.gethostname()
    return name[:HOST_MAX_LENGTH]


def slot_count() -> int:
    """Return how many cold boots may run at once on this host (at least one)."""
    return max(1, int(settings.HERMIT_MAX_CONCURRENT_BOOTS))


def lease_length() -> timedelta:
    """How long a slot stays held without a renewal: long enough for a boot slowed down by a
    busy host (a start is judged by CPU time, so it may take several times its wall timeout)."""
    return 5 * timedelta(seconds=settings.HERMIT_START_TIMEOUT) + LEASE_MARGIN


def waiting_message(ahead: int) -> str:
    """Return what a user waiting in line reads."""
    if ahead == 0:
        return f"{WAITING}: you are next"
    return f"{WAITING}: {ahead} ahead of you"


def acquire(sandbox: Sandbox, *, timeout: float | None = None) -> Generator[Progress, None, None]:
    """Wait for one of this host's boot slots, yielding Progress whenever the sandbox's place in
    line changes (and every REPEAT_EVERY seconds otherwise); return once the sandbox holds one.

    A sandbox that holds a slot already gets it again at once, its lease renewed. With a
    ``timeout`` (seconds), raises BackendError if no slot came within it, and leaves the line.
    Nothing is yielded when a slot is free at once. If the caller stops iterating while the
    sandbox waits, it leaves the line.
    """
    host, count = host_name(), slot_count()
    _ensure_slots(host, count)
    if _renew_held(sandbox, host, count):
        return
    BootSlot.objects.filter(sandbox=sandbox).update(sandbox=None, lease_until=None)
    queued_at = _join_line(sandbox)
    deadline = None if timeout is None else time.monotonic() + timeout
    shown: int | None = None
    shown_at = 0.0
    percent = 6
    try:
        while True:
            # Free slots first, then the line: a waiter ahead that takes a slot in between
            # lowers both counts alike, so the head of the line is never held back.
            free = _free_slots(host, count)
            ahead = _ahead_of(sandbox, queued_at)
            if ahead < len(free) and _take_one(sandbox, free):
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise BackendError(
                    "The server is busy starting other agents and yours did not get its turn "
                    f"within {_duration(timeout)}. Please try again in a few minutes."
                )
            # A place shown never goes up: one that joined a moment earlier but committed
            # later can still appear ahead; the user is not told they moved back for that.
            place = ahead if shown is None else min(ahead, shown)
            now = time.monotonic()
            if place != shown or now - shown_at >= REPEAT_EVERY:
                if shown is None:
                    log.info("sandbox %s waits for a boot slot on %s", sandbox.pk, host)
                _heartbeat(sandbox)
                percent = max(percent, 9 - min(place, 3))
                shown, shown_at = place, now
                yield Progress(percent, waiting_message(place))
            time.sleep(POLL_INTERVAL)
    finally:
        _leave_line(sandbox)
    if shown is not None:
        log.info("sandbox %s got a boot slot on %s", sandbox.pk, host)


def release(sandbox: Sandbox) -> None:
    """Give back the sandbox's boot slot, if it holds one, and take it out of the line.
    Idempotent."""
    BootSlot.objects.filter(sandbox=sandbox).update(sandbox=None, lease_until=None)
    _leave_line(sandbox)


def renew(sandbox: Sandbox) -> None:
    """Extend the lease of the slot the sandbox holds (none: nothing happens)."""
    BootSlot.objects.filter(sandbox=sandbox).update(lease_until=timezone.now() + lease_length())


def holds_slot(sandbox: Sandbox) -> bool:
    """Return True if the sandbox holds a boot slot whose lease has not run out."""
    return BootSlot.objects.filter(sandbox=sandbox, lease_until__gt=timezone.now()).exists()


# -- the pieces -----------------------------------------------------------------------------------


def _ensure_slots(host: str, count: int) -> None:
    """Create the rows for slots 0..count-1 of ``host`` that do not exist yet."""
    have = set(
        BootSlot.objects.filter(host=host, number__lt=count).values_list("number", flat=True)
    )
    missing = [BootSlot(host=host, number=n) for n in range(count) if n not in have]
    if missing:  # two workers may both create them: the unique constraint keeps one of each
        BootSlot.objects.bulk_create(missing, ignore_conflicts=True)


def _renew_held(sandbox: Sandbox, host: str, count: int) -> bool:
    """If the sandbox holds a usable slot of this host, renew its lease; return whether it did."""
    lease_until = timezone.now() + lease_length()
    held = BootSlot.objects.filter(sandbox=sandbox, host=host, number__lt=count)
    return held.update(lease_until=lease_until) > 0


def _join_line(sandbox: Sandbox) -> datetime:
    """Put the sandbox at the end of the line (touching its heartbeat); return its place time.

    On PostgreSQL the time is the database's, taken by the UPDATE itself, so joins from many
    workers (and hosts) line up nearly in commit order. (SQLite's clock has milliseconds and
    is stored as other text than Django's datetimes, which would not compare right.)"""
    joined = Now() if connection.vendor == "postgresql" else timezone.now()
    Sandbox.objects.filter(pk=sandbox.pk).update(boot_queued_at=joined, updated_at=timezone.now())
    queued_at = Sandbox.objects.values_list("boot_queued_at", flat=True).get(pk=sandbox.pk)
    assert queued_at is not None
    sandbox.boot_queued_at = queued_at
    return queued_at


def _leave_line(sandbox: Sandbox) -> None:
    Sandbox.objects.filter(pk=sandbox.pk, boot_queued_at__isnull=False).update(boot_queued_at=None)
    sandbox.boot_queued_at = None


def _heartbeat(sandbox: Sandbox) -> None:
    Sandbox.objects.filter(pk=sandbox.pk).update(updated_at=timezone.now())


def _ahead_of(sandbox: Sandbox, queued_at: datetime) -> int:
    """Return how many live waiters without a slot are ahead of ``sandbox`` in line."""
    earlier = Q(boot_queued_at__lt=queued_at) | Q(boot_queued_at=queued_at, pk__lt=sandbox.pk)
    alive = Q(updated_at__gte=timezone.now() - WAITER_STALE_AFTER)
    waiting = Sandbox.objects.filter(earlier, alive, boot_slot__isnull=True)
    return waiting.exclude(pk=sandbox.pk).count()


def _free_slots(host: str, count: int) -> list[int]:
    """Return the primary keys of this host's usable slots that are free or whose lease ran out."""
    free = _free(timezone.now())
    slots = BootSlot.objects.filter(free, host=host, number__lt=count).order_by("number")
    return list(slots.values_list("pk", flat=True))


def _free(now: datetime) -> Q:
    return Q(sandbox__isnull=True) | Q(lease_until__isnull=True) | Q(lease_until__lt=now)


def _take_one(sandbox: Sandbox, slot_ids: list[int]) -> bool:
    """Claim the first of ``slot_ids`` still free, each with one conditional UPDATE; return
    whether one was taken."""
    for slot_id in slot_ids:
        now = timezone.now()
        taken = BootSlot.objects.filter(_free(now), pk=slot_id).update(
            sandbox=sandbox, lease_until=now + lease_length()
        )
        if taken:
            return True
    return False


def _duration(seconds: float | None) -> str:
    seconds = seconds or 0
    if seconds < 120:
        return f"{max(1, round(seconds))} seconds"
    return f"{round(seconds / 60)} minutes"
