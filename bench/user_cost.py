"""What one user costs: a real gateway's memory and CPU, priced at the operator's settings.

One real OpenClaw gateway in a bubblewrap sandbox (local backend), driven through the product's
own code (``actions.provision_sandbox``, ``sleep.doze``, ``sleep.hibernate``,
``actions.wake_sandbox``, ``backups.actions.backup_sandbox``), read through its cgroup (the
files ``backend.stats()`` reads: memory usage less inactive page cache, CPU time):

- awake and idle, after one chat turn and ``--settle`` seconds: memory, sampled every 5 s over
  ``--idle-window`` seconds (default 120), and the CPU-seconds it uses per hour doing nothing;
- one chat turn (as the portal's chat makes it, the reply streamed by the fake model through the
  AI gateway): the sandbox's CPU-seconds over ``--turns`` turns, from the first request until
  ``--turn-tail`` seconds after the last final event, less the idle rate's share, divided by
  the turns (a mean: some turns do much more work than others, and a month pays for all);
- dozing (cgroup freezer): the memory it keeps, and its CPU over ``--doze-window`` seconds;
- hibernated (CRIU checkpoint): the memory left (its cgroup is gone), the image on disk, and
  the CPU of the dump (criu, a child of this process);
- the wake a free user's next session starts with: the sandbox's CPU until ``/readyz`` (criu
  restore and pasta run in its cgroup);
- the data dir's size, and one restic backup of it (the repository's files, the bytes object
  storage bills; excluded caches are not in it).

Then the arithmetic, line by line, at ``settings.HERMIT_COST_*`` prices: an always-on (pro)
user's month (730 h) and a free user's month under a usage pattern set by flags (default: awake
``--free-awake-hours`` 1 h a day in ``--free-sessions`` 1 session, ``--turns-per-day`` 20 turns;
after each session awake ``HERMIT_DOZE_AFTER`` more, dozing until the free plan's sleep-after,
hibernated the rest), and how many of each one 16 vCPU / 32 GB / 320 GB CX53 holds, with the
server price per user that implies. GB here is 1024 MB; MB is 2**20 bytes.

The RAM priced is the working set (``--ram-basis working``, what ``stats()`` reports); ``anon``
prices anonymous + shmem memory only, leaving out the runtime's file pages, which sandboxes
running the same image share in the host's page cache. Everything runs in a throwaway data dir
(SQLite database, no Redis or portal needed) with its own cgroup parent and uids; the gateway
is stopped and the dir removed at the end, also on Ctrl-C or an error. Needs root. Ends with
one ``RESULT key=value ...`` line.

    .venv/bin/python bench/user_cost.py [--idle-window 120] [--turns 5] [--free-awake-hours 1]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import resource
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import _wake_env as env  # noqa: E402
import _wake_probe as probe  # noqa: E402
from wake import last_message, reload  # noqa: E402

MB = probe.MB
HOURS_PER_MONTH = Decimal(730)
DAYS_PER_MONTH = HOURS_PER_MONTH / 24
# A reply of some length, streamed in 30 pieces: a chat answer, not a one-liner.
REPLY = " ".join(["Here is what I found about that, in a few short paragraphs of plain text."] * 8)
SAMPLE_EVERY = 5.0


@dataclass
class Memory:
    usage_mb: float  # memory.current (v2) or memory.usage_in_bytes (v1): all charged pages
    working_mb: float  # less inactive page cache: what backend.stats() reports
    anon_mb: float  # anonymous + shmem
    procs: int

    def priced(self, basis: str) -> float:
        return self.anon_mb if basis == "anon" else self.working_mb


@dataclass
class Figures:
    awake: Memory
    awake_after_turns: Memory
    idle_cpu_s_per_h: float
    idle_window_s: float
    idle_samples: int
    turn_cpu_s: float  # the mean, priced
    turn_cpu_all: list[float]
    turn_portal_cpu_s: float
    doze: Memory
    doze_cpu_s_per_h: float
    doze_window_s: float
    hibernate_how: str
    hibernated: Memory
    checkpoint_mb: float
    dump_cpu_s: float
    dump_s: float
    wake_how: str
    wake_cpu_s: float
    wake_ready_s: float
    restored: Memory
    data_dir_mb: float
    backup_mb: float
    backup_files_mb: float
    backup_note: str

    def awake_priced_mb(self, basis: str) -> float:
        """An awake agent's RAM as priced: the larger of idle and after the turns."""
        return max(self.awake.priced(basis), self.awake_after_turns.priced(basis))


