"""Sleep in stages on the in-memory backend: doze, hibernate, cold fallback, budget, races.

The real-gateway versions (a chat after each kind of wake) are in tests/test_wake.py; these
cover the portal's policy and bookkeeping, where a fake sandbox is enough and costs nothing.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import time_machine
from django.db import connection
from django.utils import timezone

from billing.models import Account, Plan
from sandboxes import actions, sleep, tasks
from sandboxes.backends.fake import FakeBackend
from sandboxes.models import Checkpoint, RuntimeImage, Sandbox
from tests.factories import make_user

State = Sandbox.State


@pytest.fixture
def fake(fake_backend: FakeBackend, settings: Any) -> FakeBackend:
    settings.HERMIT_DOZE_AFTER = 60
    return fake_backend


def running(email: str, plan: str = "free") -> Sandbox:
    user = make_user(email)
    Account.objects.filter(user=user).update(plan=Plan.objects.get(slug=plan))
    sandbox = Sandbox.objects.get(owner=user)
    Sandbox.objects.filter(pk=sandbox.pk).update(backend="fake")
    sandbox.refresh_from_db()
    actions.provision_sandbox(sandbox)
    sandbox.refresh_from_db()
    assert sandbox.state == State.RUNNING, sandbox.error_message
    return sandbox


def later(seconds: float) -> Any:
    return time_machine.travel(timezone.now() + timedelta(seconds=seconds), tick=True)


def messages(sandbox: Sandbox) -> list[str]:
    return list(sandbox.events.order_by("created_at", "id").values_list("message", flat=True))


@pytest.mark.django_db
def test_an_idle_agent_dozes_then_hibernates_and_each_wake_fits_its_stage(
    fake: FakeBackend,
) -> None:
    sandbox = running("doze@example.com")
    with later(30):
        assert tasks.sleep_idle_sandboxes()["dozed"] == 0
    with later(61):
        assert tasks.sleep_idle_sandboxes()["dozed"] == 1
        sandbox.refresh_from_db()
        assert sandbox.state == State.DOZING
        assert fake.is_frozen(sandbox.slug) and sleep.is_dozing(sandbox.pk)
        steps = [step.message for step in actions.wake_sandbox(sandbox)]
    sandbox.refresh_from_db()
    assert sandbox.state == State.RUNNING and not fake.is_frozen(sandbox.slug)
    assert steps[-1] == "Your agent is running" and not sleep.is_dozing(sandbox.pk)
    assert "Woke from a doze" in messages(sandbox)
    assert ("start", sandbox.slug) in fake.calls and fake.calls.count(("start", sandbox.slug)) == 1

    with later(17 * 60):  # 15 minutes (the free plan's sleep-after) after the thaw
        assert tasks.sleep_idle_sandboxes()["hibernated"] == 1
    sandbox.refresh_from_db()
    assert sandbox.state == State.SLEEPING and sandbox.backend_state == {}
    checkpoint = Checkpoint.objects.get(sandbox=sandbox)
    assert checkpoint.size_bytes > 0 and fake.images() == [checkpoint.location]
    assert messages(sandbox)[-1] == "Asleep (hibernated: wakes in about a second)"

    list(actions.wake_sandbox(sandbox))
    sandbox.refresh_from_db()
    assert sandbox.state == State.RUNNING and sandbox.backend_state.get("restored") is True
    assert fake.calls.count(("start", sandbox.slug)) == 1  # restored, not booted again
    assert not Checkpoint.objects.filter(sandbox=sandbox).exists() and fake.images() == []


@pytest.mark.django_db
@pytest.mark.parametrize("spoil", ["restore-fails", "data-replaced", "runtime-changed", "gone"])
def test_a_checkpoint_that_cannot_be_used_falls_back_to_a_cold_start(
    fake: FakeBackend, spoil: str, tmp_path: Path
) -> None:
    sandbox = running(f"{spoil}@example.com")
    assert sleep.hibernate(sandbox) == "checkpointed"
    if spoil == "restore-fails":
        fake.fail_next(sandbox.slug, "restore")
    elif spoil == "data-replaced":
        fake.replace_data(sandbox.slug)
    elif spoil == "runtime-changed":
        (tmp_path / "newer").mkdir()
        newer = RuntimeImage.objects.create(
            openclaw_version="newer",
            node_version="test",
            path=str(tmp_path / "newer"),
            status=RuntimeImage.Status.READY,
        )
        from sandboxes import runtime

        runtime.make_current(newer)
    else:
        fake.drop_checkpoint(Checkpoint.objects.get(sandbox=sandbox).location)

    list(actions.wake_sandbox(sandbox))
    sandbox.refresh_from_db()
    assert sandbox.state == State.RUNNING
    assert fake.calls.count(("start", sandbox.slug)) == 2  # the first boot, and this cold one
    assert not Checkpoint.objects.filter(sandbox=sandbox).exists() and fake.images() == []
    expected = (
        "Checkpoint was of an older runtime; starting fresh"
        if spoil == "runtime-changed"
        else "Could not resume from the checkpoint"
    )
    assert any(message.startswith(expected) for message in messages(sandbox))


@pytest.mark.django_db
def test_a_failed_checkpoint_stops_the_agent_cold_instead(fake: FakeBackend) -> None:
    sandbox = running("nockpt@example.com")
    fake.fail_next(sandbox.slug, "checkpoint")
    assert sleep.hibernate(sandbox) == "stopped"
    sandbox.refresh_from_db()
    assert sandbox.state == State.SLEEPING and not Checkpoint.objects.exists()
    assert any(m.startswith("Stopped instead of hibernating") for m in messages(sandbox))
    list(actions.wake_sandbox(sandbox))
    sandbox.refresh_from_db()
    assert sandbox.state == State.RUNNING and fake.calls.count(("start", sandbox.slug)) == 2


@pytest.mark.django_db
def test_a_failed_start_is_tried_again_before_the_user_is_told(
    fake: FakeBackend, settings: Any
) -> None:
    settings.HERMIT_START_RETRIES = 1
    user = make_user("retry@example.com")
    sandbox = Sandbox.objects.get(owner=user)
    Sandbox.objects.filter(pk=sandbox.pk).update(backend="fake")
    sandbox.refresh_from_db()
    fake.fail_next(sandbox.slug, "start")
    actions.provision_sandbox(sandbox)
    sandbox.refresh_from_db()
    assert sandbox.state == State.RUNNING
    assert any(m.startswith("The start did not work") for m in messages(sandbox))

    sandbox2 = running("retry2@example.com")
    actions.stop_sandbox(sandbox2)
    fake.fail_next(sandbox2.slug, "start", times=2)
    list(actions.start_sandbox(sandbox2))
    sandbox2.refresh_from_db()
    assert sandbox2.state == State.FAILED and "planted by a test" in sandbox2.error_message


@pytest.mark.django_db
def test_checkpoints_stay_within_their_disk_budget_and_age(
    fake: FakeBackend, settings: Any
) -> None:
    settings.HERMIT_CHECKPOINT_BUDGET_MB = 2500  # room for two of the fake's 1000 MB images
    boxes = [running(f"budget{i}@example.com") for i in range(3)]
    for box in boxes:
        assert sleep.hibernate(box) == "checkpointed"
    kept = set(Checkpoint.objects.values_list("sandbox_id", flat=True))
    assert kept == {boxes[1].pk, boxes[2].pk}  # the oldest went first
    assert len(fake.images()) == 2
    assert "Checkpoint dropped to stay within the disk budget" in messages(boxes[0])

    settings.HERMIT_CHECKPOINT_MAX_AGE = 3600
    with later(3601):
        assert sleep.enforce_checkpoint_budget() == 2
    assert not Checkpoint.objects.exists() and fake.images() == []


@pytest.mark.django_db
def test_too_many_dozing_or_too_little_memory_hibernates_the_longest_idle_first(
    fake: FakeBackend, settings: Any
) -> None:
    settings.HERMIT_MAX_DOZING = 1
    first = running("idle1@example.com")
    with later(5):
        second = running("idle2@example.com")
    with later(70):
        counts = tasks.sleep_idle_sandboxes()
    assert counts["dozed"] == 2 and counts["pressure"] == 1
    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.state, second.state) == (State.SLEEPING, State.DOZING)
    assert "Too many dozing agents: hibernating the longest idle first" in messages(first)

    settings.HERMIT_DOZE_MIN_AVAILABLE_MB = 10**9  # no machine has that much: pressure
    assert sleep.relieve_pressure() == 1
    second.refresh_from_db()
    assert second.state == State.SLEEPING
    assert any(m.startswith("Low on memory") for m in messages(second))


@pytest.mark.django_db
def test_always_on_agents_never_doze_and_a_plan_change_applies_at_once(
    fake: FakeBackend, django_capture_on_commit_callbacks: Any
) -> None:
    pro = running("always@example.com", plan="pro")
    with later(6 * 3600):
        assert tasks.sleep_idle_sandboxes() == {
            "dozed": 0,
            "hibernated": 0,
            "woke": 0,
            "pressure": 0,
            "swept": 0,
        }
    pro.refresh_from_db()
    assert pro.state == State.RUNNING

    free = running("upgrade@example.com")
    with later(61):
        tasks.sleep_idle_sandboxes()
    free.refresh_from_db()
    assert free.state == State.DOZING
    account = Account.objects.get(user=free.owner)
    account.plan = Plan.objects.get(slug="pro")
    with django_capture_on_commit_callbacks() as callbacks:
        account.save()
    assert len(callbacks) == 1  # the change queues one apply_plan per sandbox
    tasks.apply_plan(free.pk)  # what the queued task runs
    free.refresh_from_db()
    assert free.state == State.RUNNING and not fake.is_frozen(free.slug)

    account.plan = Plan.objects.get(slug="free")  # pro -> free: sleeps on the free schedule
    account.save()
    tasks.apply_plan(free.pk)
    free.refresh_from_db()
    assert free.state == State.RUNNING
    with later(61):
        assert tasks.sleep_idle_sandboxes()["dozed"] == 1


@pytest.mark.django_db
def test_reconcile_settles_a_dozing_agent_whose_processes_are_gone(fake: FakeBackend) -> None:
    sandbox = running("gone@example.com")
    assert sleep.doze(sandbox)
    fake.crash(sandbox.slug)
    assert actions.reconcile_sandbox(sandbox) == "dozing-gone"
    sandbox.refresh_from_db()
    assert sandbox.state == State.SLEEPING and sandbox.backend_state == {}
    list(actions.wake_sandbox(sandbox))
    sandbox.refresh_from_db()
    assert sandbox.state == State.RUNNING


@pytest.mark.django_db
def test_activity_is_written_once_per_interval_and_costs_no_query_otherwise(
    fake: FakeBackend, django_assert_num_queries: Any
) -> None:
    sandbox = running("busy@example.com")
    with later(40):
        actions.record_activity(sandbox)  # the first in its interval: one UPDATE
        with django_assert_num_queries(0):
            for _ in range(50):
                actions.record_activity(sandbox)
                sleep.wake_if_dozing(sandbox)


@pytest.mark.django_db(transaction=True)
def test_racing_sleep_workers_act_once_on_each_sandbox(fake: FakeBackend) -> None:
    boxes = [running(f"race{i}@example.com") for i in range(4)]
    results: list[dict[str, int]] = []
    with later(61):
        barrier = threading.Barrier(3)

        def worker() -> None:
            barrier.wait()
            try:
                results.append(sleep.sleep_idle())
            finally:
                connection.close()

        threads = [threading.Thread(target=worker) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sum(r["dozed"] for r in results) == 4
    for box in boxes:
        box.refresh_from_db()
        assert box.state == State.DOZING and fake.is_frozen(box.slug)
        assert messages(box).count("Dozing (paused, wakes instantly)") == 1
        assert fake.calls.count(("freeze", box.slug)) == 1


@pytest.mark.django_db(transaction=True)
def test_a_wake_racing_a_doze_never_leaves_a_running_agent_frozen(fake: FakeBackend) -> None:
    sandbox = running("wakerace@example.com")
    for _ in range(15):
        sandbox.refresh_from_db()
        assert sandbox.state == State.RUNNING
        barrier = threading.Barrier(2)

        def dozer(barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                sleep.doze(Sandbox.objects.get(pk=sandbox.pk))
            finally:
                connection.close()

        def waker(barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                for _ in range(3):
                    list(actions.wake_sandbox(Sandbox.objects.get(pk=sandbox.pk)))
            finally:
                connection.close()

        threads = [threading.Thread(target=dozer), threading.Thread(target=waker)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        sandbox.refresh_from_db()
        frozen = fake.is_frozen(sandbox.slug)
        assert (sandbox.state, frozen) in ((State.RUNNING, False), (State.DOZING, True))
        if sandbox.state == State.DOZING:
            list(actions.wake_sandbox(sandbox))


@pytest.mark.django_db
def test_an_agent_whose_own_job_is_imminent_stays_up_instead_of_dozing(
    fake: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sandboxes.openclaw import cron

    sandbox = running("cronsoon@example.com")
    soon = timezone.now() + timedelta(seconds=90)
    monkeypatch.setattr(cron, "next_job_at", lambda sandbox: soon)
    with later(70):  # idle long enough to doze, but the job is due within the wake lead
        assert tasks.sleep_idle_sandboxes()["dozed"] == 0
        assert sleep.hibernate(sandbox) == ""
    sandbox.refresh_from_db()
    assert sandbox.state == State.RUNNING and sandbox.next_job_at == soon
    assert not fake.is_frozen(sandbox.slug)

    later_job = timezone.now() + timedelta(hours=3)
    monkeypatch.setattr(cron, "next_job_at", lambda sandbox: later_job)
    with later(130):  # that job is past (and its gateway has no word of it running)
        assert tasks.sleep_idle_sandboxes()["dozed"] == 1
    sandbox.refresh_from_db()
    assert sandbox.state == State.DOZING and sandbox.next_job_at == later_job


@pytest.mark.django_db
def test_orphaned_checkpoint_images_are_swept_but_not_one_being_restored(
    fake: FakeBackend,
) -> None:
    deleted = running("deleted@example.com")
    waking = running("waking@example.com")
    kept = running("kept@example.com")
    for box in (deleted, waking, kept):
        assert sleep.hibernate(box) == "checkpointed"
    deleted_image = Checkpoint.objects.get(sandbox=deleted).location
    deleted.owner.delete()  # the rows go with the user; the image would stay behind
    waking_row = Checkpoint.objects.get(sandbox=waking)
    waking_row.delete()  # as take_checkpoint does while the restore reads the image
    Sandbox.objects.filter(pk=waking.pk).update(state=State.STARTING)
    with later(60):
        assert sleep.sweep_orphan_images() == 0  # too young: a dump may be writing its row
    with later(11 * 60):
        assert sleep.sweep_orphan_images() == 1
    images = fake.images()
    assert deleted_image not in images and waking_row.location in images
    assert Checkpoint.objects.get(sandbox=kept).location in images


@pytest.mark.django_db
def test_an_idle_pass_does_not_hibernate_an_agent_used_since_it_looked(
    fake: FakeBackend,
) -> None:
    sandbox = running("usedagain@example.com")
    with later(16 * 60):
        stale_view = timezone.now() - timedelta(minutes=15)
        actions.record_activity(sandbox)  # a chat frame after the pass read the rows
        assert sleep.hibernate(sandbox, idle_since=stale_view) == ""
    sandbox.refresh_from_db()
    assert sandbox.state == State.RUNNING and not Checkpoint.objects.exists()


@pytest.mark.django_db
def test_the_dozing_hint_is_up_before_the_agent_is_claimed_for_a_doze(
    fake: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = running("hint@example.com")
    seen: list[bool] = []
    claim = actions.transition

    def watching(box: Sandbox, to: str, **kwargs: Any) -> None:
        if to == State.DOZING:
            seen.append(sleep.is_dozing(box.pk))
        claim(box, to, **kwargs)

    monkeypatch.setattr(actions, "transition", watching)
    assert sleep.doze(sandbox)
    assert seen == [True]


@pytest.mark.django_db
def test_a_model_call_through_the_ai_gateway_keeps_the_agent_awake(fake: FakeBackend) -> None:
    sandbox = running("working@example.com")
    with later(50):
        sleep.note_model_call(sandbox.pk)  # what the AI gateway does on every call
    with later(70):  # 70 s after the last chat, 20 s after the agent's last model call
        assert tasks.sleep_idle_sandboxes()["dozed"] == 0
    with later(115):
        assert tasks.sleep_idle_sandboxes()["dozed"] == 1
