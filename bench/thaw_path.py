"""What the privilege split adds to a dozing agent's thaw: in-process vs through the worker.

The chat (unprivileged daphne) never thaws a dozing sandbox itself: it queues
``sandboxes.tasks_host.thaw`` on the sandbox's host and polls the cache for the reply every
20 ms, as ``ChatConsumer._thaw`` does. This bench puts one real agent (real OpenClaw gateway in
bubblewrap, local backend, fake model through the AI gateway) to sleep with ``sleep.doze`` again
and again, and wakes it two ways, alternating:

- in-process: ``sleep.wake_if_dozing`` called directly (what bench/wake.py's doze measures);
- worker path: ``tasks_host.thaw.delay`` to a real Celery worker (root, started here with the
  product's settings) over Redis as broker and cache, as in production, then the reply polled
  as the chat polls it.

For each it times the thaw (until it returned / its reply was read) and the first token of a
chat turn on a new connection after it. Prints p50/p95 of each and the worker path's added
milliseconds, and ends with one ``RESULT`` line. Needs root and Redis (``--redis``, database 13
by default, flushed before and after); the database is a throwaway SQLite file.

    .venv/bin/python bench/thaw_path.py [--runs 10] [--redis redis://127.0.0.1:6379/13]
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import _wake_env as env  # noqa: E402
import _wake_probe as probe  # noqa: E402

REPLY = "Thawed and answering."
POLL = 0.02  # as ChatConsumer._thaw polls for its reply


@contextmanager
def worker(log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A Celery worker as bin/run starts one (root), on this bench's settings and Redis."""
    args = [sys.executable, "-m", "celery", "-A", "portal", "worker", "-l", "INFO"]
    args += ["--concurrency", "1", "--without-gossip", "--without-mingle"]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while b"ready." not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start; its log:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def doze(sandbox: Any) -> None:
    from sandboxes import sleep

    if not sleep.doze(sandbox):
        raise RuntimeError(f"sleep.doze did not freeze the agent (state {sandbox.state})")


def thaw_in_process(sandbox: Any) -> float:
    from sandboxes import sleep

    t0 = time.monotonic()
    sleep.wake_if_dozing(sandbox, actor_user=sandbox.owner)
    return t0


def thaw_through_worker(sandbox: Any) -> float:
    from sandboxes import tasks_host

    t0 = time.monotonic()
    token = tasks_host.new_token()
    tasks_host.thaw.delay(sandbox.pk, sandbox.owner_id, token)
    reply = tasks_host.wait_reply(token, 30, poll=POLL)
    if not reply or reply.get("state") != "running":
        raise RuntimeError(f"the worker's thaw replied {reply!r}")
    return t0


def measure(sandbox: Any, runs: int, pause: float) -> dict[str, dict[str, list[float]]]:
    from sandboxes.models import Sandbox

    ways = {"in-process": thaw_in_process, "worker": thaw_through_worker}
    got: dict[str, dict[str, list[float]]] = {w: {"thaw": [], "first": []} for w in ways}
    for run in range(runs):
        for name, way in ways.items():
            time.sleep(pause)
            sandbox = Sandbox.objects.select_related("owner").get(pk=sandbox.pk)
            doze(sandbox)
            t0 = way(sandbox)
            thawed = time.monotonic()
            sandbox.refresh_from_db()
            turn = probe.chat_turn(sandbox)
            got[name]["thaw"].append((thawed - t0) * 1000)
            got[name]["first"].append((turn.first_token - t0) * 1000)
            print(
                f"  run {run + 1:>2} {name:<10} thaw {got[name]['thaw'][-1]:7.1f} ms, "
                f"first token {got[name]['first'][-1]:7.1f} ms",
                flush=True,
            )
    return got


def redis_answers(url: str) -> bool:
    import redis

    try:
        redis.Redis.from_url(url, socket_timeout=2).ping()
    except redis.RedisError:
        return False
    return True


def flush(url: str) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="thaws each way")
    parser.add_argument("--pause", type=float, default=0.5, help="idle seconds before each doze")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("the local backend needs root (bubblewrap, pasta and cgroups)")
    if not redis_answers(args.redis):
        parser.error(f"no Redis answers at {args.redis}: the worker path needs a broker")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"signal {signum}"))
    load_start = probe.loadavg()
    started = time.monotonic()
    flush(args.redis)
    tmp = env.configure(f"thaw{os.getpid()}", redis_url=args.redis)
    for name in ("billing", "ai_gateway"):  # a line per model call
        logging.getLogger(name).setLevel(logging.WARNING)
    got: dict[str, dict[str, list[float]]] = {}
    try:
        with env.model_and_gateway() as model, worker(tmp / "worker.log"):
            model.script(reply=REPLY, chunks=6, delay=0.01)
            got = run(args)
    finally:
        problems = env.stop_everything()
        env.remove_data_dir(tmp)
        flush(args.redis)
        for problem in problems:
            print(f"cleanup: {problem}", file=sys.stderr)
    report(got, load_start, time.monotonic() - started)


def run(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    from sandboxes import actions
    from sandboxes.models import Sandbox
    from tests.factories import make_user

    sandbox = Sandbox.objects.get(owner=make_user("agent@thaw.bench"))
    actions.provision_sandbox(sandbox)
    sandbox.refresh_from_db()
    if sandbox.state != Sandbox.State.RUNNING:
        raise RuntimeError(f"the bench's agent did not start: {sandbox.error_message}")
    probe.chat_turn(sandbox)  # warm-up: the first turn after a boot compiles code paths
    print(f"dozing and thawing one agent {args.runs} times each way, alternating", flush=True)
    return measure(sandbox, args.runs, args.pause)


def report(got: dict[str, dict[str, list[float]]], load_start: str, wall: float) -> None:
    def p(way: str, what: str, q: float) -> float:
        return probe.percentile(got[way][what], q)

    print("\n  way          thaw p50   thaw p95   first token p50   first token p95")
    for way in got:
        print(
            f"  {way:<10} {p(way, 'thaw', 50):8.1f} ms {p(way, 'thaw', 95):7.1f} ms"
            f" {p(way, 'first', 50):12.1f} ms {p(way, 'first', 95):12.1f} ms"
        )
    added = p("worker", "thaw", 50) - p("in-process", "thaw", 50)
    print(f"\n  the worker path adds {added:.1f} ms at p50 to a thaw (queue, worker, reply poll)")
    print(f"  load average {load_start} at start, {probe.loadavg()} at the end; {wall:.0f} s")
    fields = {
        "thaw_inprocess_p50_ms": p("in-process", "thaw", 50),
        "thaw_worker_p50_ms": p("worker", "thaw", 50),
        "thaw_worker_p95_ms": p("worker", "thaw", 95),
        "worker_added_p50_ms": added,
        "first_token_inprocess_p50_ms": p("in-process", "first", 50),
        "first_token_worker_p50_ms": p("worker", "first", 50),
    }
    print("\nRESULT " + " ".join(f"{k}={v:.1f}" for k, v in fields.items()), flush=True)


if __name__ == "__main__":
    main()