# -- reading the cgroup ------------------------------------------------------------------------


def charged_bytes(paths: dict[str, str]) -> int:
    """All memory charged to the cgroup, page cache included (the raw counter)."""
    if "unified" in paths:
        return int((Path(paths["unified"]) / "memory.current").read_text())
    return int((Path(paths["memory"]) / "memory.usage_in_bytes").read_text())


def memory(paths: dict[str, str] | None) -> Memory:
    """The cgroup's memory now; zeros once the cgroup is gone."""
    working, anon, procs = probe.memory(paths)
    if not procs and not probe.cgroup_exists(paths):
        return Memory(0.0, 0.0, 0.0, 0)
    assert paths is not None
    return Memory(charged_bytes(paths) / MB, working, anon, procs)


def median_memory(samples: list[Memory]) -> Memory:
    return Memory(
        statistics.median(s.usage_mb for s in samples),
        statistics.median(s.working_mb for s in samples),
        statistics.median(s.anon_mb for s in samples),
        round(statistics.median(s.procs for s in samples)),
    )


def children_cpu() -> float:
    """CPU-seconds of this process's reaped children (criu dump, restic)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def paths_of(sandbox: Any) -> dict[str, str]:
    return dict(sandbox.backend_state.get("cgroups") or {})


def watch(paths: dict[str, str], seconds: float) -> tuple[float, list[Memory]]:
    """CPU-seconds the cgroup used over ``seconds``, and its memory every SAMPLE_EVERY s."""
    samples: list[Memory] = []
    start_cpu = probe.cpu_seconds(paths)
    start = time.monotonic()
    end = start + seconds
    while True:
        samples.append(memory(paths))
        left = end - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(SAMPLE_EVERY, left))
    return probe.cpu_seconds(paths) - start_cpu, samples


# -- the measurements --------------------------------------------------------------------------


def boot() -> Any:
    from sandboxes import actions
    from sandboxes.models import Sandbox
    from tests.factories import make_user

    sandbox = Sandbox.objects.get(owner=make_user("agent@cost.bench"))
    t = time.monotonic()
    actions.provision_sandbox(sandbox)
    sandbox = reload(sandbox)
    if sandbox.state != Sandbox.State.RUNNING:
        raise RuntimeError(f"the bench's agent did not start: {sandbox.error_message}")
    probe.wait_ready(sandbox)
    print(f"booted the agent in {time.monotonic() - t:.1f} s, load {probe.loadavg()}", flush=True)
    return sandbox


def measure_turns(
    sandbox: Any, count: int, tail: float, idle_per_s: float
) -> tuple[float, list[float], list[float]]:
    """The sandbox's mean CPU-seconds a turn over all ``count`` turns (idle share off), each
    turn's, and this process's each turn (the AI gateway, the fake model and the chat client,
    for reference)."""
    paths = paths_of(sandbox)
    sandbox_cpu: list[float] = []
    portal_cpu: list[float] = []
    start_cpu, start = probe.cpu_seconds(paths), time.monotonic()
    for i in range(count):
        time.sleep(1.0)
        before, own = probe.cpu_seconds(paths), time.process_time()
        t0 = time.monotonic()
        turn = probe.chat_turn(sandbox, message=f"Tell me about item {i + 1}.")
        time.sleep(tail)
        elapsed = time.monotonic() - t0
        used = probe.cpu_seconds(paths) - before - idle_per_s * elapsed
        sandbox_cpu.append(used)
        portal_cpu.append(time.process_time() - own)
        print(
            f"  turn {i + 1}: {used:.3f} CPU-s in the sandbox, reply in"
            f" {turn.final - t0:.2f} s ({len(turn.text)} chars), load {probe.loadavg()}",
            flush=True,
        )
    total = probe.cpu_seconds(paths) - start_cpu - idle_per_s * (time.monotonic() - start)
    return total / count, sandbox_cpu, portal_cpu


def measure_doze(sandbox: Any, window: float) -> tuple[Memory, float]:
    from django.utils import timezone

    from sandboxes import sleep
    from sandboxes.backends import cgroups

    since = timezone.now()
    if not sleep.doze(sandbox):
        why = last_message(sandbox, since) or f"the sandbox stayed {reload(sandbox).state}"
        raise RuntimeError(f"sleep.doze did not freeze the agent: {why}")
    paths = paths_of(sandbox)
    if not cgroups.is_frozen(paths):
        raise RuntimeError("sleep.doze returned, but the kernel does not report it frozen")
    time.sleep(2.0)
    cpu, samples = watch(paths, window)
    held = median_memory(samples)
    print(
        f"  dozing: {held.working_mb:.0f} MB working set, {cpu:.4f} CPU-s in {window:.0f} s",
        flush=True,
    )
    return held, cpu / window * 3600


def measure_hibernate(sandbox: Any) -> tuple[str, Memory, float, float, float]:
    """(how, memory left, image MB, dump CPU-s, dump seconds)."""
    from django.utils import timezone

    from sandboxes import sleep
    from sandboxes.models import Checkpoint

    paths = paths_of(sandbox)
    since = timezone.now()
    cpu0, t0 = children_cpu(), time.monotonic()
    how = sleep.hibernate(sandbox, message="Bench: hibernating")
    took, dump_cpu = time.monotonic() - t0, children_cpu() - cpu0
    sandbox = reload(sandbox)
    left = memory(paths)
    if how != "checkpointed":
        why = last_message(sandbox, since, "Stopped instead of hibernating") or how or "refused"
        print(f"  hibernate: not checkpointed ({why}); a free user's wake is a cold boot")
        return how or "refused", left, 0.0, dump_cpu, took
    checkpoint = Checkpoint.objects.get(sandbox=sandbox)
    image = probe.tree_size_mb(checkpoint.location)
    print(
        f"  hibernated in {took:.2f} s: {left.working_mb:.0f} MB and {left.procs} processes left,"
        f" image {image:.1f} MB on disk (row: {checkpoint.size_bytes / MB:.1f} MB),"
        f" criu dump {dump_cpu:.2f} CPU-s",
        flush=True,
    )
    return how, left, image, dump_cpu, took


def measure_backup(sandbox: Any) -> tuple[float, float, str]:
    """(repository files MB, files MB in the snapshot, note). Restic's CPU is not read here:
    it runs in a bubblewrap pid namespace, out of this process's child accounting."""
    from sandboxes.backups import actions as backups
    from sandboxes.backups.storage import s3_mode
    from sandboxes.models import BackupRepository

    if s3_mode():
        return math.nan, math.nan, "backups go to S3 here: repository size not read"
    try:
        snapshot = backups.backup_sandbox(reload(sandbox), trigger="sleep", force=True)
    except Exception as exc:
        return math.nan, math.nan, f"the backup failed: {exc}"
    location = BackupRepository.objects.get(sandbox=sandbox).location
    size = probe.tree_size_mb(location)
    files = snapshot.size_bytes / MB if snapshot else math.nan
    print(f"  backup: repository files {size:.1f} MB for {files:.1f} MB of files", flush=True)
    return size, files, ""


