"""Ops CLI: manage.py sandbox {list,start,stop,sleep,restart,status,logs,exec} [USER|--all].

``exec`` runs a command inside the user's sandbox: options go before ``--`` and everything after
the first ``--`` is the command, verbatim (``sandbox exec USER --timeout 50 -- ls -la /tmp``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Q

from sandboxes import actions
from sandboxes.backends import get_backend
from sandboxes.backends.base import BackendError
from sandboxes.models import Sandbox, SandboxEvent

STAFF = SandboxEvent.Actor.STAFF


class CommandAfterDashes(CommandParser):
    """Parses the arguments before the first ``--``; what follows it becomes ``argv``, verbatim.

    Options may come anywhere before the ``--`` (argparse alone refuses them between two
    positionals, as in ``exec USER --timeout 50 -- CMD``, and drops a later ``--`` from CMD).
    """

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        given = list(sys.argv[1:] if args is None else args)
        command: list[str] = []
        if "--" in given:
            cut = given.index("--")
            given, command = given[:cut], given[cut + 1 :]
        parsed = self.parse_intermixed_args(given, namespace)
        if command and parsed.argv:
            self.error(f"put the command after --, not before: {' '.join(parsed.argv)}")
        parsed.argv = command or parsed.argv
        return parsed


class Command(BaseCommand):
    help = "Inspect and control users' sandboxes. USER is an email address or username."

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        parser.__class__ = CommandAfterDashes  # same parser, with the split at "--"
        return parser

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "verb",
            choices=["list", "start", "stop", "sleep", "restart", "status", "logs", "exec"],
        )
        parser.add_argument("user", nargs="?")
        parser.add_argument(
            "argv", nargs="*", help="for exec: the command to run, after -- (exec USER -- CMD)"
        )
        parser.add_argument("--name", default="default", help="sandbox name")
        parser.add_argument("--lines", type=int, default=100, help="for logs")
        parser.add_argument("--timeout", type=float, default=30.0, help="for exec")
        parser.add_argument(
            "--all", action="store_true", help="for stop and sleep: every running sandbox"
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        if opts["verb"] == "list":
            self._list()
            return
        if opts["all"]:
            self._all(opts["verb"])
            return
        if not opts["user"]:
            raise CommandError(f"`sandbox {opts['verb']}` needs a USER (email or username).")
        sandbox = self._sandbox(opts["user"], opts["name"])
        try:
            getattr(self, f"_{opts['verb']}")(sandbox, opts)
        except (BackendError, actions.TransitionRefused) as exc:
            raise CommandError(str(exc)) from exc

    def _sandbox(self, who: str, name: str) -> Sandbox:
        user = get_user_model().objects.filter(Q(email__iexact=who) | Q(username=who)).first()
        if user is None:
            raise CommandError(f"No user {who!r}.")
        sandbox = Sandbox.objects.filter(owner=user, name=name).select_related("owner").first()
        if sandbox is None:
            raise CommandError(f"{who} has no sandbox called {name!r}.")
        return sandbox

    def _all(self, verb: str) -> None:
        if verb not in ("stop", "sleep"):
            raise CommandError("--all works with stop and sleep only.")
        running = Sandbox.objects.filter(state=Sandbox.State.RUNNING).select_related("owner")
        for sandbox in running:
            try:
                getattr(self, f"_{verb}")(sandbox, {})
            except (BackendError, actions.TransitionRefused) as exc:
                self.stderr.write(f"{sandbox}: {exc}")

    def _sleep(self, sandbox: Sandbox, opts: dict[str, Any]) -> None:
        actions.sleep_sandbox(sandbox, actor=STAFF)
        self.stdout.write(f"{sandbox} is {sandbox.state}")

    def _list(self) -> None:
        for s in Sandbox.objects.select_related("owner").order_by("pk"):
            self.stdout.write(
                f"{s.pk:>5}  {s.owner.email or s.owner.username:<32} {s.name:<12} "
                f"{s.state:<12} last activity {s.last_activity_at:%Y-%m-%d %H:%M}Z"
            )

    def _progress(self, steps: Any) -> None:
        for step in steps:
            self.stdout.write(f"[{step.percent:>3}%] {step.message}")

    def _start(self, sandbox: Sandbox, opts: dict[str, Any]) -> None:
        self._progress(actions.wake_sandbox(sandbox, actor=STAFF))

    def _stop(self, sandbox: Sandbox, opts: dict[str, Any]) -> None:
        actions.stop_sandbox(sandbox, actor=STAFF)
        self.stdout.write(f"{sandbox} is {sandbox.state}")

    def _restart(self, sandbox: Sandbox, opts: dict[str, Any]) -> None:
        self._progress(actions.restart_sandbox(sandbox, actor=STAFF))

    def _status(self, sandbox: Sandbox, opts: dict[str, Any]) -> None:
        info: dict[str, Any] = {
            "sandbox": str(sandbox),
            "state": sandbox.state,
            "error": sandbox.error_message or None,
        }
        if sandbox.backend_state:
            backend, spec = get_backend(sandbox.backend), actions.spec_for(sandbox)
            poll = backend.poll(spec, sandbox.backend_state)
            info["backend"] = {
                "running": poll.running,
                "oom_killed": poll.oom_killed,
                "detail": poll.detail,
            }
            if poll.running:
                stats = backend.stats(spec, sandbox.backend_state)
                info["stats"] = stats.__dict__
        self.stdout.write(json.dumps(info, indent=2, default=str))

    def _logs(self, sandbox: Sandbox, opts: dict[str, Any]) -> None:
        backend = get_backend(sandbox.backend)
        self.stdout.write(
            backend.logs(actions.spec_for(sandbox), sandbox.backend_state, opts["lines"])
        )

    def _exec(self, sandbox: Sandbox, opts: dict[str, Any]) -> None:
        if not opts["argv"]:
            raise CommandError("Give the command after the user: sandbox exec USER -- ls /tmp")
        backend = get_backend(sandbox.backend)
        result = backend.exec(
            actions.spec_for(sandbox), sandbox.backend_state, opts["argv"], timeout=opts["timeout"]
        )
        self.stdout.write(result.stdout, ending="")
        self.stderr.write(result.stderr, ending="")
        if result.timed_out:
            raise CommandError(f"Timed out after {opts['timeout']} s")
        if result.exit_code:
            raise CommandError(f"Exit code {result.exit_code}")
