"""What keeps backups honest after the fact: a sandbox whose first backup failed before it
was recorded is still due, storage failures are readable, a killed restore is not run again
an hour later, and the weekly check of every repository reports damage. Real restic on
sandboxes whose data dir is written by hand (no gateway)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import time_machine
from django.utils import timezone

from portal.celery import app
from sandboxes.backups import actions, tasks
from sandboxes.models import BackupRepository, Export, Sandbox, SandboxEvent, Snapshot
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
    assert BackupRepository.objects.get(sandbox=sandbox).last_attempt_at is None
    assert sandbox.snapshots.count() == 0
    assert tasks.due_sandboxes(timezone.now()) == [sandbox]  # the next scan tries again


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
    sandbox = data_sandbox("stale-restore@checks.test")
    actions.backup_sandbox(sandbox, trigger=Snapshot.Trigger.USER, actor_user=sandbox.owner)
    write_files(sandbox.data_dir, {"state/workspace/notes.md": "Newer than the snapshot.\n"})
    args, kwargs = sent(tasks.restore_sandbox, sandbox.pk, None, sandbox.owner.pk)
    assert set(kwargs) == {"requested_at"}
    # Redis hands an unacknowledged message out again after its visibility timeout (1 h).
    with time_machine.travel(timezone.now() + timedelta(hours=1), tick=True):
        assert tasks.restore_sandbox(*args, **kwargs) == "stale"
    event = SandboxEvent.objects.filter(sandbox=sandbox, kind="restore").latest("pk")
    assert event.message.startswith("Not started: it was asked for too long ago")
    assert event.actor_user == sandbox.owner
    assert (sandbox.data_dir / "state/workspace/notes.md").read_text() == (
        "Newer than the snapshot.\n"
    )
    sandbox.refresh_from_db()
    assert sandbox.state == Sandbox.State.STOPPED


def test_an_export_runs_while_fresh_and_is_refused_once_stale(
    data_sandbox: MakeSandbox, settings: Any
) -> None:
    settings.HERMIT_BACKUP_REQUEST_MAX_AGE = 600
    sandbox = data_sandbox("stale-export@checks.test")
    actions.backup_sandbox(sandbox, trigger=Snapshot.Trigger.USER, actor_user=sandbox.owner)
    args, kwargs = sent(tasks.export_snapshot, sandbox.pk, None, sandbox.owner.pk)
    with time_machine.travel(timezone.now() + timedelta(minutes=11), tick=True):
        assert tasks.export_snapshot(*args, **kwargs) is None
    assert not Export.objects.filter(sandbox=sandbox).exists()
    with time_machine.travel(timezone.now() + timedelta(minutes=9), tick=True):
        pk = tasks.export_snapshot(*args, **kwargs)
    assert Export.objects.get(pk=pk).state == Export.State.READY
