"""When backups happen: the beat's scan per plan interval (time frozen), unchanged sandboxes
skipped, a backup after every stop or sleep, the lease that keeps two runs apart, exports that
expire, and a deleted sandbox's repository purged. Real restic on sandboxes whose data dir is
written by hand (no gateway: tests/test_backups.py has those). Only the first test's backup sets
its repository up with ``restic init`` (~3 s); the others that back up start with a copy of an
initialised empty one (``repository=True``)."""

from __future__ import annotations

import shutil
import tarfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import time_machine
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from portal.celery import app
from sandboxes import actions as sandbox_actions
from sandboxes.backups import actions, restic, storage, tasks
from sandboxes.models import BackupRepository, Export, Sandbox, SandboxEvent, Snapshot
from tests.fixtures.backend import volume_of
from tests.fixtures.backups import backup_plan, write_files

pytestmark = pytest.mark.django_db(transaction=True)
T0 = datetime(2026, 11, 23, 3, 0, tzinfo=UTC)
DAY, HOUR = timedelta(days=1), timedelta(hours=1)
MakeSandbox = Callable[..., Sandbox]


def repo_snapshots(sandbox: Sandbox) -> list[str]:
    row = BackupRepository.objects.get(sandbox=sandbox)
    return [s.id for s in restic.snapshots(actions.restic_repo(row))]


def test_it_backs_up_a_sandbox_once_its_plan_interval_has_passed(
    data_sandbox: MakeSandbox, eager_backups: None
) -> None:
    sandbox = data_sandbox("due@backups.test")
    with time_machine.travel(T0, tick=False):
        assert tasks.due_sandboxes(timezone.now()) == [sandbox]
        assert tasks.backup_due_sandboxes() == 1
        snapshot = sandbox.snapshots.get()
        assert snapshot.trigger == Snapshot.Trigger.SCHEDULE and snapshot.pause_ms is None
        assert BackupRepository.objects.get(sandbox=sandbox).last_attempt_at == T0
    with time_machine.travel(T0 + DAY - timedelta(minutes=1), tick=False):
        assert tasks.due_sandboxes(timezone.now()) == []
        assert tasks.backup_due_sandboxes() == 0
        assert tasks.backup_sandbox(sandbox.pk, "schedule") == "skipped"  # queued twice
    with time_machine.travel(T0 + DAY, tick=False):
        assert tasks.due_sandboxes(timezone.now()) == [sandbox]
    assert repo_snapshots(sandbox) == [snapshot.restic_id]


def test_it_skips_a_sandbox_unchanged_since_its_last_snapshot(
    data_sandbox: MakeSandbox, eager_backups: None
) -> None:
    sandbox = data_sandbox("unchanged@backups.test", repository=True)
    backup_plan(sandbox.owner, backup_keep_last=10)  # restic dates these today: keep both
    with time_machine.travel(T0, tick=False):
        assert tasks.backup_sandbox(sandbox.pk, "schedule") == "done"
    with time_machine.travel(T0 + DAY, tick=False):
        assert tasks.backup_sandbox(sandbox.pk, "schedule") == "unchanged"
        assert BackupRepository.objects.get(sandbox=sandbox).last_attempt_at == T0 + DAY
        assert sandbox.events.filter(kind="backup", message__startswith="Unchanged").exists()
        # A change only in what OpenClaw rebuilds (caches, logs) is no change.
        write_files(volume_of(sandbox), {"cache/more": "x", "logs/gateway.log": "y"})
    with time_machine.travel(T0 + 2 * DAY, tick=False):
        assert tasks.backup_sandbox(sandbox.pk, "schedule") == "unchanged"
        write_files(volume_of(sandbox), {"state/workspace/notes.md": "Ada is 3 years old.\n"})
    with time_machine.travel(T0 + 3 * DAY, tick=False):
        assert tasks.backup_sandbox(sandbox.pk, "schedule") == "done"
    assert sandbox.snapshots.count() == 2
    assert len(repo_snapshots(sandbox)) == 2


def test_each_plan_has_its_own_interval(data_sandbox: MakeSandbox, eager_backups: None) -> None:
    free = data_sandbox("free@backups.test", repository=True)
    pro = data_sandbox("pro@backups.test", repository=True)
    never = data_sandbox("never@backups.test")
    backup_plan(pro.owner, backup_interval=HOUR)
    backup_plan(never.owner, backup_interval=None)
    with time_machine.travel(T0, tick=False):
        assert tasks.due_sandboxes(timezone.now()) == [free, pro]
        assert tasks.backup_due_sandboxes() == 2
    with time_machine.travel(T0 + HOUR, tick=False):
        assert tasks.due_sandboxes(timezone.now()) == [pro]
    with time_machine.travel(T0 + DAY, tick=False):
        assert tasks.due_sandboxes(timezone.now()) == [free, pro]
    assert not never.snapshots.exists()


