"""What keeps backups honest after the fact: a sandbox whose first backup failed before it
was recorded is still due, storage failures are readable, a killed restore is not run again
an hour later, and the weekly check of every repository reports damage. Real restic on
sandboxes whose data dir is written by hand (no gateway)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.utils import timezone

from sandboxes.backups import actions, tasks
from sandboxes.models import BackupRepository, Sandbox, SandboxEvent, Snapshot
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
