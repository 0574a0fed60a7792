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


def test_a_place_shown_never_goes_up(
    transactional_db: None, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.HERMIT_MAX_CONCURRENT_BOOTS = 1
    monkeypatch.setattr(bootqueue, "REPEAT_EVERY", 0.5)
    holder, first, waiter, late_commit = _sandboxes(4)
    assert list(bootqueue.acquire(holder)) == []
    Sandbox.objects.filter(pk=first.pk).update(boot_queued_at=timezone.now())
    waiting = bootqueue.acquire(waiter)
    assert next(waiting).message == bootqueue.waiting_message(1)
    # One that joined earlier shows up late (its join committed after ours was counted).
    earlier = timezone.now() - timedelta(seconds=1)
    Sandbox.objects.filter(pk=late_commit.pk).update(boot_queued_at=earlier)
    assert next(waiting).message == bootqueue.waiting_message(1)  # not "2 ahead of you"
    Sandbox.objects.filter(pk__in=[first.pk, late_commit.pk]).update(boot_queued_at=None)
    assert next(waiting).message == bootqueue.waiting_message(0)
    waiting.close()


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


# -- the "done when": six sign-ups confirmed at once -------------------------------------

SIGN_UPS = 6
WAITING_TEXT = "Waiting for a free moment to start your agent"


@pytest.fixture
def eager_tasks() -> Iterator[None]:
    """Celery tasks run in the caller at once: each confirmation provisions in its own thread,
    as six workers would."""
    from portal.celery import app

    before = app.conf.task_always_eager
    app.conf.task_always_eager = True
    yield
    app.conf.task_always_eager = before


def _confirm(address_id: int, barrier: threading.Barrier, errors: list[BaseException]) -> None:
    """Confirm one sign-up's email address (which provisions its sandbox), all at one moment."""
    from allauth.account.models import EmailAddress
    from allauth.account.signals import email_confirmed
    from django.db import transaction

    try:
        address = EmailAddress.objects.get(pk=address_id)
        barrier.wait(30)
        with transaction.atomic():  # the task is enqueued when the confirmation commits
            email_confirmed.send(sender=EmailAddress, request=None, email_address=address)
    except BaseException as exc:
        errors.append(exc)
    finally:
        connection.close()


def _stop_all(sandbox_ids: list[int]) -> None:
    """Stop every gateway of these sandboxes, all at once (each takes a second or two)."""
    from concurrent.futures import ThreadPoolExecutor

    from sandboxes import actions

    def stop(pk: int) -> None:
        try:
            sandbox = Sandbox.objects.select_related("owner").get(pk=pk)
            if sandbox.backend_state or sandbox.state == State.RUNNING:
                actions.stop_sandbox(sandbox)
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=len(sandbox_ids)) as pool:
        for done in [pool.submit(stop, pk) for pk in sandbox_ids]:
            done.result()


def _running_at(sandbox: Sandbox) -> Any:
    running = sandbox.events.filter(kind="state", state=State.RUNNING).order_by("created_at")
    return running.values_list("created_at", flat=True).first()


def _places(messages: list[str]) -> list[int]:
    """The places in line a sandbox's recorded steps showed (0: "you are next")."""
    places = []
    for message in messages:
        if message.startswith(WAITING_TEXT):
            tail = message.removeprefix(f"{WAITING_TEXT}: ")
            places.append(0 if tail == "you are next" else int(tail.split()[0]))
    return places


def _most_booting_at_once(sandbox_ids: list[int]) -> int:
    """How many gateways booted at one moment, from the backend steps each start recorded."""
    from sandboxes.models import SandboxEvent

    edges: list[tuple[Any, int]] = []
    for pk in sandbox_ids:
        steps = SandboxEvent.objects.filter(sandbox_id=pk, kind="progress", progress__gte=10)
        times = list(steps.order_by("created_at").values_list("created_at", flat=True))
        assert times, f"sandbox {pk} recorded no backend step"
        edges += [(times[0], 1), (times[-1], -1)]
    most = booting = 0
    for _, change in sorted(edges, key=lambda edge: (edge[0], edge[1])):
        booting += change
        most = max(most, booting)
    return most


def test_six_sign_ups_confirmed_at_once_all_start_in_turn(
    sandbox_pool: Any, transactional_db: None, settings: Any, eager_tasks: None
) -> None:
    from allauth.account.models import EmailAddress

    settings.HERMIT_AUTO_PROVISION = True
    settings.HERMIT_MAX_CONCURRENT_BOOTS = 2
    sandbox_pool.restore_shared()
    users = [make_user(f"signup{i}@agents.test") for i in range(SIGN_UPS)]
    sandbox_ids = [Sandbox.objects.get(owner=user).pk for user in users]
    barrier = threading.Barrier(SIGN_UPS)
    errors: list[BaseException] = []
    threads = [
        threading.Thread(
            target=_confirm, args=(EmailAddress.objects.get(user=user).pk, barrier, errors)
        )
        for user in users
    ]
    started, confirmed = time.monotonic(), timezone.now()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
        took = time.monotonic() - started
        assert not any(thread.is_alive() for thread in threads), "a provisioning never ended"
        assert errors == []

        sandboxes = list(Sandbox.objects.filter(pk__in=sandbox_ids).order_by("pk"))
        failed = {s.pk: s.error_message for s in sandboxes if s.state != State.RUNNING}
        assert failed == {}, failed
        messages = {
            s.pk: list(s.events.order_by("created_at", "id").values_list("message", flat=True))
            for s in sandboxes
        }
        places = {pk: _places(shown) for pk, shown in messages.items()}
        waited = [pk for pk, shown in places.items() if shown]
        running_after = {
            s.pk: round((_running_at(s) - confirmed).total_seconds(), 1) for s in sandboxes
        }
        print(f"\nsign-ups running after {took:.1f} s: {running_after}\nplaces shown: {places}")
        # Two boot at once; the four others wait in line and are told where they are: the
        # last one at least 3 ahead of it at first, and no one's place ever goes up.
        assert len(waited) == SIGN_UPS - 2, places
        for shown in places.values():
            assert shown == sorted(shown, reverse=True), places
        assert max(max(shown) for shown in places.values() if shown) >= 3, places
        assert _most_booting_at_once(sandbox_ids) <= 2
        for sandbox in sandboxes:  # the bar never goes back while waiting in line
            recorded = sandbox.events.order_by("created_at", "id").exclude(progress=None)
            progress = [p or 0 for p in recorded.values_list("progress", flat=True)]
            before_boot = progress[: next(i for i, p in enumerate(progress) if p >= 10)]
            assert before_boot == sorted(before_boot), (sandbox.pk, progress)
        assert not BootSlot.objects.filter(sandbox__isnull=False).exists()
        assert not Sandbox.objects.filter(pk__in=sandbox_ids).exclude(boot_queued_at=None).exists()
    finally:
        for thread in threads:
            thread.join(600)
        from portal.celery import app

        app.conf.task_always_eager = False  # the stops' backups are queued, not run here
        _stop_all(sandbox_ids)
    assert all(s.state == State.STOPPED for s in Sandbox.objects.filter(pk__in=sandbox_ids)), (
        "a gateway was left running"
    )
