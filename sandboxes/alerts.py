"""Operator alerts by email (to settings.ADMINS): a sandbox that failed to start several times
in a row, and a sandbox whose backup failed. Each is sent once per streak, not per retry.

Contract: ``start_failed(sandbox)`` is called after a sandbox was moved to failed (by a start,
or anything else: a crash is not a failed start and never counts); it emails when the
sandbox's failed starts since it last ran reach ``START_FAILURES``. ``backup_failed(sandbox,
reason)`` is called after a backup failed; it emails unless this sandbox's backups were already
alerted and none has succeeded since. Both return True if they sent the mail.

The record of a sent alert is a SandboxEvent (kind ``alert-start`` or ``alert-backup``),
written while the sandbox's row is locked (``select_for_update``), so two workers failing at
once send one mail. The alert re-arms after recovery: a start alert once the sandbox has run
again (a ``running`` state event after it), a backup alert once a backup succeeded after it
(``BackupRepository.last_backup_at``). A mail that cannot be sent is logged and its record
removed, so the next failure tries again. Without ADMINS nothing is recorded or sent; the
failure is only logged. Texts are redacted (portal.lib.redact): errors may quote secrets.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction

from portal.lib.redact import redact
from sandboxes.models import BackupRepository, Sandbox, SandboxEvent

log = logging.getLogger(__name__)

START_FAILURES = 3
ALERT_START = "alert-start"
ALERT_BACKUP = "alert-backup"
SUBJECT_PREFIX = "[Hermit alert] "


def start_failed(sandbox: Sandbox) -> bool:
    """Email the operators if ``sandbox`` has now failed START_FAILURES starts in a row."""
    if not settings.ADMINS:
        return False
    with transaction.atomic():
        locked = Sandbox.objects.select_for_update().filter(pk=sandbox.pk).first()
        if locked is None:
            return False
        failures = _failed_starts_since_it_ran(locked)
        if failures is None or failures < START_FAILURES:
            return False
        alert = SandboxEvent.objects.create(
            sandbox=locked,
            kind=ALERT_START,
            state=locked.state,
            message=f"Operators alerted: {failures} failed starts in a row",
        )
    subject = f"Sandbox {locked} failed to start {failures} times in a row"
    body = (
        f"The sandbox {locked} (id {locked.pk}) failed to start {failures} times in a row.\n\n"
        f"Last error:\n{locked.error_message or '(none recorded)'}\n\n"
        f"Its page: {_admin_url(locked)}\n"
        "You will not be told again until it has run."
    )
    return _send(alert, subject, body)


def _failed_starts_since_it_ran(sandbox: Sandbox) -> int | None:
    """Return the failed starts after the sandbox last ran, or None if they were alerted."""
    last_ran = (
        SandboxEvent.objects.filter(sandbox=sandbox, kind="state", state=Sandbox.State.RUNNING)
        .order_by("-id")
        .values_list("id", flat=True)
        .first()
    )
    since = SandboxEvent.objects.filter(
        sandbox=sandbox, kind__in=("state", ALERT_START), id__gt=last_ran or 0
    ).order_by("id")
    failures, previous = 0, Sandbox.State.RUNNING.value
    for kind, state in since.values_list("kind", "state"):
        if kind == ALERT_START:
            return None
        if state == Sandbox.State.FAILED and previous == Sandbox.State.STARTING:
            failures += 1
        previous = state
    return failures


def backup_failed(sandbox: Sandbox, reason: str) -> bool:
    """Email the operators that a backup of ``sandbox`` failed, once until one succeeds."""
    if not settings.ADMINS:
        return False
    with transaction.atomic():
        locked = Sandbox.objects.select_for_update().filter(pk=sandbox.pk).first()
        if locked is None:
            return False
        alerted = (
            SandboxEvent.objects.filter(sandbox=locked, kind=ALERT_BACKUP)
            .order_by("-id")
            .values_list("created_at", flat=True)
            .first()
        )
        if alerted is not None:
            succeeded = (
                BackupRepository.objects.filter(sandbox=locked)
                .values_list("last_backup_at", flat=True)
                .first()
            )
            if succeeded is None or succeeded <= alerted:
                return False
        alert = SandboxEvent.objects.create(
            sandbox=locked,
            kind=ALERT_BACKUP,
            state=locked.state,
            message="Operators alerted: a backup failed",
        )
    subject = f"Backup of sandbox {locked} failed"
    body = (
        f"A backup of the sandbox {locked} (id {locked.pk}) failed:\n{reason}\n\n"
        f"Its page: {_admin_url(locked)}\n"
        "You will not be told again until one of its backups has succeeded."
    )
    return _send(alert, subject, body)


def _admin_url(sandbox: Sandbox) -> str:
    return f"{settings.SITE_URL}/admin/sandboxes/sandbox/{sandbox.pk}/change/"


def _send(alert: SandboxEvent, subject: str, body: str) -> bool:
    """Mail the operators; if that fails, forget the alert so the next failure tries again."""
    subject, body = redact(subject), redact(body)
    log.warning("alert: %s", subject)
    recipients = [address for _, address in settings.ADMINS]
    try:
        send_mail(SUBJECT_PREFIX + subject, body, settings.SERVER_EMAIL, recipients)
    except Exception:  # the mail backend's own errors (SMTP down)
        log.exception("alert: could not mail the operators; the next failure tries again")
        SandboxEvent.objects.filter(pk=alert.pk).delete()
        return False
    return True