def measure_wake(sandbox: Any) -> tuple[str, float, float, Memory]:
    """(how, sandbox CPU-s until ready, seconds until ready, memory once ready)."""
    from django.utils import timezone

    from sandboxes import actions

    since = timezone.now()
    t0 = time.monotonic()
    for _ in actions.wake_sandbox(sandbox, actor_user=sandbox.owner):
        pass
    sandbox = reload(sandbox)
    ready = probe.wait_ready(sandbox) - t0
    paths = paths_of(sandbox)
    cpu = probe.cpu_seconds(paths)  # a new cgroup: all of it is the wake
    failed = last_message(sandbox, since, "Could not resume")
    how = "boot (the restore failed)" if failed else "restore"
    held = memory(paths)
    print(
        f"  woke ({how}) in {ready:.2f} s: {cpu:.2f} CPU-s, {held.working_mb:.0f} MB working set",
        flush=True,
    )
    return how, cpu, ready, held


def measure(args: argparse.Namespace) -> Figures:
    from sandboxes.backends import get_backend, safefs

    sandbox = boot()
    probe.chat_turn(sandbox)  # the one turn before idling (the first compiles code paths)
    print(f"one chat turn done; settling {args.settle:.0f} s", flush=True)
    time.sleep(args.settle)
    print(f"idle window: {args.idle_window:.0f} s", flush=True)
    idle_cpu, samples = watch(paths_of(sandbox), args.idle_window)
    awake = median_memory(samples)
    idle_per_s = idle_cpu / args.idle_window
    print(
        f"  idle: {idle_cpu:.3f} CPU-s in {args.idle_window:.0f} s,"
        f" {awake.working_mb:.0f} MB working set (median of {len(samples)})",
        flush=True,
    )
    turn_mean, turns, portal = measure_turns(sandbox, args.turns, args.turn_tail, idle_per_s)
    after_turns = memory(paths_of(sandbox))
    doze, doze_rate = measure_doze(reload(sandbox), args.doze_window)
    how, left, image, dump_cpu, dump_s = measure_hibernate(reload(sandbox))
    sandbox = reload(sandbox)
    data_dir = safefs.disk_usage(get_backend(sandbox.backend).volume(sandbox.pk)) / MB
    print(f"  data dir: {data_dir:.1f} MB on disk", flush=True)
    backup, files, note = measure_backup(sandbox)
    wake_how, wake_cpu, wake_ready, restored = measure_wake(reload(sandbox))
    return Figures(
        awake=awake,
        awake_after_turns=after_turns,
        idle_cpu_s_per_h=idle_per_s * 3600,
        idle_window_s=args.idle_window,
        idle_samples=len(samples),
        turn_cpu_s=turn_mean,
        turn_cpu_all=turns,
        turn_portal_cpu_s=statistics.median(portal),
        doze=doze,
        doze_cpu_s_per_h=doze_rate,
        doze_window_s=args.doze_window,
        hibernate_how=how,
        hibernated=left,
        checkpoint_mb=image,
        dump_cpu_s=dump_cpu,
        dump_s=dump_s,
        wake_how=wake_how,
        wake_cpu_s=wake_cpu,
        wake_ready_s=wake_ready,
        restored=restored,
        data_dir_mb=data_dir,
        backup_mb=backup,
        backup_files_mb=files,
        backup_note=note,
    )


