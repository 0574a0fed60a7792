"""Ops CLI: ``manage.py snapshots USER``: list a user's sandbox's snapshots, newest first.

The list is read from the repository (the truth) and the rows synced with it; if a backup or
restore holds the repository, the rows as they are, with a note on stderr.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from sandboxes.backups import actions
from sandboxes.management.commands.backup import find_sandbox
from sandboxes.models import BackupRepository


class Command(BaseCommand):
    help = "List the snapshots of a user's sandbox (email or username), newest first."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("user", help="email or username")
        parser.add_argument("--name", default="default", help="sandbox name")

    def handle(self, *args: Any, **opts: Any) -> None:
        sandbox = find_sandbox(opts["user"], opts["name"])
        if not BackupRepository.objects.filter(sandbox=sandbox).exists():
            self.stdout.write(f"{sandbox} has no backups yet.")
            return
        try:
            snapshots = actions.sync_snapshots(sandbox)
        except actions.BackupBusy as exc:
            self.stderr.write(f"Showing the last known list: {exc}")
            snapshots = list(sandbox.snapshots.all())
        except actions.BackupFailed as exc:
            raise CommandError(f"Cannot read {sandbox}'s backups: {exc}") from exc
        if not snapshots:
            self.stdout.write(f"{sandbox} has no snapshots.")
            return
        self.stdout.write(
            f"{'ID':<10}{'TAKEN (UTC)':<21}{'TRIGGER':<13}{'FILES':>7}{'SIZE MB':>10}"
            f"{'NEW MB':>9}{'PAUSE MS':>10}"
        )
        for s in snapshots:
            pause = "" if s.pause_ms is None else str(s.pause_ms)
            self.stdout.write(
                f"{s.short_id:<10}{s.taken_at:%Y-%m-%d %H:%M:%S}  {s.trigger:<13}{s.files:>7}"
                f"{s.size_bytes / 1e6:>10.1f}{s.added_bytes / 1e6:>9.2f}{pause:>10}"
            )
