"""Check this host and Hermit's services; print what is wrong and the command that fixes it.

Exits non-zero (CommandError) when any check fails. The checks are in sandboxes.doctor.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from sandboxes import doctor


class Command(BaseCommand):
    help = (
        "Check bubblewrap, pasta, cgroups, the seccomp filter, the runtime image, storage, the "
        "broker, the database, free disk and RAM. Exits non-zero on any failure."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--min-free-disk-mb", type=int, default=doctor.MIN_FREE_DISK_MB,
            help="free disk under the data dir below this fails (default %(default)s)",
        )  # fmt: skip
        parser.add_argument(
            "--min-available-ram-mb", type=int, default=doctor.MIN_AVAILABLE_RAM_MB,
            help="available RAM below this fails (default %(default)s)",
        )  # fmt: skip

    def handle(self, *args: Any, **options: Any) -> None:
        thresholds = doctor.Thresholds(options["min_free_disk_mb"], options["min_available_ram_mb"])
        results = doctor.run_checks(thresholds)
        width = max(len(result.name) for result in results)
        for result in results:
            if result.ok:
                self.stdout.write(
                    f"{self.style.SUCCESS('OK  ')}  {result.name:<{width}}  {result.detail}"
                )
                continue
            self.stdout.write(
                f"{self.style.ERROR('FAIL')}  {result.name:<{width}}  {result.detail}"
            )
            if result.fix:
                self.stdout.write(f"      {'':<{width}}  fix: {result.fix}")
        failed = [result.name for result in results if not result.ok]
        if failed:
            raise CommandError(
                f"{len(failed)} of {len(results)} checks failed: {', '.join(failed)}"
            )
        self.stdout.write(self.style.SUCCESS(f"All {len(results)} checks passed."))