# -- the arithmetic ----------------------------------------------------------------------------


def dec(value: float, places: int = 6) -> Decimal:
    return round(Decimal(repr(value)), places)


def n(value: Decimal, places: int = 4) -> str:
    """A number for the arithmetic lines: ``places`` decimals, trailing zeros kept."""
    return f"{value:.{places}f}"


def usd(value: Decimal) -> str:
    return f"USD {value:.6f}"


@dataclass
class Prices:
    vcpu_hour: Decimal
    ram_gb_hour: Decimal
    storage_gb_month: Decimal


def line(label: str, text: str, value: Decimal) -> None:
    print(f"  {label:<11}{text} = {usd(value)}", flush=True)


def pro_month(f: Figures, p: Prices, args: argparse.Namespace) -> tuple[Decimal, Decimal]:
    """Print an always-on user's month; return (total USD, CPU-s a month)."""
    ram_gb = dec(f.awake_priced_mb(args.ram_basis))
    ram_gb = round(ram_gb / 1024, 4)
    turns = round(Decimal(repr(args.turns_per_day)) * DAYS_PER_MONTH, 1)
    idle_rate, turn_cpu = dec(f.idle_cpu_s_per_h, 2), dec(f.turn_cpu_s, 3)
    storage_gb = round(dec(f.data_dir_mb + nan0(f.backup_mb), 1) / 1024, 4)
    idle_cpu_h = round(idle_rate * HOURS_PER_MONTH / 3600, 4)
    turn_cpu_h = round(turns * turn_cpu / 3600, 4)
    ram = ram_gb * HOURS_PER_MONTH * p.ram_gb_hour
    idle = idle_cpu_h * p.vcpu_hour
    chat = turn_cpu_h * p.vcpu_hour
    storage = storage_gb * p.storage_gb_month
    total = ram + idle + chat + storage
    print(
        f"\nAlways-on (pro) user, one month = 730 h, {args.turns_per_day:g} turns a day"
        f" = {turns} turns:"
    )
    line("RAM", f"{ram_gb} GB x 730 h x {p.ram_gb_hour}", ram)
    line(
        "idle CPU",
        f"{idle_rate} CPU-s/h x 730 h / 3600 = {idle_cpu_h} CPU-h x {p.vcpu_hour}",
        idle,
    )
    line("turns", f"{turns} x {turn_cpu} CPU-s / 3600 = {turn_cpu_h} CPU-h x {p.vcpu_hour}", chat)
    line(
        "storage",
        f"({f.data_dir_mb:.1f} MB data dir + {nan0(f.backup_mb):.1f} MB backup) / 1024"
        f" = {storage_gb} GB x {p.storage_gb_month}",
        storage,
    )
    line("total", f"{usd(ram)} + {usd(idle)} + {usd(chat)} + {usd(storage)}", total)
    cpu_s = idle_rate * HOURS_PER_MONTH + turns * turn_cpu
    return total, cpu_s


