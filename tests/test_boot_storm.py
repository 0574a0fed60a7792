"""Boot storms: at most HERMIT_MAX_CONCURRENT_BOOTS cold boots at once per host, the rest
waiting in line (first come, first served) with their place shown.

The slot accounting is tested with threads on the real database (no gateways); the issue's
"done when" with six real sign-ups provisioned at once on real gateways."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import partial
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from sandboxes import bootqueue
from sandboxes.backends.base import BackendError, Progress
from sandboxes.models import BootSlot, Sandbox
from tests.factories import make_user

pytestmark = pytest.mark.django_db(transaction=True)
State = Sandbox.State


def _sandboxes(count: int, prefix: str = "storm") -> list[Sandbox]:
    users = [make_user(f"{prefix}{i}@agents.test") for i in range(count)]
    return [Sandbox.objects.get(owner=user) for user in users]


def _wait(condition: Callable[[], bool], timeout: float = 10, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _dedupe(messages: list[str]) -> list[str]:
    """The messages without repeats in a row (a waiter repeats its place every few seconds)."""
    return [m for i, m in enumerate(messages) if i == 0 or m != messages[i - 1]]


def _has_slot(board: Board, booter: Booter) -> bool:
    return booter.sandbox_id in board.order


def _shows(booter: Booter, message: str) -> bool:
    return booter.messages[-1:] == [message]


def _holders() -> set[int]:
    return set(BootSlot.objects.filter(sandbox__isnull=False).values_list("sandbox_id", flat=True))


class Booter(threading.Thread):
    """One start in its own thread (own database connection): acquire a slot, hold it until
    told to let go, release it. Records what the waiting showed."""

    def __init__(self, sandbox: Sandbox, board: Board) -> None:
        super().__init__(daemon=True)
        self.sandbox_id = sandbox.pk
        self.board = board
        self.steps: list[Progress] = []
        self.queued = threading.Event()  # in line, or holding a slot
        self.let_go = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            sandbox = Sandbox.objects.get(pk=self.sandbox_id)
            for step in bootqueue.acquire(sandbox, timeout=60):
                self.steps.append(step)
                self.queued.set()
            self.board.took(self)
            self.queued.set()
            assert self.let_go.wait(60), "never told to let go"
            self.board.gave_back(self)
            bootqueue.release(sandbox)
        except BaseException as exc:
            self.error = exc
            self.queued.set()
        finally:
            connection.close()

    @property
    def messages(self) -> list[str]:
        return _dedupe([step.message for step in self.steps])


class Board:
    """What the booters did: who held a slot when, and the most that held one at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.holding: set[int] = set()
        self.most = 0
        self.order: list[int] = []

    def took(self, booter: Booter) -> None:
        with self.lock:
            self.holding.add(booter.sandbox_id)
            self.most = max(self.most, len(self.holding))
            self.order.append(booter.sandbox_id)

    def gave_back(self, booter: Booter) -> None:
        with self.lock:
            self.holding.discard(booter.sandbox_id)


@pytest.fixture
def booters() -> Iterator[list[Booter]]:
    """The test's booter threads; all are let go and joined at the end, whatever happened."""
    started: list[Booter] = []
    yield started
    for booter in started:
        booter.let_go.set()
    for booter in started:
        booter.join(10)


def test_it_boots_two_at_a_time_and_the_rest_wait_in_line(
    transactional_db: None, settings: Any, booters: list[Booter]
) -> None:
    settings.HERMIT_MAX_CONCURRENT_BOOTS = 2
    sandboxes = _sandboxes(5)
    board = Board()
    for sandbox in sandboxes:  # one after another, so the order of the line is known
        booter = Booter(sandbox, board)
        booters.append(booter)
        booter.start()
        assert booter.queued.wait(10), "the start neither waited nor got a slot"
        assert booter.error is None, booter.error
    first, second, third, fourth, fifth = booters

    assert board.order == [first.sandbox_id, second.sandbox_id]
    assert first.steps == [] and second.steps == []  # a free slot is taken without a word
    assert _holders() == {first.sandbox_id, second.sandbox_id}
    _wait(partial(_shows, fifth, bootqueue.waiting_message(2)), what="place 2 shown")
    queued = Sandbox.objects.exclude(boot_queued_at=None).values_list("pk", flat=True)
    assert set(queued) == {third.sandbox_id, fourth.sandbox_id, fifth.sandbox_id}

    # Each slot given back goes to the head of the line, and everyone behind moves up.
    ahead = bootqueue.waiting_message
    moves: list[tuple[Booter, Booter, dict[Booter, int]]] = [
        (first, third, {fourth: 0, fifth: 1}),
        (second, fourth, {fifth: 0}),
        (third, fifth, {}),
    ]
    for leaving, taking, behind in moves:
        leaving.let_go.set()
        _wait(partial(_has_slot, board, taking), what="the next start to get a slot")
        leaving.join(10)
        for booter, place in behind.items():
            _wait(partial(_shows, booter, ahead(place)), what=f"place {place} shown")
    for booter in (fourth, fifth):
        booter.let_go.set()
        booter.join(10)

    assert [b.error for b in booters] == [None] * 5
    assert board.order == [b.sandbox_id for b in booters]  # first come, first served
    assert board.most == 2
    assert third.messages == [ahead(0)]
    assert fourth.messages == [ahead(1), ahead(0)]
    assert fifth.messages == [ahead(2), ahead(1), ahead(0)]
    assert fifth.messages[0] == "Waiting for a free moment to start your agent: 2 ahead of you"
    percents = [step.percent for step in fifth.steps]
    assert percents == sorted(percents) and percents[0] > 5 and percents[-1] < 10, percents
    assert _holders() == set()
    assert not Sandbox.objects.exclude(boot_queued_at=None).exists()
    assert BootSlot.objects.count() == 2


