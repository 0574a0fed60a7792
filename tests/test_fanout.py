"""Reconcile and the sleep policy fan out: beat queues one task per sandbox on its host's queue,
and each task claims its sandbox, so overlapping passes never act twice. In-memory backend."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import time_machine
from django.db import connection
from django.utils import timezone

from billing.models import Account, Plan
from portal.celery import app
from sandboxes import actions, hosts, passes, tasks
from sandboxes.backends.fake import FakeBackend
from sandboxes.models import Sandbox, SandboxHost
from tests.factories import make_user

State = Sandbox.State


@pytest.fixture
def fake(fake_backend: FakeBackend, settings: Any) -> FakeBackend:
    settings.HERMIT_DOZE_AFTER = 60
    settings.HERMIT_HOST_NAME = "here"
    SandboxHost.objects.all().delete()
    return fake_backend


def make_host(name: str) -> SandboxHost:
    return SandboxHost.objects.create(
        name=name, free_ram_mb=8000, last_heartbeat=timezone.now() - timedelta(seconds=3)
    )


def running(email: str, host: SandboxHost | None, plan: str = "free") -> Sandbox:
    user = make_user(email)
    Account.objects.filter(user=user).update(plan=Plan.objects.get(slug=plan))
    sandbox = Sandbox.objects.get(owner=user)
    actions.provision_sandbox(sandbox)
    Sandbox.objects.filter(pk=sandbox.pk).update(host=host)
    sandbox.refresh_from_db()
    assert sandbox.state == State.RUNNING, sandbox.error_message
    return sandbox


def later(seconds: float) -> Any:
    return time_machine.travel(timezone.now() + timedelta(seconds=seconds), tick=True)


@pytest.fixture
def queues() -> Iterator[Any]:
    """``size(name)``: how many messages wait in a queue of this run; emptied afterwards."""
    seen: list[str] = []

    def size(name: str) -> int:
        seen.append(name)
        with app.connection_for_write() as conn, conn.SimpleQueue(name) as queue:
            return int(queue.qsize())

    for name in (app.conf.task_default_queue,):
        with app.connection_for_write() as conn, conn.SimpleQueue(name) as queue:
            queue.clear()
    yield size
    for name in {*seen, app.conf.task_default_queue}:
        with app.connection_for_write() as conn, conn.SimpleQueue(name) as queue:
            queue.clear()


@pytest.mark.django_db
def test_beat_queues_one_reconcile_and_one_sleep_task_per_sandbox_on_its_hosts_queue(
    fake: FakeBackend, queues: Any
) -> None:
    here, there = make_host("here"), make_host("there")
    for i in range(2):
        running(f"here{i}@example.com", here)
    running("there@example.com", there)
    running("unplaced@example.com", None)
    provisioning = Sandbox.objects.get(owner=make_user("new@example.com"))
    assert provisioning.state == State.PROVISIONING  # left to its provisioning task

    assert tasks.reconcile_sandboxes.apply().get() == {"queued": 4}  # as a worker runs it
    assert queues(hosts.queue_for("here")) == 2
    assert queues(hosts.queue_for("there")) == 1
    assert queues(app.conf.task_default_queue) == 1  # the unplaced one: any worker

    with app.connection_for_write() as conn, conn.SimpleQueue(hosts.queue_for("there")) as q:
        message = q.get(timeout=5)
        assert message.headers["task"] == "sandboxes.tasks.reconcile_one"
        assert message.headers["expires"] is not None  # a backlog is dropped, not replayed
        message.ack()

    counts = tasks.sleep_idle_sandboxes.apply().get()
    assert counts == {"queued": 4, "hosts": 2}  # one per awake sandbox, one upkeep per host
    assert queues(hosts.queue_for("here")) == 2 + 3
    assert queues(hosts.queue_for("there")) == 1 + 1


@pytest.mark.django_db
def test_the_fanned_out_tasks_do_what_the_loop_did(fake: FakeBackend, settings: Any) -> None:
    here = make_host("here")
    crashed = running("crashed@example.com", here, plan="pro")
    idle = running("idle@example.com", here)
    fake.crash(crashed.slug)
    before = app.conf.task_always_eager
    app.conf.task_always_eager = True  # the fanned-out tasks run here, at once
    try:
        assert tasks.reconcile_sandboxes.delay().get() == {"queued": 2}
        crashed.refresh_from_db()
        assert crashed.state == State.RUNNING
        assert fake.calls.count(("start", crashed.slug)) == 2
        with later(61):
            assert tasks.sleep_idle_sandboxes.delay().get() == {"queued": 2, "hosts": 1}
    finally:
        app.conf.task_always_eager = before
    idle.refresh_from_db()
    crashed.refresh_from_db()
    assert (idle.state, crashed.state) == (State.DOZING, State.RUNNING)


@pytest.mark.django_db
def test_a_sandbox_claimed_by_one_pass_is_left_alone_by_another(fake: FakeBackend) -> None:
    here = make_host("here")
    sandbox = running("claimed@example.com", here, plan="pro")
    fake.crash(sandbox.slug)
    with passes.claimed(sandbox.pk) as mine:
        assert mine
        assert tasks.reconcile_one(sandbox.pk) == "claimed"
        assert tasks.sleep_one(sandbox.pk) == "claimed"
        with passes.claimed(sandbox.pk) as second:
            assert not second
    assert fake.calls.count(("start", sandbox.slug)) == 1  # nothing was repaired meanwhile
    assert tasks.reconcile_one(sandbox.pk) == "restarted"  # released: the next pass acts
    sandbox.refresh_from_db()
    assert sandbox.claimed_until is None
    assert tasks.reconcile_one(10**9) == "gone"


@pytest.mark.django_db
def test_a_claim_whose_worker_died_runs_out(fake: FakeBackend) -> None:
    sandbox = running("dead@example.com", make_host("here"))
    until = timezone.now() + timedelta(seconds=passes.CLAIM_SECONDS)
    Sandbox.objects.filter(pk=sandbox.pk).update(claimed_until=until)  # never released
    assert tasks.reconcile_one(sandbox.pk) == "claimed"
    with later(passes.CLAIM_SECONDS + 1):
        assert tasks.reconcile_one(sandbox.pk) == "ok"


@pytest.mark.django_db(transaction=True)
def test_overlapping_reconcile_passes_restart_a_crashed_agent_once(fake: FakeBackend) -> None:
    here = make_host("here")
    boxes = [running(f"crash{i}@example.com", here, plan="pro") for i in range(3)]
    for box in boxes:
        fake.crash(box.slug)
    results: list[dict[str, int]] = []
    barrier = threading.Barrier(3)

    def beat() -> None:
        barrier.wait()
        try:
            results.append(tasks.reconcile_sandboxes())
        finally:
            connection.close()

    threads = [threading.Thread(target=beat) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r.get("restarted", 0) for r in results) == 3, results
    for box in boxes:
        assert fake.calls.count(("start", box.slug)) == 2  # its first boot and one restart
        box.refresh_from_db()
        assert box.state == State.RUNNING
        assert box.events.filter(kind="crashed").count() == 1


@pytest.mark.django_db
def test_a_pass_in_this_process_takes_only_this_hosts_sandboxes(fake: FakeBackend) -> None:
    mine = running("mine@example.com", make_host("here"))
    legacy = running("legacy@example.com", None)  # no host: this machine's
    theirs = running("theirs@example.com", make_host("there"))
    for box in (mine, legacy, theirs):
        fake.crash(box.slug)
    assert tasks.reconcile_sandboxes() == {"restarted": 2}
    theirs.refresh_from_db()
    assert theirs.state == State.RUNNING and fake.calls.count(("start", theirs.slug)) == 1
    with later(61):
        assert tasks.sleep_idle_sandboxes()["dozed"] == 2
    theirs.refresh_from_db()
    assert theirs.state == State.RUNNING  # another host's policy pass dozes it, not this one