@dataclass
class FreeMonth:
    total: Decimal
    cpu_s: Decimal
    ram_gb_h: Decimal
    disk_gb: Decimal


def free_month(
    f: Figures, p: Prices, args: argparse.Namespace, doze_after_s: int, sleep_after_s: int
) -> FreeMonth:
    """Print a free user's month under the flags' pattern; return its totals."""
    per_day = Decimal(repr(args.free_sessions))
    sessions = round(per_day * DAYS_PER_MONTH, 2)
    turns = round(Decimal(repr(args.turns_per_day)) * DAYS_PER_MONTH, 1)
    awake_h = round(
        (Decimal(repr(args.free_awake_hours)) + per_day * doze_after_s / Decimal(3600))
        * DAYS_PER_MONTH,
        2,
    )
    doze_h = round(per_day * (sleep_after_s - doze_after_s) / Decimal(3600) * DAYS_PER_MONTH, 2)
    hib_h = HOURS_PER_MONTH - awake_h - doze_h
    if hib_h < 0:
        raise ValueError("the free pattern's awake and dozing hours exceed the month")
    awake_gb = round(
        dec(f.awake_priced_mb(args.ram_basis)) / 1024,
        4,
    )
    doze_gb = round(dec(f.doze.priced(args.ram_basis)) / 1024, 4)
    idle_rate, doze_rate = dec(f.idle_cpu_s_per_h, 2), dec(f.doze_cpu_s_per_h, 4)
    turn_cpu = dec(f.turn_cpu_s, 3)
    wake_cpu = dec(f.wake_cpu_s + f.dump_cpu_s, 2)
    ram_gb_h = awake_h * awake_gb + doze_h * doze_gb
    ram = ram_gb_h * p.ram_gb_hour
    idle_cpu_h = round((awake_h * idle_rate + doze_h * doze_rate) / 3600, 4)
    turn_cpu_h = round(turns * turn_cpu / 3600, 4)
    wake_cpu_h = round(sessions * wake_cpu / 3600, 4)
    idle = idle_cpu_h * p.vcpu_hour
    chat = turn_cpu_h * p.vcpu_hour
    wakes = wake_cpu_h * p.vcpu_hour
    kept_gb = round(dec(f.data_dir_mb + nan0(f.backup_mb), 1) / 1024, 4)
    image_gb = round(dec(f.checkpoint_mb, 1) / 1024, 4)
    storage = (kept_gb + image_gb * hib_h / HOURS_PER_MONTH) * p.storage_gb_month
    total = ram + idle + chat + wakes + storage
    print(
        f"\nFree user, one month: awake {args.free_awake_hours:g} h a day in"
        f" {args.free_sessions:g} session(s), {args.turns_per_day:g} turns a day; after each"
        f" session awake {doze_after_s} s more (HERMIT_DOZE_AFTER), dozing until the free plan's"
        f" sleep-after ({sleep_after_s} s), hibernated the rest; each session starts with a wake"
        f" from hibernation ({f.wake_how}) and ends with a {f.hibernate_how} sleep."
    )
    print(f"  {'sessions':<11}{args.free_sessions:g} x 730 / 24 = {sessions}")
    print(
        f"  {'awake':<11}({args.free_awake_hours:g} h + {args.free_sessions:g} x {doze_after_s} s"
        f" / 3600) x 730 / 24 = {awake_h} h"
    )
    print(
        f"  {'dozing':<11}{args.free_sessions:g} x ({sleep_after_s} - {doze_after_s}) s / 3600"
        f" x 730 / 24 = {doze_h} h"
    )
    print(f"  {'hibernated':<11}730 - {awake_h} - {doze_h} = {hib_h} h")
    line(
        "RAM",
        f"({awake_h} h x {awake_gb} GB + {doze_h} h x {doze_gb} GB) = {n(ram_gb_h)} GB-h"
        f" x {p.ram_gb_hour}",
        ram,
    )
    line(
        "idle CPU",
        f"({awake_h} h x {idle_rate} + {doze_h} h x {doze_rate}) CPU-s/h / 3600"
        f" = {idle_cpu_h} CPU-h x {p.vcpu_hour}",
        idle,
    )
    line("turns", f"{turns} x {turn_cpu} CPU-s / 3600 = {turn_cpu_h} CPU-h x {p.vcpu_hour}", chat)
    line(
        "wakes",
        f"{sessions} x ({dec(f.wake_cpu_s, 2)} wake + {dec(f.dump_cpu_s, 2)} dump) CPU-s / 3600"
        f" = {wake_cpu_h} CPU-h x {p.vcpu_hour}",
        wakes,
    )
    line(
        "storage",
        f"({kept_gb} GB data dir + backup + {image_gb} GB checkpoint x {hib_h} / 730)"
        f" x {p.storage_gb_month}",
        storage,
    )
    line("total", f"{usd(ram)} + {usd(idle)} + {usd(chat)} + {usd(wakes)} + {usd(storage)}", total)
    cpu_s = idle_cpu_h * 3600 + turns * turn_cpu + sessions * wake_cpu
    return FreeMonth(total, cpu_s, ram_gb_h, kept_gb + image_gb)


