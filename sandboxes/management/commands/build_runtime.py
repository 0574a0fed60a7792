"""Build the pinned Node + OpenClaw runtime image (idempotent; fast when already built)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from sandboxes import runtime


class Command(BaseCommand):
    help = "Install Node and the pinned OpenClaw into a versioned, read-only runtime directory."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--openclaw-version", default=None)
        parser.add_argument("--node-version", default=None)

    def handle(self, *args: Any, **options: Any) -> None:
        def progress(percent: int, message: str) -> None:
            self.stdout.write(f"  [{percent:>3}%] {message}")

        try:
            image = runtime.build(options["openclaw_version"], options["node_version"], progress)
        except Exception as exc:
            raise CommandError(f"Runtime build failed: {exc}") from exc
        self.stdout.write(self.style.SUCCESS(f"Runtime ready and current: {image} at {image.path}"))
