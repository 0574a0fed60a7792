"""Operator alerts: three failed starts in a row, or a failed backup, mail ADMINS once (not per
retry), and again only after the sandbox recovered; crashes are not failed starts."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import time_machine
from django.core import mail
from django.utils import timezone

from sandboxes import actions, alerts
from sandboxes.backends.fake import FakeBackend
from sandboxes.backups import tasks as backup_tasks
from sandboxes.models import BackupRepository, Sandbox
from tests.factories import make_user
from tests.fixtures.backend import volume_of
from tests.fixtures.backups import write_files

State = Sandbox.State
OPS = "ops@example.com"


@pytest.fixture(autouse=True)
def _admins(settings: Any) -> None:
    settings.ADMINS = [("Ops", OPS), ("Night shift", "night@example.com")]
    settings.HERMIT_START_RETRIES = 0  # one failed start per start_sandbox


@pytest.fixture
def fake(fake_backend: FakeBackend) -> FakeBackend:
    return fake_backend


def running(email: str) -> Sandbox:
    user = make_user(email)
    sandbox = Sandbox.objects.get(owner=user)
    Sandbox.objects.filter(pk=sandbox.pk).update(backend="fake")
    sandbox.refresh_from_db()
    actions.provision_sandbox(sandbox)
    sandbox.refresh_from_db()
    assert sandbox.state == State.RUNNING, sandbox.error_message
    return sandbox


def failing_start(fake: FakeBackend, sandbox: Sandbox) -> None:
    fake.fail_next(sandbox.slug, "start")
    list(actions.start_sandbox(sandbox, explicit=True))
    sandbox.refresh_from_db()
    assert sandbox.state == State.FAILED


@pytest.mark.django_db
def test_it_mails_the_operators_once_at_the_third_failed_start_in_a_row(
    fake: FakeBackend, settings: Any
) -> None:
    sandbox = running("starts@example.com")
    actions.stop_sandbox(sandbox)

    failing_start(fake, sandbox)
    failing_start(fake, sandbox)
    assert mail.outbox == []
    failing_start(fake, sandbox)
    assert len(mail.outbox) == 1
    for _ in range(3):  # the retries go on: no more mail
        failing_start(fake, sandbox)

    (message,) = mail.outbox
    assert message.to == [OPS, "night@example.com"]
    assert message.from_email == settings.SERVER_EMAIL
    assert message.subject == (f"[Hermit alert] Sandbox {sandbox} failed to start 3 times in a row")
    assert "start of" in message.body and "failed (planted by a test)" in message.body
    assert f"/admin/sandboxes/sandbox/{sandbox.pk}/change/" in message.body
    assert sandbox.events.filter(kind=alerts.ALERT_START).count() == 1


@pytest.mark.django_db
def test_it_alerts_again_only_after_the_sandbox_ran_again(fake: FakeBackend) -> None:
    sandbox = running("rearm@example.com")
    actions.stop_sandbox(sandbox)
    for _ in range(3):
        failing_start(fake, sandbox)
    assert len(mail.outbox) == 1

    list(actions.start_sandbox(sandbox, explicit=True))  # it runs again: re-armed
    sandbox.refresh_from_db()
    assert sandbox.state == State.RUNNING
    actions.stop_sandbox(sandbox)
    for _ in range(2):
        failing_start(fake, sandbox)
    assert len(mail.outbox) == 1  # a new streak of two is not three
    failing_start(fake, sandbox)
    assert len(mail.outbox) == 2


@pytest.mark.django_db
def test_it_does_not_count_crashes_as_failed_starts(fake: FakeBackend) -> None:
    sandbox = running("crashes@example.com")
    for _ in range(3):
        actions.fail(sandbox, "The gateway exited with code 1")  # running -> failed
        list(actions.start_sandbox(sandbox, explicit=True))
        sandbox.refresh_from_db()
        assert sandbox.state == State.RUNNING
    actions.fail(sandbox, "The gateway exited with code 1")
    assert mail.outbox == []


@pytest.mark.django_db
def test_it_sends_nothing_without_admins(fake: FakeBackend, settings: Any) -> None:
    settings.ADMINS = []
    sandbox = running("noadmins@example.com")
    actions.stop_sandbox(sandbox)
    for _ in range(3):
        failing_start(fake, sandbox)
    assert mail.outbox == []
    assert not sandbox.events.filter(kind=alerts.ALERT_START).exists()


@pytest.mark.django_db
def test_it_tries_again_at_the_next_failure_when_the_mail_cannot_be_sent(
    fake: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox = running("smtp@example.com")
    actions.stop_sandbox(sandbox)
    for _ in range(2):
        failing_start(fake, sandbox)

    def down(*args: Any, **kwargs: Any) -> int:
        raise ConnectionRefusedError("SMTP is down")

    monkeypatch.setattr(alerts, "send_mail", down)
    failing_start(fake, sandbox)
    assert not sandbox.events.filter(kind=alerts.ALERT_START).exists()
    monkeypatch.undo()
    failing_start(fake, sandbox)
    assert len(mail.outbox) == 1
    assert "4 times in a row" in mail.outbox[0].subject


@pytest.mark.django_db
def test_it_redacts_secrets_from_an_alert(fake: FakeBackend) -> None:
    sandbox = running("redact@example.com")
    leaked = "sk-ant-api03-" + "Q" * 40
    actions.stop_sandbox(sandbox)
    for _ in range(3):  # failed starts as reconcile ends a stuck one, with a secret in them
        actions.transition(sandbox, State.STARTING)
        actions.fail(sandbox, f"upstream refused key {leaked}")
    (message,) = mail.outbox
    assert leaked not in message.body and "sk-ant-[REDACTED]" in message.body


# -- backups -------------------------------------------------------------------------------


def _break(repo: BackupRepository) -> Callable[[], None]:
    """Hide the repository's keys (restic then fails); return what puts them back."""
    keys = Path(repo.location) / "keys"
    hidden = keys.with_name("keys.hidden")
    keys.rename(hidden)
    return lambda: hidden.rename(keys)