def nan0(value: float) -> float:
    return 0.0 if math.isnan(value) else value


def server(
    f: Figures,
    p: Prices,
    args: argparse.Namespace,
    pro_cpu_s: Decimal,
    free: FreeMonth,
) -> dict[str, str]:
    """Print how many users one CX53 holds; return the RESULT entries."""
    from django.conf import settings

    vcpus, ram_gb, disk_gb = (
        args.server_vcpus,
        Decimal(repr(args.server_ram_gb)),
        args.server_disk_gb,
    )
    price = (
        Decimal(repr(args.server_usd_month))
        if args.server_usd_month
        else (vcpus * p.vcpu_hour + ram_gb * p.ram_gb_hour) * HOURS_PER_MONTH
    )
    source = (
        "--server-usd-month"
        if args.server_usd_month
        else f"({vcpus} x {p.vcpu_hour} + {ram_gb} x {p.ram_gb_hour}) x 730, the settings' split"
    )
    usable = ram_gb - Decimal(repr(args.host_reserve_gb))
    cpu_month = Decimal(vcpus) * HOURS_PER_MONTH * 3600
    awake_gb = round(
        dec(f.awake_priced_mb(args.ram_basis)) / 1024,
        4,
    )
    avg_free_gb = round(free.ram_gb_h / HOURS_PER_MONTH, 5)
    pro_ram = int(usable / awake_gb)
    pro_cpu = int(cpu_month / pro_cpu_s)
    free_ram = int(usable / avg_free_gb)
    free_cpu = int(cpu_month / free.cpu_s)
    free_disk = int(Decimal(disk_gb) / free.disk_gb) if free.disk_gb else 0
    pro_users, free_users = min(pro_ram, pro_cpu), min(free_ram, free_cpu)
    print(
        f"\nOne CX53 ({vcpus} vCPU, {ram_gb} GB RAM, {disk_gb} GB disk) at {usd(round(price, 2))}"
        f" a month ({source}); {args.host_reserve_gb:g} GB held back for the host"
        " (--host-reserve-gb):"
    )
    print(f"  always-on, by RAM: {usable} GB / {awake_gb} GB = {pro_ram} users")
    print(
        f"  always-on, by CPU: {vcpus} x 730 h x 3600 = {cpu_month} CPU-s / {n(pro_cpu_s, 1)}"
        f" CPU-s a user = {pro_cpu} users"
    )
    print(
        f"  free, by RAM: {n(free.ram_gb_h)} GB-h / 730 h = {avg_free_gb} GB on average;"
        f" {usable} GB / {avg_free_gb} GB = {free_ram} users (sessions spread over the day; if"
        f" all were awake at once, {pro_ram})"
    )
    print(f"  free, by CPU: {cpu_month} CPU-s / {n(free.cpu_s, 1)} CPU-s a user = {free_cpu} users")
    print(
        f"  free, by disk: {disk_gb} GB / {free.disk_gb} GB (data dir, backup, checkpoint)"
        f" = {free_disk} users (if backups and checkpoints stay on the server's disk)"
    )
    if f.checkpoint_mb:
        budget = int(settings.HERMIT_CHECKPOINT_BUDGET_MB)
        print(
            f"    HERMIT_CHECKPOINT_BUDGET_MB = {budget} holds {int(budget / f.checkpoint_mb)}"
            f" checkpoints of {f.checkpoint_mb:.0f} MB; past it the oldest are dropped and those"
            " agents wake by a cold boot (no checkpoint on disk, a boot's CPU instead)"
        )
    pro_each, free_each = price / pro_users, price / free_users
    print(
        f"  server price per user: always-on {usd(round(price, 2))} / {pro_users}"
        f" = {usd(pro_each)}; free {usd(round(price, 2))} / {free_users} = {usd(free_each)}"
        " (each by the tighter of RAM and CPU)"
    )
    return {
        "cx53_pro_users": str(pro_users),
        "cx53_free_users": str(free_users),
        "cx53_free_users_by_disk": str(free_disk),
        "cx53_pro_usd_user": f"{pro_each:.4f}",
        "cx53_free_usd_user": f"{free_each:.4f}",
    }