def test_the_standard_plans_back_up_as_the_design_says() -> None:
    from billing.models import Plan, ensure_standard_plans

    ensure_standard_plans()
    free, pro = Plan.objects.get(slug="free"), Plan.objects.get(slug="pro")
    assert (free.backup_interval, free.backup_keep_last, free.backup_keep_daily) == (DAY, 0, 7)
    assert (pro.backup_interval, pro.backup_keep_last, pro.backup_keep_daily) == (HOUR, 24, 7)
    assert (free.backup_keep_weekly, pro.backup_keep_weekly) == (0, 4)


def test_only_settled_sandboxes_with_data_are_scheduled(data_sandbox: MakeSandbox) -> None:
    starting = data_sandbox("starting@backups.test", state="starting")
    restoring = data_sandbox("restoring@backups.test", state="restoring")
    gone = data_sandbox("gone@backups.test", state="sleeping")
    shutil.rmtree(volume_of(gone))  # a new disk, say: the next start restores it
    with time_machine.travel(T0, tick=False):
        assert tasks.due_sandboxes(timezone.now()) == []
    with pytest.raises(actions.BackupBusy, match="starting"):
        actions.backup_sandbox(starting, trigger="staff")
    with pytest.raises(actions.BackupBusy, match="restoring"):
        actions.backup_sandbox(restoring, trigger="staff")
    with pytest.raises(actions.BackupFailed, match="no data"):
        actions.backup_sandbox(gone, trigger="staff")


def test_the_beat_runs_the_scan() -> None:
    entry = settings.CELERY_BEAT_SCHEDULE["backup-due-sandboxes"]
    assert entry["task"] == tasks.backup_due_sandboxes.name
    assert entry["task"] in app.tasks


def test_a_stop_queues_a_backup_once_it_has_committed(
    data_sandbox: MakeSandbox, eager_backups: None
) -> None:
    sandbox = data_sandbox("stop@backups.test", state="failed", repository=True)
    with transaction.atomic():
        sandbox_actions.stop_sandbox(sandbox)
        assert sandbox.state == Sandbox.State.STOPPED
        assert not sandbox.snapshots.exists()  # nothing before the commit
    assert sandbox.snapshots.get().trigger == Snapshot.Trigger.STOP


def test_a_sleep_backup_is_dropped_once_the_agent_runs_again(data_sandbox: MakeSandbox) -> None:
    sandbox = data_sandbox("woke@backups.test", state="running")
    assert tasks.backup_sandbox(sandbox.pk, "sleep") == "skipped"
    assert tasks.backup_sandbox(sandbox.pk, "stop") == "skipped"
    assert tasks.backup_sandbox(999_999_999, "user") == "skipped"
    assert not sandbox.snapshots.exists()


def test_a_held_lease_makes_a_second_backup_busy_until_reconcile_recovers_it(
    data_sandbox: MakeSandbox,
) -> None:
    sandbox = data_sandbox("lease@backups.test", repository=True)
    held = actions.claim_lease(actions.repository_for(sandbox), "restore")
    with pytest.raises(actions.BackupBusy, match="A restore of this agent is already running"):
        actions.backup_sandbox(sandbox, trigger="user")
    assert tasks.backup_sandbox(sandbox.pk, "user") == "busy"
    assert not sandbox.events.filter(kind="backup").exists()  # nobody asked: nothing to tell
    # A person who asked is told why their backup did not start (the page stops waiting).
    assert tasks.backup_sandbox(sandbox.pk, "user", sandbox.owner_id) == "busy"
    told = sandbox.events.filter(kind="backup").first()
    assert told is not None and told.actor_user_id == sandbox.owner_id
    assert told.message == "Not started: A restore of this agent is already running; " + (
        "try again when it has finished."
    )
    # Its worker died: the lease is not renewed, and once it has run out it marks work to
    # finish, which only reconcile takes over; until then everyone else is still busy.
    held._stop.set()
    after = timezone.now() + timedelta(seconds=settings.HERMIT_BACKUP_LEASE_SECONDS + 1)
    with time_machine.travel(after, tick=False):
        with pytest.raises(actions.BackupBusy, match=r"interrupted restore .* being recovered"):
            actions.backup_sandbox(sandbox, trigger="user")
        with pytest.raises(actions.BackupBusy, match="being recovered"):
            actions.claim_lease(actions.repository_for(sandbox), "export")
        assert actions.reconcile_backups(sandbox) == "restore-recovered"
        row = BackupRepository.objects.get(sandbox=sandbox)
        assert (row.lock_token, row.lock_kind, row.locked_until) == ("", "", None)
        snapshot = actions.backup_sandbox(sandbox, trigger="user")
    assert snapshot is not None
    row = BackupRepository.objects.get(sandbox=sandbox)
    assert (row.lock_token, row.lock_kind, row.locked_until) == ("", "", None)
    actions.release_lease(held)  # releases nothing: its token is gone
    assert BackupRepository.objects.get(sandbox=sandbox).lock_token == ""


