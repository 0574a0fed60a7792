"""What keeps backups honest after the fact: a sandbox whose first backup failed before it
was recorded is still due, storage failures are readable, a killed restore is not run again
an hour later, and the weekly check of every repository reports damage. Real restic on
sandboxes whose data dir is written by hand (no gateway); where a test is not about a first
backup, its sandbox starts with an initialised repository (``repository=True``)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import time_machine
from django.utils import timezone

from billing.models import plan_for
from portal.celery import app
from sandboxes.backups import actions, tasks
from sandboxes.models import BackupRepository, Export, Sandbox, SandboxEvent, Snapshot
from tests.fixtures.backend import volume_of
from tests.fixtures.backups import write_files
from tests.net import free_port

pytestmark = pytest.mark.django_db(transaction=True)
MakeSandbox = Callable[..., Sandbox]


def test_a_sandbox_whose_first_attempt_was_never_recorded_is_due(
    data_sandbox: MakeSandbox, eager_backups: None
) -> None:
    sandbox = data_sandbox("first-failed@checks.test")
    # What a first backup that failed while setting up its lease leaves: a row, no attempt.
    row = actions.repository_for(sandbox)
    assert row.last_attempt_at is None and row.initialized_at is None
    assert tasks.due_sandboxes(timezone.now()) == [sandbox]
    assert tasks.backup_due_sandboxes() == 1
    assert sandbox.snapshots.get().trigger == Snapshot.Trigger.SCHEDULE
    assert tasks.due_sandboxes(timezone.now()) == []


def test_an_unreachable_bucket_is_a_readable_failure_and_tried_again(
    data_sandbox: MakeSandbox, settings: Any
) -> None:
    sandbox = data_sandbox("no-bucket@checks.test")
    settings.HERMIT_BACKUP_S3_BUCKET = "hermit-nowhere"
    settings.HERMIT_BACKUP_S3_ENDPOINT = f"http://127.0.0.1:{free_port()}"  # nothing listens
    settings.HERMIT_BACKUP_S3_ACCESS_KEY_ID = "AKIAHERMITTEST0000009"
    settings.HERMIT_BACKUP_S3_SECRET_ACCESS_KEY = "hermit-nowhere-secret-0000000000"
    assert tasks.backup_sandbox(sandbox.pk, Snapshot.Trigger.SCHEDULE) == "failed"
    event = SandboxEvent.objects.filter(sandbox=sandbox, kind="backup").latest("pk")
    assert "Cannot reach the backup storage" in event.message
    assert "hermit-nowhere-secret" not in event.message
    assert SandboxEvent.objects.filter(sandbox=sandbox, kind="backup").count() == 1
    attempted = BackupRepository.objects.get(sandbox=sandbox).last_attempt_at
    assert attempted is not None  # the failed attempt counts: no retry storm every scan
    assert sandbox.snapshots.count() == 0
    assert tasks.due_sandboxes(timezone.now()) == []
    interval = plan_for(sandbox.owner).backup_interval
    assert interval is not None
    later = attempted + interval + timedelta(seconds=1)
    assert tasks.due_sandboxes(later) == [sandbox]  # tried again at the plan's interval


def sent(task: Any, *args: Any) -> tuple[list[Any], dict[str, Any]]:
    """Send ``task(*args)`` through the real broker (Redis) to a queue no worker reads, and
    return the (args, kwargs) of the message as a worker would receive it."""
    queue = f"hermit-test-{uuid.uuid4().hex[:12]}"
    task.apply_async(args, queue=queue)
    with app.connection_for_read() as connection:
        simple = connection.SimpleQueue(queue)
        try:
            message = simple.get(timeout=10)
            message.ack()
            body = message.decode()
        finally:
            simple.queue.delete()
            simple.close()
    return list(body[0]), dict(body[1])


def test_a_restore_redelivered_after_a_killed_worker_is_refused_not_run(
    data_sandbox: MakeSandbox, settings: Any
) -> None:
    sandbox = data_sandbox("stale-restore@checks.test", repository=True)
    actions.backup_sandbox(sandbox, trigger=Snapshot.Trigger.USER, actor_user=sandbox.owner)
    write_files(volume_of(sandbox), {"state/workspace/notes.md": "Newer than the snapshot.\n"})
    args, kwargs = sent(tasks.restore_sandbox, sandbox.pk, None, sandbox.owner.pk)
    assert set(kwargs) == {"requested_at"}
    # Redis hands an unacknowledged message out again after its visibility timeout (1 h).
    with time_machine.travel(timezone.now() + timedelta(hours=1), tick=True):
        assert tasks.restore_sandbox(*args, **kwargs) == "stale"
    event = SandboxEvent.objects.filter(sandbox=sandbox, kind="restore").latest("pk")
    assert event.message.startswith("Not started: it was asked for too long ago")
    assert event.actor_user == sandbox.owner
    assert (volume_of(sandbox) / "state/workspace/notes.md").read_text() == (
        "Newer than the snapshot.\n"
    )
    sandbox.refresh_from_db()
    assert sandbox.state == Sandbox.State.STOPPED


def test_an_export_runs_while_fresh_and_is_refused_once_stale(
    data_sandbox: MakeSandbox, settings: Any
) -> None:
    settings.HERMIT_BACKUP_REQUEST_MAX_AGE = 600
    sandbox = data_sandbox("stale-export@checks.test", repository=True)
    actions.backup_sandbox(sandbox, trigger=Snapshot.Trigger.USER, actor_user=sandbox.owner)
    args, kwargs = sent(tasks.export_snapshot, sandbox.pk, None, sandbox.owner.pk)
    with time_machine.travel(timezone.now() + timedelta(minutes=11), tick=True):
        assert tasks.export_snapshot(*args, **kwargs) is None
    assert not Export.objects.filter(sandbox=sandbox).exists()
    with time_machine.travel(timezone.now() + timedelta(minutes=9), tick=True):
        pk = tasks.export_snapshot(*args, **kwargs)
    assert Export.objects.get(pk=pk).state == Export.State.READY


def damage_biggest_pack(sandbox: Sandbox) -> None:
    row = BackupRepository.objects.get(sandbox=sandbox)
    packs = [p for p in (Path(row.location) / "data").rglob("*") if p.is_file()]
    biggest = max(packs, key=lambda p: p.stat().st_size)
    biggest.chmod(0o600)
    with biggest.open("r+b") as handle:
        handle.seek(biggest.stat().st_size // 2)
        handle.write(b"\0" * 64)


def test_the_weekly_check_reports_a_damaged_pack_and_passes_a_good_repository(
    data_sandbox: MakeSandbox, eager_backups: None, settings: Any
) -> None:
    good = data_sandbox("check-good@checks.test", repository=True)
    bad = data_sandbox(
        "check-bad@checks.test",
        files={"state/workspace/blob.bin": os.urandom(300_000)},
        repository=True,
    )
    never = data_sandbox("check-never@checks.test")  # never backed up: nothing to check
    for sandbox in (good, bad):
        actions.backup_sandbox(sandbox, trigger=Snapshot.Trigger.SCHEDULE)
    damage_biggest_pack(bad)
    settings.HERMIT_BACKUP_CHECK_SUBSET = "100%"
    assert tasks.check_backups() == 2
    ok = SandboxEvent.objects.get(sandbox=good, kind="backup-check")
    assert ok.message.startswith("Backup repository checked, reading 100% of its data: no damage")
    damaged = SandboxEvent.objects.get(sandbox=bad, kind="backup-check")
    assert "found damage" in damaged.message and "damaged" in damaged.message
    assert not SandboxEvent.objects.filter(sandbox=never, kind="backup-check").exists()
    assert not BackupRepository.objects.filter(sandbox=never).exists()
    for sandbox in (good, bad):  # the lease is released
        assert BackupRepository.objects.get(sandbox=sandbox).lock_token == ""
    assert tasks.check_backup(bad.pk) == "damaged"
    settings.HERMIT_BACKUP_CHECK_SUBSET = "10%"  # the default: a random tenth
    assert tasks.check_backup(good.pk) == "ok"


def test_a_check_skips_a_repository_whose_lease_is_held(data_sandbox: MakeSandbox) -> None:
    sandbox = data_sandbox("check-busy@checks.test", repository=True)
    actions.backup_sandbox(sandbox, trigger=Snapshot.Trigger.SCHEDULE)
    with actions.leased(sandbox, "restore"):
        assert tasks.check_backup(sandbox.pk) == "busy"
    assert not SandboxEvent.objects.filter(sandbox=sandbox, kind="backup-check").exists()
    assert tasks.check_backup(sandbox.pk) == "ok"


def test_settings_refuse_a_relative_backup_dir(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HERMIT_BACKUP_DIR"}
    env.update(
        DJANGO_SETTINGS_MODULE="portal.settings",
        DEBUG="True",
        HERMIT_DATA_DIR=str(tmp_path),
        HERMIT_BACKUP_DIR="backups",
    )
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "HERMIT_BACKUP_DIR must be an absolute path" in result.stderr