@pytest.mark.django_db
def test_it_mails_once_when_backups_fail_and_again_after_one_succeeded(
    data_sandbox: Callable[..., Sandbox], eager_backups: None
) -> None:
    sandbox = data_sandbox("backups@example.com", repository=True)
    repair = _break(BackupRepository.objects.get(sandbox=sandbox))
    t0 = timezone.now()

    with time_machine.travel(t0, tick=False):
        assert backup_tasks.backup_sandbox(sandbox.pk, "ops") == "failed"
    with time_machine.travel(t0 + timedelta(minutes=5), tick=False):
        assert backup_tasks.backup_sandbox(sandbox.pk, "ops") == "failed"  # a retry
    (message,) = mail.outbox
    assert message.subject == f"[Hermit alert] Backup of sandbox {sandbox} failed"
    assert "password does not open it" in message.body  # restic's failure, told

    repair()
    with time_machine.travel(t0 + timedelta(minutes=10), tick=False):
        assert backup_tasks.backup_sandbox(sandbox.pk, "ops") == "done"
    write_files(volume_of(sandbox), {"state/workspace/notes.md": "Ada is 3 years old.\n"})
    repair = _break(BackupRepository.objects.get(sandbox=sandbox))
    with time_machine.travel(t0 + timedelta(minutes=15), tick=False):
        assert backup_tasks.backup_sandbox(sandbox.pk, "ops") == "failed"
    assert len(mail.outbox) == 2
    repair()


@pytest.mark.django_db
def test_it_alerts_one_backup_failure_per_streak_without_a_repository(fake: FakeBackend) -> None:
    sandbox = running("norepo@example.com")
    assert alerts.backup_failed(sandbox, "Cannot reach the backup storage") is True
    assert alerts.backup_failed(sandbox, "Cannot reach the backup storage") is False
    assert len(mail.outbox) == 1
