"""Ops CLI: ``manage.py restore USER [--snapshot ID]``: restore a user's sandbox.

ID is a snapshot's restic id, full or short (``manage.py snapshots USER`` lists them); the
default is the latest. The restore goes into a fresh directory, is verified, swapped in, and
the agent cold boots; the previous data is kept until it answers, and put back if it does not.
Progress on stderr; a non-zero exit with the reason if the restore failed.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from sandboxes.backups import actions
from sandboxes.management.commands.backup import describe, find_sandbox, progress_bar
from sandboxes.models import Sandbox, Snapshot


def find_snapshot(sandbox: Sandbox, wanted: str) -> Snapshot:
    """Return the sandbox's snapshot whose restic id is ``wanted`` or starts with it (at
    least 8 characters, restic's short id), looking in the repository if the rows lack it."""
    wanted = wanted.strip().lower()
    if len(wanted) < 8:
        raise CommandError(f"Give at least 8 characters of the snapshot id, not {wanted!r}.")
    for attempt in range(2):
        found = list(sandbox.snapshots.filter(restic_id__startswith=wanted)[:2])
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise CommandError(f"{wanted} matches several snapshots; give more of its id.")
        if attempt == 0:
            try:
                actions.sync_snapshots(sandbox)
            except (actions.BackupBusy, actions.BackupFailed) as exc:
                raise CommandError(f"Cannot list {sandbox}'s snapshots: {exc}") from exc
    raise CommandError(f"{sandbox} has no snapshot {wanted} (see `manage.py snapshots`).")


class Command(BaseCommand):
    help = "Restore a user's sandbox from a snapshot (default: the latest)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("user", help="email or username")
        parser.add_argument("--snapshot", metavar="ID", help="restic snapshot id, full or short")
        parser.add_argument("--name", default="default", help="sandbox name")

    def handle(self, *args: Any, **opts: Any) -> None:
        sandbox = find_sandbox(opts["user"], opts["name"])
        snapshot = find_snapshot(sandbox, opts["snapshot"]) if opts["snapshot"] else None
        snapshot = snapshot or sandbox.snapshots.first()
        if snapshot is None:
            raise CommandError(f"{sandbox} has no snapshots to restore.")
        try:
            with progress_bar(self.stderr, f"restore {sandbox}") as on_progress:
                actions.restore_sandbox(
                    sandbox, snapshot, actor=actions.Actor.STAFF, on_progress=on_progress
                )
        except (actions.BackupBusy, actions.BackupFailed) as exc:
            raise CommandError(f"Restore of {sandbox} failed: {exc}") from exc
        sandbox.refresh_from_db()
        self.stdout.write(f"{sandbox}: restored {describe(snapshot)}; it is {sandbox.state}")
