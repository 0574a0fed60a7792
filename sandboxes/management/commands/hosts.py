"""Ops CLI: ``manage.py hosts {list,drain,undrain}``: the sandbox hosts.

``list`` shows each host's name, address, state, heartbeat age, sandboxes (placed on it, and
awake) and free RAM. ``drain NAME`` stops placing new sandboxes there and moves its idle ones
away now (backup, then restore-on-start elsewhere), its awake ones at their next sleep.
``undrain NAME`` makes a draining or lost host active again.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Count

from sandboxes import hosts, tasks
from sandboxes.admin_hosts import free_ram, heartbeat_age
from sandboxes.models import SandboxHost

HostState = SandboxHost.State


class Command(BaseCommand):
    help = "List the sandbox hosts, or drain or undrain one."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="verb", required=True)
        sub.add_parser("list", help="show every host")
        drain = sub.add_parser("drain", help="move a host's sandboxes away")
        drain.add_argument("name")
        undrain = sub.add_parser("undrain", help="make a host take sandboxes again")
        undrain.add_argument("name")

    def handle(self, *args: Any, **opts: Any) -> None:
        if opts["verb"] == "list":
            self.list_hosts()
            return
        self.change(opts["name"], opts["verb"])

    def list_hosts(self) -> None:
        rows = SandboxHost.objects.annotate(placed=Count("sandboxes")).order_by("name")
        if not rows:
            self.stdout.write("No sandbox hosts are registered yet (a worker registers its own).")
            return
        self.stdout.write(
            f"{'NAME':<24}{'ADDRESS':<18}{'STATE':<10}{'HEARTBEAT':<14}{'SANDBOXES':>10}"
            f"{'AWAKE':>7}  FREE RAM"
        )
        for host in rows:
            self.stdout.write(
                f"{host.name:<24}{host.address:<18}{host.state:<10}{heartbeat_age(host):<14}"
                f"{host.placed:>10}{host.awake_sandboxes:>7}  {free_ram(host)}"
            )

    def change(self, name: str, verb: str) -> None:
        state = HostState.DRAINING if verb == "drain" else HostState.ACTIVE
        before = SandboxHost.objects.filter(name=name).values_list("state", flat=True).first()
        try:
            host = hosts.set_state(name, state)
        except hosts.UnknownHost as exc:
            known = ", ".join(SandboxHost.objects.values_list("name", flat=True)) or "none"
            raise CommandError(f"{exc} Known hosts: {known}.") from exc
        if verb == "undrain":
            was = "" if before == state else f" (it was {before})"
            self.stdout.write(f"{name} is active: new sandboxes may be placed on it{was}.")
            return
        queued = tasks.queue_moves(host)
        others = max(host.sandboxes.count() - queued, 0)
        self.stdout.write(
            f"{name} is draining: no new sandboxes go there. {queued} idle sandboxes are being "
            f"moved now; the other {others} move once they sleep."
        )