def test_a_slot_whose_lease_ran_out_is_taken_over(transactional_db: None, settings: Any) -> None:
    settings.HERMIT_MAX_CONCURRENT_BOOTS = 2
    dead, busy, new = _sandboxes(3)
    assert list(bootqueue.acquire(dead)) == []
    assert list(bootqueue.acquire(busy)) == []
    slot = BootSlot.objects.get(sandbox=dead)
    lease = slot.lease_until
    assert lease is not None
    assert lease - timezone.now() > timedelta(seconds=5 * settings.HERMIT_START_TIMEOUT)
    BootSlot.objects.filter(pk=slot.pk).update(lease_until=timezone.now() - timedelta(seconds=1))

    assert list(bootqueue.acquire(new, timeout=5)) == []  # at once: the dead worker's slot
    assert BootSlot.objects.get(sandbox=new).pk == slot.pk
    assert not bootqueue.holds_slot(dead)
    bootqueue.release(dead)  # the dead worker's late release frees nothing of the new holder's
    assert _holders() == {busy.pk, new.pk}


def test_a_holder_gets_its_slot_again_and_release_is_idempotent(
    transactional_db: None, settings: Any
) -> None:
    settings.HERMIT_MAX_CONCURRENT_BOOTS = 1
    holder, other = _sandboxes(2)
    assert list(bootqueue.acquire(holder)) == []
    slot = BootSlot.objects.get(sandbox=holder)
    BootSlot.objects.filter(pk=slot.pk).update(lease_until=timezone.now() + timedelta(seconds=5))

    assert list(bootqueue.acquire(holder, timeout=1)) == []  # again: at once, lease renewed
    renewed = BootSlot.objects.get(sandbox=holder)
    assert renewed.pk == slot.pk
    assert renewed.lease_until is not None
    assert renewed.lease_until > timezone.now() + timedelta(seconds=60)

    for _ in range(2):
        bootqueue.release(holder)
    bootqueue.release(other)  # never held one
    holder.refresh_from_db()
    assert holder.boot_queued_at is None and _holders() == set()
    assert list(bootqueue.acquire(other, timeout=1)) == []


def test_slots_beyond_the_limit_stay_unused_and_a_wait_times_out(
    transactional_db: None, settings: Any
) -> None:
    settings.HERMIT_MAX_CONCURRENT_BOOTS = 1
    left_over = BootSlot.objects.create(host=bootqueue.host_name(), number=1)  # from a limit of 2
    holder, waiter = _sandboxes(2)
    assert list(bootqueue.acquire(holder)) == []

    steps: list[Progress] = []
    started = time.monotonic()
    with pytest.raises(BackendError, match="did not get its turn within 1 seconds"):
        for step in bootqueue.acquire(waiter, timeout=1):
            steps.append(step)
    assert 1 <= time.monotonic() - started < 3
    assert [s.message for s in steps] == [bootqueue.waiting_message(0)]
    left_over.refresh_from_db()
    assert left_over.sandbox_id is None
    waiter.refresh_from_db()
    assert waiter.boot_queued_at is None  # out of the line
    assert _holders() == {holder.pk}


def test_a_waiter_whose_worker_died_stops_holding_up_the_line(
    transactional_db: None, settings: Any
) -> None:
    settings.HERMIT_MAX_CONCURRENT_BOOTS = 1
    waiter, late = _sandboxes(2)
    an_hour_ago = timezone.now() - timedelta(hours=1)
    Sandbox.objects.filter(pk=waiter.pk).update(boot_queued_at=an_hour_ago)  # alive: just seen

    steps: list[Progress] = []
    with pytest.raises(BackendError):
        for step in bootqueue.acquire(late, timeout=0.5):
            steps.append(step)
    assert [s.message for s in steps] == [bootqueue.waiting_message(1)]

    # Silent past WAITER_STALE_AFTER: its worker is gone, and the line moves on without it.
    silent_since = timezone.now() - bootqueue.WAITER_STALE_AFTER - timedelta(seconds=1)
    Sandbox.objects.filter(pk=waiter.pk).update(updated_at=silent_since)
    assert list(bootqueue.acquire(late, timeout=5)) == []
    assert _holders() == {late.pk}


def test_a_start_that_stops_waiting_leaves_the_line(transactional_db: None, settings: Any) -> None:
    settings.HERMIT_MAX_CONCURRENT_BOOTS = 1
    holder, waiter = _sandboxes(2)
    assert list(bootqueue.acquire(holder)) == []
    waiting = bootqueue.acquire(waiter)
    assert next(waiting).message == bootqueue.waiting_message(0)
    waiter.refresh_from_db()
    assert waiter.boot_queued_at is not None
    waiting.close()  # the caller gave up (a closed page, a cancelled task)
    waiter.refresh_from_db()
    assert waiter.boot_queued_at is None