def test_an_export_is_a_tar_of_the_snapshot_that_expires(
    data_sandbox: MakeSandbox, eager_backups: None
) -> None:
    sandbox = data_sandbox("export@backups.test", repository=True)
    snapshot = actions.backup_sandbox(sandbox, trigger="user")
    assert snapshot is not None
    export = actions.export_snapshot(sandbox, actor_user=sandbox.owner)
    assert export.state == Export.State.READY and export.snapshot == snapshot
    assert export.expires_at is not None
    assert export.expires_at - export.created_at == timedelta(seconds=settings.HERMIT_EXPORT_TTL)
    path = Path(storage.export_storage().path(export.storage_name))
    with tarfile.open(path, "r:gz") as archive:
        names = archive.getnames()
        notes = archive.extractfile("data/state/workspace/notes.md")
        assert notes is not None and notes.read() == b"The user's cat is called Ada.\n"
    assert "data/cache/junk" not in names  # caches are not backed up
    event = sandbox.events.filter(kind="export").first()
    assert event is not None and event.actor == SandboxEvent.Actor.USER
    with time_machine.travel(export.expires_at + timedelta(seconds=1), tick=False):
        tasks.backup_due_sandboxes()
    assert not Export.objects.filter(pk=export.pk).exists()
    assert not path.exists()


def test_a_deleted_sandbox_takes_its_backups_with_it(
    data_sandbox: MakeSandbox, eager_backups: None
) -> None:
    sandbox = data_sandbox("deleted@backups.test", repository=True)
    actions.backup_sandbox(sandbox, trigger="user")
    location = Path(BackupRepository.objects.get(sandbox=sandbox).location)
    assert (location / "config").is_file()
    sandbox.owner.delete()
    assert not location.exists()


def test_a_step_inside_a_restore_moves_the_bar_only_within_its_own_span(
    data_sandbox: MakeSandbox,
) -> None:
    sandbox = data_sandbox("span@backups.test")
    seen: list[int] = []
    outer = actions._Reporter(sandbox, "restore", "user", None, lambda p, _m: seen.append(p))
    inner = outer.quiet(62, 74)  # the pre-restore backup, between "backing up" and "swapping"
    inner.tick("reading", 0)
    inner.scaled(10, 90)(50.0, "half")
    inner.event("done", 100)
    assert seen == [62, 68, 74]
    assert not sandbox.events.filter(kind="restore").exists()  # ticks only, no events


def test_free_plan_retention_keeps_the_latest_pre_restore_snapshots(
    data_sandbox: MakeSandbox,
) -> None:
    # free: keep_daily 7, one a day
    sandbox = data_sandbox("pre-restore@backups.test", repository=True)
    pre = actions.backup_sandbox(sandbox, trigger=Snapshot.Trigger.PRE_RESTORE, force=True)
    assert pre is not None
    latest: list[str] = []
    for n in range(3):  # the sleeps and schedules of the same day
        write_files(volume_of(sandbox), {"state/workspace/notes.md": f"version {n}\n"})
        slept = actions.backup_sandbox(sandbox, trigger=Snapshot.Trigger.SLEEP)
        assert slept is not None
        latest.append(slept.restic_id)
    assert sorted(repo_snapshots(sandbox)) == sorted([pre.restic_id, latest[-1]])
    kept = sandbox.snapshots.filter(trigger=Snapshot.Trigger.PRE_RESTORE)
    assert list(kept.values_list("restic_id", flat=True)) == [pre.restic_id]

    pres = [pre.restic_id]
    for _ in range(3):  # unchanged data, but a restore's backup is always taken
        again = actions.backup_sandbox(sandbox, trigger=Snapshot.Trigger.PRE_RESTORE, force=True)
        assert again is not None
        pres.append(again.restic_id)
    write_files(volume_of(sandbox), {"state/workspace/notes.md": "version last\n"})
    last = actions.backup_sandbox(sandbox, trigger=Snapshot.Trigger.SCHEDULE)
    assert last is not None
    assert sorted(repo_snapshots(sandbox)) == sorted([*pres[-3:], last.restic_id])
    assert sorted(kept.values_list("restic_id", flat=True)) == sorted(pres[-3:])
