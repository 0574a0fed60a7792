"""How fast a sleeping agent answers a chat: doze, hibernate and cold start, next to each other.

One run, on real gateways in real bubblewrap sandboxes (local backend), through the product's
own code paths: ``sandboxes.sleep.doze`` / ``sleep.hibernate`` / ``actions.stop_sandbox`` put
the agent to sleep, and ``sandboxes.actions.wake_sandbox`` wakes it as a chat request does.
For each way of sleeping, ``--runs`` times (default 5), it measures from the chat request:

- ready: ``wake_sandbox`` has returned and the gateway's ``/readyz`` answers 200;
- first token: a chat turn as the portal's chat makes it (a new protocol-v4 connection with the
  sandbox's token and device key, ``chat.send``), until the reply's first ``delta`` event; the
  reply comes from a fake model streaming in OpenAI's format through the AI gateway;
- RAM held while asleep: the sandbox cgroup's working set while dozing (frozen), 0 once
  hibernated or stopped when nothing is left of it, plus the checkpoint image's size on disk.

Also an awake agent's first token (the baseline; the same chat turn without a wake), and a
confirmed sign-up's time until its agent is ready, without and with the warm pool
(``sandboxes.pool``: ``fill_pool`` run as its task would, then ``adopt`` on provisioning).
Hibernation needs ``backend.checkpoint_support() == ""``; where it says why not, or a doze
cannot freeze, that part is reported as unsupported (RESULT value ``nan``) and the rest runs.

Percentiles are interpolated between the nearest ranks (with 5 runs, p95 lies near the
slowest). Everything runs in a throwaway data dir (SQLite database, no Redis, no portal
needed), with its own cgroup parent and uids; every gateway and cgroup it started is stopped
and removed at the end, also on Ctrl-C or an error. Ends with one ``RESULT key=value ...``
line.

    .venv/bin/python bench/wake.py [--runs 5] [--signup-runs N] [--skip doze,signup,...]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import _wake_env as env  # noqa: E402
import _wake_probe as probe  # noqa: E402
from _wake_probe import percentile  # noqa: E402

PHASES = ("awake", "doze", "hibernate", "cold", "signup")
REPLY = "Hello again, I am awake and listening."


class Unsupported(Exception):
    """This way of sleeping does not work here; the message says why."""


@dataclass
class Wake:
    ready: float  # seconds from the chat request
    woke: float  # wake_sandbox returned
    connected: float
    first_token: float
    asleep_mb: float = 0.0
    asleep_rss_mb: float = 0.0
    asleep_procs: int = 0
    image_mb: float = math.nan
    sleep_s: float = math.nan  # how long putting it to sleep took
    cpu_s: float = math.nan  # CPU the sandbox used from the request until ready
    how: str = ""
    fallback: str = ""  # why a restore fell back to a cold boot
    steps: list[tuple[float, str]] = field(default_factory=list)


@dataclass
class Phase:
    name: str
    wakes: list[Wake] = field(default_factory=list)
    unsupported: str = ""
    notes: list[str] = field(default_factory=list)
    fallbacks: int = 0

    def values(self, attr: str) -> list[float]:
        if attr == "after_ready":  # from ready to the first token
            return [w.first_token - w.ready for w in self.wakes]
        return [getattr(w, attr) for w in self.wakes]

    def p(self, attr: str, pct: float) -> float:
        return percentile(self.values(attr), pct)


# -- the bench user's sandbox -------------------------------------------------------------------


def reload(sandbox: Any) -> Any:
    from sandboxes.models import Sandbox

    return Sandbox.objects.select_related("owner", "runtime").get(pk=sandbox.pk)


def last_message(sandbox: Any, since: datetime, prefix: str = "") -> str:
    events = sandbox.events.filter(created_at__gte=since).order_by("-created_at", "-id")
    for event in events:
        if event.message.startswith(prefix):
            return str(event.message)
    return ""


def measure_wake(sandbox: Any, paths_asleep: dict[str, str] | None, expect: str) -> Wake:
    """Wake ``sandbox`` as a chat request does, then wait for ready and the first token.
    ``expect`` names the wake it should be (thaw, restore, boot); a restore that fell back to a
    boot says so."""
    from django.utils import timezone

    from sandboxes import actions

    cpu_before = probe.cpu_seconds(paths_asleep)
    since = timezone.now()
    steps: list[tuple[float, str]] = []
    t0 = time.monotonic()
    for step in actions.wake_sandbox(sandbox, actor_user=sandbox.owner):
        steps.append((time.monotonic() - t0, f"{step.percent:3d}% {step.message}"))
    woke = time.monotonic()
    sandbox.refresh_from_db()
    ready = probe.wait_ready(sandbox)
    steps += [(woke - t0, "wake_sandbox returned"), (ready - t0, "/readyz answered 200")]
    # A thawed sandbox's cgroup counts on; a booted or restored one's is new (cpu_before 0).
    cpu = probe.cpu_seconds(sandbox.backend_state.get("cgroups")) - cpu_before
    turn = probe.chat_turn(sandbox)
    steps += [
        (turn.connected - t0, "chat connected (protocol v4 hello)"),
        (turn.acked - t0, "chat.send acknowledged"),
        (turn.first_token - t0, "first reply token (delta event)"),
    ]
    failed = last_message(sandbox, since, "Could not resume")
    return Wake(
        ready=ready - t0,
        woke=woke - t0,
        connected=turn.connected - t0,
        first_token=turn.first_token - t0,
        cpu_s=cpu,
        how="boot (the restore failed)" if failed else expect,
        fallback=failed,
        steps=steps,
    )


def settle(seconds: float) -> None:
    time.sleep(seconds)


def run_awake(sandbox: Any, runs: int, pause: float) -> Phase:
    phase = Phase("awake")
    probe.chat_turn(sandbox)  # warm-up: the first turn after a boot compiles code paths
    for _ in range(runs):
        settle(pause)
        used, rss, procs = probe.memory(sandbox.backend_state.get("cgroups"))
        t0 = time.monotonic()
        turn = probe.chat_turn(sandbox)
        phase.wakes.append(
            Wake(
                ready=0.0,
                woke=0.0,
                connected=turn.connected - t0,
                first_token=turn.first_token - t0,
                asleep_mb=used,  # here: what the awake agent holds
                asleep_rss_mb=rss,
                asleep_procs=procs,
                how="awake",
            )
        )
        show(phase)
    return phase


def run_doze(sandbox: Any, runs: int, pause: float) -> Phase:
    from django.utils import timezone

    from sandboxes import sleep
    from sandboxes.backends import cgroups

    phase = Phase("doze")
    for _ in range(runs):
        settle(pause)
        since = timezone.now()
        t = time.monotonic()
        if not sleep.doze(sandbox):
            why = last_message(sandbox, since) or f"the sandbox stayed {reload(sandbox).state}"
            raise Unsupported(f"sleep.doze did not freeze it: {why}")
        slept = time.monotonic() - t
        paths = sandbox.backend_state["cgroups"]
        if not cgroups.is_frozen(paths):
            phase.notes.append("dozing, but the kernel did not report the cgroup frozen")
        used, rss, procs = probe.memory(paths)
        wake = measure_wake(sandbox, paths, "thaw")
        wake.asleep_mb, wake.asleep_rss_mb, wake.asleep_procs, wake.sleep_s = (
            used,
            rss,
            procs,
            slept,
        )
        phase.wakes.append(wake)
        show(phase)
    return phase


def run_hibernate(sandbox: Any, runs: int, pause: float, doze_first: bool) -> Phase:
    from django.utils import timezone

    from sandboxes import sleep
    from sandboxes.backends import get_backend
    from sandboxes.models import Checkpoint

    phase = Phase("hibernate")
    why = get_backend(sandbox.backend).checkpoint_support()
    if why:
        raise Unsupported(f"checkpoint_support(): {why}")
    for _ in range(runs):
        settle(pause)
        if doze_first:  # as the sleep policy does: an idle agent dozes, then hibernates
            sleep.doze(sandbox)
        paths = dict(sandbox.backend_state.get("cgroups") or {})
        since = timezone.now()
        t = time.monotonic()
        how = sleep.hibernate(sandbox, message="Bench: hibernating")
        slept = time.monotonic() - t
        sandbox = reload(sandbox)
        if how != "checkpointed":
            why = last_message(sandbox, since, "Stopped instead of hibernating") or how
            phase.notes.append(f"hibernate gave {how!r}: {why}")
            for _ in actions_wake(sandbox):
                pass
            if not phase.wakes:
                raise Unsupported(f"sleep.hibernate: {why}")
            break
        checkpoint = Checkpoint.objects.get(sandbox=sandbox)
        on_disk = probe.tree_size_mb(checkpoint.location)
        if abs(on_disk - checkpoint.size_bytes / probe.MB) > 1:
            phase.notes.append(
                f"checkpoint row says {checkpoint.size_bytes / probe.MB:.0f} MB, "
                f"disk use {on_disk:.0f} MB"
            )
        used, rss, procs = probe.memory(paths)
        wake = measure_wake(sandbox, paths, "restore")
        wake.asleep_mb, wake.asleep_rss_mb, wake.asleep_procs = used, rss, procs
        wake.image_mb, wake.sleep_s = checkpoint.size_bytes / probe.MB, slept
        if wake.fallback:  # not a hibernated wake: kept out of the figures, reported
            phase.fallbacks += 1
            print(
                f"  hibernate   restore failed; woke by a cold boot, ready in {wake.ready:.1f} s"
                f" (image {wake.image_mb:.0f} MB, checkpoint took {slept:.2f} s): {wake.fallback}",
                flush=True,
            )
            if not phase.wakes:  # the same each time: no more cold boots for nothing
                phase.unsupported = f"every restore fell back to a cold boot: {wake.fallback}"
                return phase
            continue
        phase.wakes.append(wake)
        show(phase)
    return phase


def actions_wake(sandbox: Any) -> Any:
    from sandboxes import actions

    return actions.wake_sandbox(sandbox, actor_user=sandbox.owner)


def run_cold(sandbox: Any, runs: int, pause: float) -> Phase:
    from sandboxes import actions, sleep
    from sandboxes.models import Sandbox

    phase = Phase("cold")
    for _ in range(runs):
        settle(pause)
        paths = dict(sandbox.backend_state.get("cgroups") or {})
        t = time.monotonic()
        actions.stop_sandbox(sandbox, to=Sandbox.State.SLEEPING)
        slept = time.monotonic() - t
        sleep.drop_checkpoint(sandbox)  # a cold start: nothing to resume from
        used, rss, procs = probe.memory(paths)
        wake = measure_wake(reload(sandbox), paths, "boot")
        wake.asleep_mb, wake.asleep_rss_mb, wake.asleep_procs, wake.sleep_s = (
            used,
            rss,
            procs,
            slept,
        )
        phase.wakes.append(wake)
        sandbox = reload(sandbox)
        show(phase)
    return phase


# -- sign-ups -----------------------------------------------------------------------------------


def provision(sandbox_id: int) -> None:
    """What the provisioning task does on a worker: a pooled gateway if one fits
    (``pool.adopt``, called by ``actions.provision_sandbox``), else a cold start."""
    from sandboxes import tasks

    tasks.provision_sandbox(sandbox_id)


def sign_up(index: int, pooled: bool, chat: bool) -> Wake:
    """A new user confirms their address; return the time until their agent is ready (and,
    with ``chat``, until the first token of their first message)."""
    from allauth.account.models import EmailAddress
    from allauth.account.signals import email_confirmed
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.db import transaction

    from sandboxes import actions
    from sandboxes.models import Sandbox

    email = f"{'pool' if pooled else 'cold'}{index}@wake.bench"
    user = get_user_model().objects.create_user(username=email.split("@")[0], email=email)
    address = EmailAddress.objects.create(user=user, email=email, primary=True, verified=False)
    first = Sandbox.objects.get(owner=user)
    settings.HERMIT_AUTO_PROVISION = True
    t0 = time.monotonic()
    with transaction.atomic():  # allauth's confirmation: verified, then the signal
        address.verified = True
        address.save(update_fields=["verified"])
        email_confirmed.send(sender=EmailAddress, request=None, email_address=address)
    queued = time.monotonic()
    provision(first.pk)  # the worker picking the task up (its queue wait is not counted)
    provisioned = time.monotonic()
    sandbox = Sandbox.objects.select_related("owner").get(owner=user)
    if sandbox.state != Sandbox.State.RUNNING:
        raise RuntimeError(f"sign-up {email}: {sandbox.state}: {sandbox.error_message}")
    ready = probe.wait_ready(sandbox)
    adopted = sandbox.pk != first.pk
    steps = [
        (queued - t0, "confirmed, provisioning queued"),
        (provisioned - t0, "provisioning task done"),
        (ready - t0, "/readyz answered 200"),
    ]
    connected = first_token = math.nan
    if chat:  # the new user's first message, at once
        turn = probe.chat_turn(sandbox)
        connected, first_token = turn.connected - t0, turn.first_token - t0
        steps += [
            (connected, "chat connected (protocol v4 hello)"),
            (turn.acked - t0, "chat.send acknowledged"),
            (first_token, "first reply token (delta event)"),
        ]
    wake = Wake(
        ready=ready - t0,
        woke=provisioned - t0,
        connected=connected,
        first_token=first_token,
        how="pooled gateway" if adopted else "boot",
        steps=steps,
    )
    actions.stop_sandbox(sandbox)  # one gateway at a time on this machine
    return wake


def run_signups(runs: int, pause: float, chat: bool) -> tuple[Phase, Phase]:
    from django.conf import settings

    from sandboxes import pool
    from sandboxes.models import Sandbox

    cold, warm = Phase("signup"), Phase("pool_signup")
    for i in range(runs):
        settings.HERMIT_WARM_POOL_SIZE = 0
        settle(pause)
        cold.wakes.append(sign_up(i, pooled=False, chat=chat))
        show(cold)
        settings.HERMIT_WARM_POOL_SIZE = 1
        t = time.monotonic()
        pool.fill_pool()  # as its task does (beat, and after each adoption)
        filled = time.monotonic() - t
        owner = pool.pool_user_id()
        if not Sandbox.objects.filter(owner_id=owner, state=Sandbox.State.RUNNING).exists():
            warm.notes.append(f"run {i + 1}: fill_pool left no running pooled gateway")
        settle(pause)
        wake = sign_up(i, pooled=True, chat=chat)
        wake.sleep_s = filled  # the pool's own (cold) boot, before the sign-up
        if wake.how != "pooled gateway":
            warm.notes.append(f"run {i + 1}: no pooled gateway was adopted (booted cold)")
        warm.wakes.append(wake)
        show(warm)
    settings.HERMIT_WARM_POOL_SIZE = 0
    pool.drain_pool()
    return cold, warm


# -- output -------------------------------------------------------------------------------------


def show(phase: Phase) -> None:
    w = phase.wakes[-1]
    parts = [f"  {phase.name:11} run {len(phase.wakes)}:"]
    if phase.name in ("signup", "pool_signup"):
        parts.append(f"ready {w.ready:7.3f} s (provisioned {w.woke:.3f} s)")
    elif phase.name != "awake":
        parts.append(f"ready {w.ready:7.3f} s (wake_sandbox {w.woke:.3f} s)")
    if not math.isnan(w.first_token):
        parts.append(f"first token {w.first_token:6.3f} s (connected {w.connected:.3f})")
    if phase.name == "awake":
        parts.append(f"holds {w.asleep_mb:.0f} MB/{w.asleep_procs} procs")
    if phase.name in ("doze", "hibernate", "cold"):
        parts.append(f"asleep {w.asleep_mb:.0f} MB/{w.asleep_procs} procs")
        parts.append(f"to sleep {w.sleep_s:.2f} s")
    if not math.isnan(w.image_mb):
        parts.append(f"image {w.image_mb:.0f} MB")
    if not math.isnan(w.cpu_s):
        parts.append(f"cpu {w.cpu_s:.2f} s")
    if phase.name == "pool_signup":
        parts.append(f"(pool fill boot {w.sleep_s:.1f} s)")
    parts.append(f"[{w.how}] load {probe.loadavg()}")
    print(" ".join(parts), flush=True)


def fmt(value: float, digits: int = 3) -> str:
    return "nan" if math.isnan(value) else f"{value:.{digits}f}"


def report(phases: dict[str, Phase], args: argparse.Namespace, load: tuple[str, str]) -> None:
    def get(name: str) -> Phase:
        return phases.get(name) or Phase(name, unsupported="skipped")

    awake, doze, hib, cold = get("awake"), get("doze"), get("hibernate"), get("cold")
    signup, pooled = get("signup"), get("pool_signup")
    print()
    print(
        f"{'':18}{'n':>3} {'ready p50':>10} {'p95':>8} {'1st token p50':>14} {'p95':>8}"
        f" {'RAM held':>11} {'image':>8}  how"
    )
    for label, ph in (
        ("awake (baseline)", awake),
        ("doze (frozen)", doze),
        ("hibernate (CRIU)", hib),
        ("cold start", cold),
        ("sign-up, no pool", signup),
        ("sign-up, warm pool", pooled),
    ):
        if ph.unsupported or not ph.wakes:
            print(f"{label:18}  - unsupported: {ph.unsupported or 'no runs'}")
            continue
        ready = "" if ph is awake else f"{ph.p('ready', 50):9.3f}s {ph.p('ready', 95):7.3f}s"
        token = ph.p("first_token", 50)
        tok = "" if math.isnan(token) else f"{token:13.3f}s {ph.p('first_token', 95):7.3f}s"
        held = ""
        if ph in (awake, doze, hib, cold):
            held = f"{statistics.median(ph.values('asleep_mb')):8.0f} MB"
        image = ""
        if ph is hib:
            image = f"{statistics.median(ph.values('image_mb')):5.0f} MB"
        hows = sorted({w.how for w in ph.wakes})
        print(
            f"{label:18}{len(ph.wakes):>3} {ready:>19} {tok:>23} {held:>11} {image:>8}"
            f"  {', '.join(hows)}"
        )
        for note in ph.notes:
            print(f"{'':21}note: {note}")

    def med(ph: Phase, attr: str) -> float:
        return ph.p(attr, 50) if ph.wakes and not ph.unsupported else math.nan

    def ram(ph: Phase, attr: str = "asleep_mb") -> float:
        return statistics.median(ph.values(attr)) if ph.wakes and not ph.unsupported else math.nan

    def p95(ph: Phase, attr: str) -> float:
        return ph.p(attr, 95) if ph.wakes and not ph.unsupported else math.nan

    def ratio(a: float, b: float) -> float:
        return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan

    awake_ft = med(awake, "first_token")
    result: dict[str, str] = {}
    for key, ph in (("doze", doze), ("hibernate", hib), ("cold", cold)):
        result[f"{key}_ready_p50_s"] = fmt(med(ph, "ready"))
        result[f"{key}_ready_p95_s"] = fmt(p95(ph, "ready"))
        result[f"{key}_first_token_p50_s"] = fmt(med(ph, "first_token"))
        result[f"{key}_first_token_p95_s"] = fmt(p95(ph, "first_token"))
        result[f"{key}_first_token_extra_s"] = fmt(med(ph, "first_token") - awake_ft)
        result[f"{key}_ready_to_first_token_p50_s"] = fmt(med(ph, "after_ready"))
    result["awake_first_token_p50_s"] = fmt(awake_ft)
    result["awake_first_token_p95_s"] = fmt(p95(awake, "first_token"))
    result["signup_ready_p50_s"] = fmt(med(signup, "ready"))
    result["signup_ready_p95_s"] = fmt(p95(signup, "ready"))
    result["pool_signup_ready_p50_s"] = fmt(med(pooled, "ready"))
    result["pool_signup_ready_p95_s"] = fmt(p95(pooled, "ready"))
    result["signup_first_token_p50_s"] = fmt(med(signup, "first_token"))
    result["pool_signup_first_token_p50_s"] = fmt(med(pooled, "first_token"))
    result["awake_ram_mb"] = fmt(ram(awake), 0)
    result["doze_ram_mb"] = fmt(ram(doze), 0)
    result["doze_rss_mb"] = fmt(ram(doze, "asleep_rss_mb"), 0)
    result["hibernate_ram_mb"] = fmt(ram(hib), 0)
    result["cold_ram_mb"] = fmt(ram(cold), 0)
    result["checkpoint_mb"] = fmt(ram(hib, "image_mb"), 0)
    result["hibernate_sleep_p50_s"] = fmt(med(hib, "sleep_s"), 2)
    result["hibernate_cpu_p50_s"] = fmt(med(hib, "cpu_s"), 2)
    result["cold_cpu_p50_s"] = fmt(med(cold, "cpu_s"), 2)
    result["cold_over_hibernate_ready"] = fmt(ratio(med(cold, "ready"), med(hib, "ready")), 1)
    result["cold_over_doze_ready"] = fmt(ratio(med(cold, "ready"), med(doze, "ready")), 0)
    result["signup_over_pool_signup_ready"] = fmt(
        ratio(med(signup, "ready"), med(pooled, "ready")), 1
    )
    result["hibernate_fallbacks"] = str(hib.fallbacks)
    result["runs"] = str(args.runs)
    result["load_start"] = load[0].split()[0]
    result["load_end"] = load[1].split()[0]

    targets: list[tuple[str, float, Callable[[float], bool], str]] = [
        ("hibernated wake -> ready p50 < 1 s", med(hib, "ready"), lambda v: v < 1, "s"),
        ("hibernated agent holds 0 MB RAM", ram(hib), lambda v: v == 0, "MB"),
        ("doze wake -> ready p50 < 50 ms", med(doze, "ready") * 1000, lambda v: v < 50, "ms"),
        *[
            (
                f"{k}: request -> first token within 1 s of awake's",
                med(ph, "first_token") - awake_ft,
                lambda v: v <= 1,
                "s more",
            )
            for k, ph in (("doze", doze), ("hibernate", hib), ("cold", cold))
        ],
        *[
            (
                f"{k}: ready -> first token within 1 s of awake's request -> first token",
                med(ph, "after_ready") - awake_ft,
                lambda v: v <= 1,
                "s more",
            )
            for k, ph in (("doze", doze), ("hibernate", hib), ("cold", cold))
        ],
        ("pooled sign-up -> ready p50 < 2 s", med(pooled, "ready"), lambda v: v < 2, "s"),
    ]
    print("\nTargets (issue 10, this 2-core machine):")
    for label, value, ok, unit in targets:
        verdict = "n/a " if math.isnan(value) else "PASS" if ok(value) else "MISS"
        print(f"  {verdict} {label}: {fmt(value, 3)} {unit}")

    print("\nWhere the time goes (the median-ready run of each; seconds from the chat request):")
    for ph in (doze, hib, cold, signup, pooled):
        if not ph.wakes or ph.unsupported:
            continue
        ordered = sorted(ph.wakes, key=lambda w: w.ready)
        wake = ordered[len(ordered) // 2]
        print(f"  {ph.name}:")
        steps = wake.steps
        for i, (at, what) in enumerate(steps):
            repeated = 0 < i < len(steps) - 1 and steps[i - 1][1] == what == steps[i + 1][1]
            if not repeated:  # of a run of the same progress message, its first and last
                print(f"    {at:8.3f}  {what}")
    print(
        f"\nload average at start {load[0]}, at end {load[1]} ({os.cpu_count()} cores; the"
        " machine is shared, so other work lengthens the boots most)."
    )
    print("\nRESULT " + " ".join(f"{k}={v}" for k, v in result.items()), flush=True)


# -- main ---------------------------------------------------------------------------------------


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="wakes per way of sleeping")
    parser.add_argument("--signup-runs", type=int, help="sign-ups each way (default: --runs)")
    parser.add_argument(
        "--no-signup-chat",
        dest="chat",
        action="store_false",
        help="no first message after each sign-up",
    )
    parser.add_argument("--pause", type=float, default=1.0, help="idle seconds before each")
    parser.add_argument("--skip", default="", help=f"phases to leave out, of {','.join(PHASES)}")
    args = parser.parse_args()
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(PHASES):
        parser.error(f"unknown phases: {', '.join(sorted(skip - set(PHASES)))}")
    if os.geteuid() != 0:
        parser.error("the local backend needs root (bubblewrap, pasta and cgroups)")
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    load_start = probe.loadavg()
    started = time.monotonic()
    tmp = env.configure(f"{os.getpid()}")
    for name in ("billing", "kombu"):  # a line per model call, and the unused broker's notes
        logging.getLogger(name).setLevel(logging.WARNING if name == "billing" else logging.ERROR)
    phases: dict[str, Phase] = {}
    try:
        with env.model_and_gateway() as model:
            model.script(reply=REPLY, chunks=6, delay=0.01)
            phases = measure(args, skip)
    finally:
        problems = env.stop_everything()
        env.remove_data_dir(tmp)
        for problem in problems:
            print(f"cleanup: {problem}", file=sys.stderr)
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    report(phases, args, (load_start, probe.loadavg()))


def measure(args: argparse.Namespace, skip: set[str]) -> dict[str, Phase]:
    from sandboxes import actions
    from sandboxes.models import Sandbox
    from tests.factories import make_user

    runs, pause = args.runs, args.pause
    phases: dict[str, Phase] = {}
    signups = args.signup_runs or runs
    if set(PHASES[:4]) <= skip:
        if "signup" not in skip:
            phases["signup"], phases["pool_signup"] = run_signups(signups, pause, args.chat)
        return phases
    sandbox = Sandbox.objects.get(owner=make_user("agent@wake.bench"))
    t = time.monotonic()
    actions.provision_sandbox(sandbox)
    sandbox = reload(sandbox)
    if sandbox.state != Sandbox.State.RUNNING:
        raise RuntimeError(f"the bench's agent did not start: {sandbox.error_message}")
    print(f"first boot of the bench's agent: {time.monotonic() - t:.1f} s, load {probe.loadavg()}")

    def attempt(name: str, run: Callable[[], Phase]) -> None:
        if name in skip:
            return
        try:
            phases[name] = run()
        except Unsupported as exc:
            print(f"  {name}: unsupported here: {exc}", flush=True)
            phases[name] = Phase(name, unsupported=str(exc))

    attempt("awake", lambda: run_awake(sandbox, runs, pause))
    attempt("doze", lambda: run_doze(reload(sandbox), runs, pause))
    doze_works = bool(phases.get("doze") and phases["doze"].wakes)
    attempt("hibernate", lambda: run_hibernate(reload(sandbox), runs, pause, doze_works))
    attempt("cold", lambda: run_cold(reload(sandbox), runs, pause))
    sandbox = reload(sandbox)
    if sandbox.state == Sandbox.State.RUNNING:
        actions.stop_sandbox(sandbox)  # one gateway at a time for the sign-ups
    if "signup" not in skip:
        phases["signup"], phases["pool_signup"] = run_signups(signups, pause, args.chat)
    return phases


if __name__ == "__main__":
    main()