def report(f: Figures, args: argparse.Namespace, started: float) -> None:
    from django.conf import settings

    from billing.models import Plan
    from sandboxes import sleep

    prices = Prices(
        Decimal(settings.HERMIT_COST_VCPU_HOUR),
        Decimal(settings.HERMIT_COST_RAM_GB_HOUR),
        Decimal(settings.HERMIT_COST_STORAGE_GB_MONTH),
    )
    free_plan = Plan.objects.get(slug="free")
    sleep_after = free_plan.sleeps_after()
    if sleep_after is None:
        raise RuntimeError("the free plan does not sleep here: no free pattern to price")
    doze_after = sleep.doze_after(free_plan)
    assert doze_after is not None
    basis = "working set" if args.ram_basis == "working" else "anon + shmem"

    def mem(m: Memory) -> str:
        return (
            f"charged {m.usage_mb:.1f} MB, working set {m.working_mb:.1f} MB,"
            f" anon+shmem {m.anon_mb:.1f} MB, {m.procs} processes"
        )

    print("\nMeasured on this machine (one real OpenClaw gateway, its cgroup's accounting):")
    print(f"  awake, idle: {mem(f.awake)} (median of {f.idle_samples} samples)")
    print(f"    after {args.turns} more turns: {mem(f.awake_after_turns)}")
    print(
        f"    CPU: {f.idle_cpu_s_per_h * f.idle_window_s / 3600:.3f} s in {f.idle_window_s:.0f} s"
        f" = {f.idle_cpu_s_per_h:.2f} CPU-s per hour idle"
    )
    print(
        f"  chat turn: {f.turn_cpu_s:.3f} CPU-s in the sandbox on average over {args.turns} turns"
        f" (each: {', '.join(f'{c:.3f}' for c in f.turn_cpu_all)}; median"
        f" {statistics.median(f.turn_cpu_all):.3f}); this process (AI gateway, fake model, chat"
        f" client) {f.turn_portal_cpu_s:.3f} CPU-s a turn (median), not priced"
    )
    print(
        f"  dozing: {mem(f.doze)}; CPU {f.doze_cpu_s_per_h * f.doze_window_s / 3600:.4f} s in"
        f" {f.doze_window_s:.0f} s = {f.doze_cpu_s_per_h:.4f} CPU-s per hour"
    )
    print(
        f"  hibernated ({f.hibernate_how}, in {f.dump_s:.2f} s): {mem(f.hibernated)};"
        f" checkpoint image {f.checkpoint_mb:.1f} MB on disk; criu dump {f.dump_cpu_s:.2f} CPU-s"
    )
    print(
        f"  wake from hibernation ({f.wake_how}): ready in {f.wake_ready_s:.2f} s,"
        f" {f.wake_cpu_s:.2f} CPU-s; then {mem(f.restored)}"
    )
    print(f"  data dir: {f.data_dir_mb:.1f} MB on disk")
    if f.backup_note:
        print(f"  backup: not measured: {f.backup_note}")
    else:
        print(
            f"  backup: one restic snapshot, {f.backup_files_mb:.1f} MB of files, repository"
            f" {f.backup_mb:.1f} MB in its files (deduplicated, compressed; what object storage"
            " bills); its CPU is not measured here (bench/backup.py times backups)"
        )
    print(
        f"\nPrices (settings): vCPU-hour {prices.vcpu_hour}, RAM GB-hour {prices.ram_gb_hour},"
        f" storage GB-month {prices.storage_gb_month} (USD). RAM priced: {basis}, the larger of"
        f" idle and after the turns (--ram-basis). Free plan: doze after"
        f" {int(doze_after.total_seconds())} s, hibernate after {int(sleep_after.total_seconds())}"
        " s idle."
    )
    pro, pro_cpu_s = pro_month(f, prices, args)
    free = free_month(
        f, prices, args, int(doze_after.total_seconds()), int(sleep_after.total_seconds())
    )
    ratio = pro / free.total if free.total else Decimal(0)
    print(f"\nalways-on / free = {usd(pro)} / {usd(free.total)} = {ratio:.1f}")
    result = {
        "awake_ram_mb": f"{f.awake.working_mb:.1f}",
        "priced_ram_mb": f"{f.awake_priced_mb(args.ram_basis):.1f}",
        "awake_rss_mb": f"{f.awake.anon_mb:.1f}",
        "awake_charged_mb": f"{f.awake.usage_mb:.1f}",
        "idle_cpu_s_per_h": f"{f.idle_cpu_s_per_h:.2f}",
        "turn_cpu_s": f"{f.turn_cpu_s:.3f}",
        "turn_cpu_median_s": f"{statistics.median(f.turn_cpu_all):.3f}",
        "doze_ram_mb": f"{f.doze.working_mb:.1f}",
        "doze_rss_mb": f"{f.doze.anon_mb:.1f}",
        "doze_cpu_s_per_h": f"{f.doze_cpu_s_per_h:.4f}",
        "hibernate_ram_mb": f"{f.hibernated.working_mb:.1f}",
        "checkpoint_mb": f"{f.checkpoint_mb:.1f}",
        "wake_cpu_s": f"{f.wake_cpu_s:.2f}",
        "dump_cpu_s": f"{f.dump_cpu_s:.2f}",
        "data_dir_mb": f"{f.data_dir_mb:.1f}",
        "backup_mb": f"{f.backup_mb:.1f}",
        "pro_user_usd_month": f"{pro:.4f}",
        "free_user_usd_month": f"{free.total:.4f}",
        "pro_over_free": f"{ratio:.1f}",
    }
    result.update(server(f, prices, args, pro_cpu_s, free))
    result["ram_basis"] = args.ram_basis
    print(f"\nload average now {probe.loadavg()} ({os.cpu_count()} cores, shared)")
    print(f"total {time.monotonic() - started:.0f} s")
    print("\nRESULT " + " ".join(f"{k}={v}" for k, v in result.items()), flush=True)


