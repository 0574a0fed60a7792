"""Ops CLI: ``manage.py backup USER|--all [--force]``: back up users' sandboxes now.

USER is an email address or username. Progress bars go to stderr, one line per result to
stdout; the exit status is non-zero if any backup failed (or was busy), with the reason.
The other backup commands (``restore``, ``snapshots``) share the helpers here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any, cast

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser, OutputWrapper
from django.db.models import Q
from tqdm import tqdm

from sandboxes.backups import actions
from sandboxes.backups.actions import ProgressFn
from sandboxes.models import Sandbox, Snapshot

BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar:24}| {postfix}"


def find_sandbox(who: str, name: str = "default") -> Sandbox:
    """Return the sandbox ``name`` of the user whose email or username is ``who``."""
    user = get_user_model().objects.filter(Q(email__iexact=who) | Q(username=who)).first()
    if user is None:
        raise CommandError(f"No user {who!r}.")
    sandbox = Sandbox.objects.filter(owner=user, name=name).select_related("owner").first()
    if sandbox is None:
        raise CommandError(f"{who} has no sandbox called {name!r}.")
    return sandbox


@contextmanager
def progress_bar(stderr: OutputWrapper, label: str) -> Iterator[ProgressFn]:
    """Yield an ``on_progress(percent, message)`` that draws a tqdm bar on ``stderr``."""
    stream = cast(IO[str], stderr._out)  # the stream itself: the wrapper adds newlines
    bar = tqdm(total=100, desc=label, file=stream, bar_format=BAR_FORMAT, leave=True)

    def update(percent: int, message: str) -> None:
        bar.n = max(0, min(100, percent))
        bar.set_postfix_str(message, refresh=False)
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()


def describe(snapshot: Snapshot) -> str:
    pause = f", paused {snapshot.pause_ms} ms" if snapshot.pause_ms is not None else ""
    return (
        f"snapshot {snapshot.short_id} of {snapshot.taken_at:%Y-%m-%d %H:%M:%S} UTC: "
        f"{snapshot.files} files, {snapshot.size_bytes / 1e6:.1f} MB, "
        f"{snapshot.added_bytes / 1e6:.2f} MB new{pause}"
    )


class Command(BaseCommand):
    help = "Back up a user's sandbox (or every sandbox) now. USER is an email or username."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("user", nargs="?")
        parser.add_argument("--all", action="store_true", help="every sandbox that has data")
        parser.add_argument("--name", default="default", help="sandbox name")
        parser.add_argument(
            "--force", action="store_true", help="back up even if unchanged since the last one"
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        if opts["all"] == bool(opts["user"]):
            raise CommandError("Give a USER (email or username) or --all, not both.")
        if opts["all"]:
            sandboxes = [
                s
                for s in Sandbox.objects.select_related("owner").order_by("pk")
                if actions.has_data(s)
            ]
        else:
            sandboxes = [find_sandbox(opts["user"], opts["name"])]
        failures = [
            f"{sandbox}: {error}"
            for sandbox in sandboxes
            if (error := self._backup(sandbox, force=opts["force"])) is not None
        ]
        if failures:
            raise CommandError(
                f"{len(failures)} of {len(sandboxes)} backups failed:\n" + "\n".join(failures)
            )

    def _backup(self, sandbox: Sandbox, *, force: bool) -> str | None:
        """Back up one sandbox; return why it failed, or None."""
        try:
            with progress_bar(self.stderr, f"backup {sandbox}") as on_progress:
                snapshot = actions.backup_sandbox(
                    sandbox,
                    trigger=Snapshot.Trigger.OPS,
                    force=force,
                    on_progress=on_progress,
                )
        except (actions.BackupBusy, actions.BackupFailed) as exc:
            return str(exc)
        if snapshot is None:
            self.stdout.write(f"{sandbox}: unchanged since its last snapshot, skipped")
        else:
            self.stdout.write(f"{sandbox}: {describe(snapshot)}")
        return None