# -- main --------------------------------------------------------------------------------------


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle-window", type=float, default=120.0, help="idle seconds sampled")
    parser.add_argument("--settle", type=float, default=15.0, help="seconds before the window")
    parser.add_argument("--turns", type=int, default=5, help="chat turns measured")
    parser.add_argument("--turn-tail", type=float, default=3.0, help="seconds counted after one")
    parser.add_argument("--doze-window", type=float, default=20.0, help="dozing seconds sampled")
    parser.add_argument("--turns-per-day", type=float, default=20.0, help="for both plans")
    parser.add_argument("--free-awake-hours", type=float, default=1.0, help="a free user's, a day")
    parser.add_argument("--free-sessions", type=float, default=1.0, help="a free user's, a day")
    parser.add_argument("--ram-basis", choices=("working", "anon"), default="working")
    parser.add_argument("--server-vcpus", type=int, default=16)
    parser.add_argument("--server-ram-gb", type=float, default=32.0)
    parser.add_argument("--server-disk-gb", type=int, default=320)
    parser.add_argument(
        "--server-usd-month", type=float, default=0.0, help="default: from the cost settings"
    )
    parser.add_argument("--host-reserve-gb", type=float, default=0.0, help="RAM not for agents")
    args = parser.parse_args()
    if args.turns < 1 or args.idle_window <= 0 or args.doze_window <= 0:
        parser.error("--turns, --idle-window and --doze-window must be positive")
    if not 0 < args.free_awake_hours < 24 or args.free_sessions <= 0:
        parser.error("--free-awake-hours must lie between 0 and 24, --free-sessions above 0")
    if os.geteuid() != 0:
        parser.error("the local backend needs root (bubblewrap, pasta and cgroups)")
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    started = time.monotonic()
    print(f"load average at start {probe.loadavg()} ({os.cpu_count()} cores, shared)", flush=True)
    tmp = env.configure(f"cost{os.getpid()}")
    for name in ("billing", "kombu"):  # a line per model call, and the unused broker's notes
        logging.getLogger(name).setLevel(logging.WARNING if name == "billing" else logging.ERROR)
    try:
        with env.model_and_gateway() as model:
            model.script(reply=REPLY, chunks=30, delay=0.02)
            figures = measure(args)
            report(figures, args, started)
    finally:
        problems = env.stop_everything()
        env.remove_data_dir(tmp)
        for problem in problems:
            print(f"cleanup: {problem}", file=sys.stderr)


if __name__ == "__main__":
    main()
