"""Benchmark the AI gateway against calling the fake model upstream directly.

Prints, for OpenAI-style streaming chat completions:
- time to first byte (p50, p99) direct vs through the gateway, and the ratio / added ms;
- per-chunk time of a 200-chunk stream with no upstream delay (p50, p99), direct vs gateway;
- throughput at 50 concurrent streams (streams/s and chunks/s), direct vs gateway, their waves
  taking turns so that both see the same load from the rest of the machine.

The gateway runs as in production: ``uvicorn ai_gateway.asgi:application`` (or
``--server daphne``) in its own process, on a throwaway SQLite database, or with
``DATABASE_URL`` (or ``--database-url``) on a throwaway database created next to the one named
(and dropped afterwards); with Redis when ``REDIS_URL`` (or ``--redis-url``) is set. The fake
upstream runs in its own process too. Ends with one ``RESULT key=value ...`` line of the
headline figures (and the load average). Usage:

    .venv/bin/python bench/ai_gateway.py [--requests 200] [--concurrency 50]
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/hermit REDIS_URL=redis://127.0.0.1:6379/0 \
        .venv/bin/python bench/ai_gateway.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
sys.path.insert(0, str(ROOT))

from tests.net import free_port, stop_process, wait_for_port  # noqa: E402


@contextmanager
def process(args: list[str], env: dict[str, str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield proc
    finally:
        stop_process(proc)


def fake_upstream(env: dict[str, str], port: int, chunks: int, delay: float) -> Any:
    args = [PYTHON, "-m", "tests.fakes.model_server", "--port", str(port),
            "--chunks", str(chunks), "--delay", str(delay), "--reply", "x" * chunks]  # fmt: skip
    return process(args, env, port)


def setup_database(env: dict[str, str], upstream_base: str) -> str:
    """Migrate, create a user, sandbox, operator upstream; return the sandbox's gateway key."""
    subprocess.run([PYTHON, "manage.py", "migrate", "-v", "0"], env=env, cwd=ROOT, check=True)
    script = f"""
import django; django.setup()
from django.contrib.auth import get_user_model
from billing.models import plan_for
from ai_gateway.models import Upstream
from ai_gateway.credentials import rotate_credential
from sandboxes.actions import create_sandbox
user = get_user_model().objects.create_user(username="bench", email="bench@example.com")
plan = plan_for(user); plan.requests_per_minute = 0; plan.monthly_token_quota = 0
plan.monthly_spend_limit = 0; plan.save()
Upstream.objects.update_or_create(name="bench", defaults=dict(provider="openai",
    base_url={upstream_base!r}, api_key="sk-bench", is_operator=True))
print(rotate_credential(create_sandbox(user)))
"""
    out = subprocess.run([PYTHON, "-c", script], env=env, cwd=ROOT, check=True,
                         capture_output=True, text=True)  # fmt: skip
    return out.stdout.strip().splitlines()[-1]


BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "stream_options": {"include_usage": True}}  # fmt: skip


async def one_stream(client: httpx.AsyncClient, url: str, key: str) -> tuple[float, list[float]]:
    """Return (time to first byte, arrival time of every body piece), seconds from the start."""
    started = time.perf_counter()
    arrivals: list[float] = []
    headers = {"Authorization": f"Bearer {key}"}
    async with client.stream("POST", url, json=BODY, headers=headers) as response:
        response.raise_for_status()
        async for _ in response.aiter_raw():
            arrivals.append(time.perf_counter() - started)
    return arrivals[0], arrivals


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def sequential(targets: dict[str, tuple[str, str]], n: int,
                     chunks: int = 3) -> dict[str, list[float]]:  # fmt: skip
    """Interleave direct and gateway calls; return TTFBs and per-chunk times for each.

    A per-chunk time is the time from the first body byte to the last over ``chunks`` (the
    upstream's chunk count): the number of pieces a client reads depends on how the bytes were
    coalesced on the way, so it is no measure of the stream.
    """
    out: dict[str, list[float]] = {f"{k}_{m}": [] for k in targets for m in ("ttfb", "chunk")}
    async with httpx.AsyncClient(timeout=60) as client:
        for url, key in targets.values():  # warm up connections and code paths
            for _ in range(5):
                await one_stream(client, url, key)
        for _ in range(n):
            for name, (url, key) in targets.items():
                ttfb, arrivals = await one_stream(client, url, key)
                out[f"{name}_ttfb"].append(ttfb)
                out[f"{name}_chunk"].append((arrivals[-1] - arrivals[0]) / chunks)
    return out


async def concurrent(targets: dict[str, tuple[str, str]], streams: int,
                     rounds: int) -> dict[str, tuple[float, int]]:  # fmt: skip
    """Run ``rounds`` waves of ``streams`` concurrent streams on each target, the targets' waves
    taking turns (so both see the same machine load); return {target: (seconds, pieces)}."""
    limits = httpx.Limits(max_connections=streams * 2, max_keepalive_connections=streams)
    out = {name: (0.0, 0) for name in targets}
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        for url, key in targets.values():  # warm-up
            await asyncio.gather(*(one_stream(client, url, key) for _ in range(streams)))
        for _ in range(rounds):
            for name, (url, key) in targets.items():
                started = time.perf_counter()
                results = await asyncio.gather(
                    *(one_stream(client, url, key) for _ in range(streams))
                )
                seconds, pieces = out[name]
                out[name] = (
                    seconds + time.perf_counter() - started,
                    pieces + sum(len(arrivals) for _, arrivals in results),
                )
    return out


SERVERS = {
    "daphne": lambda port: [PYTHON, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                            "ai_gateway.asgi:application"],
    "uvicorn": lambda port: [PYTHON, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port),
                             "--log-level", "warning", "--no-access-log", "--lifespan", "on",
                             "ai_gateway.asgi:application"],
}  # fmt: skip


def ms(value: float) -> str:
    return f"{value * 1000:.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--server", choices=sorted(SERVERS), default="uvicorn",
                        help="the ASGI server the gateway runs under")  # fmt: skip
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""))
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", ""))
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="hermit-bench-")
    try:
        with throwaway_database(args.database_url) as database_url:
            args.database_url = database_url
            run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def throwaway_database(url: str) -> Iterator[str]:
    """Yield a URL to a fresh database on the server ``url`` names (dropped afterwards).

    An empty ``url`` (SQLite in the bench's temporary data dir) is yielded as it is.
    """
    if not url:
        yield url
        return
    import psycopg

    name = f"hermit_bench_{os.getpid()}"
    server = url.rsplit("/", 1)[0]
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{server}/{name}"
    finally:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run(args: argparse.Namespace, tmp: str) -> None:
    env = {**os.environ, "HERMIT_DATA_DIR": tmp, "DATABASE_URL": args.database_url,
           "REDIS_URL": args.redis_url, "DJANGO_SETTINGS_MODULE": "portal.settings",
           "PYTHONPATH": str(ROOT), "LOG_LEVEL": "WARNING", "DEBUG": "True",
           "HERMIT_AI_MAX_CONCURRENT_CALLS": "0"}  # fmt: skip
    upstream_port, gateway_port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{upstream_port}/v1"
    key = setup_database(env, upstream)
    server = SERVERS[args.server](gateway_port)
    targets = {
        "direct": (f"{upstream}/chat/completions", "sk-bench"),
        "gateway": (f"http://127.0.0.1:{gateway_port}/ai/v1/chat/completions", key),
    }
    print(f"AI gateway benchmark ({os.cpu_count()} CPUs, gateway under {args.server}, "
          f"{'PostgreSQL' if args.database_url else 'SQLite'}, "
          f"{'Redis' if args.redis_url else 'local'} rate limiter)")  # fmt: skip
    result: dict[str, str] = {
        "database": "postgresql" if args.database_url else "sqlite",
        "rate_limiter": "redis" if args.redis_url else "local",
        "server": args.server,
    }
    with process(server, env, gateway_port):
        with fake_upstream(env, upstream_port, chunks=3, delay=0):
            seq = asyncio.run(sequential(targets, args.requests))
        print(f"\nTime to first byte, {args.requests} sequential streams (3 chunks):")
        for p in (50, 99):
            d, g = pct(seq["direct_ttfb"], p), pct(seq["gateway_ttfb"], p)
            print(f"  p{p}: direct {ms(d)}  gateway {ms(g)}  added {ms(g - d)}  ratio {g / d:.2f}x")
            result[f"ttfb_added_p{p}_ms"] = f"{(g - d) * 1000:.2f}"

        with fake_upstream(env, upstream_port, chunks=200, delay=0):
            seq = asyncio.run(sequential(targets, max(20, args.requests // 4), chunks=200))
        print("\nPer-chunk time, 200-chunk streams with no upstream delay:")
        for p in (50, 99):
            d, g = pct(seq["direct_chunk"], p), pct(seq["gateway_chunk"], p)
            print(f"  p{p}: direct {d * 1e6:.1f} us  gateway {g * 1e6:.1f} us  "
                  f"added {(g - d) * 1e6:.1f} us/chunk  ratio {g / d:.2f}x")  # fmt: skip
            result[f"chunk_added_p{p}_us"] = f"{(g - d) * 1e6:.1f}"

        with fake_upstream(env, upstream_port, chunks=20, delay=0.02):
            print(f"\nThroughput, {args.concurrency} concurrent streams x {args.rounds} waves "
                  "(20 chunks, 20 ms apart upstream):")  # fmt: skip
            waves = asyncio.run(concurrent(targets, args.concurrency, args.rounds))
            for name, (seconds, pieces) in waves.items():
                streams = args.concurrency * args.rounds
                print(f"  {name:8s}: {streams / seconds:7.1f} streams/s  "
                      f"{pieces / seconds:8.0f} pieces/s  ({seconds:.2f} s)")  # fmt: skip
            ratio = waves["gateway"][0] / waves["direct"][0]
            print(f"  gateway/direct time ratio {ratio:.2f}x")
            result[f"stream{args.concurrency}_ratio"] = f"{ratio:.2f}"

        with fake_upstream(env, upstream_port, chunks=3, delay=0):
            print(f"\nThroughput, {args.concurrency} concurrent short streams x "
                  f"{args.rounds * 2} waves (no upstream delay):")  # fmt: skip
            waves = asyncio.run(concurrent(targets, args.concurrency, args.rounds * 2))
            for name, (seconds, _) in waves.items():
                streams = args.concurrency * args.rounds * 2
                print(f"  {name:8s}: {streams / seconds:7.1f} streams/s  ({seconds:.2f} s)")
                result[f"short_{name}_streams_per_s"] = f"{streams / seconds:.1f}"
    result["load1"] = f"{os.getloadavg()[0]:.2f}"
    print("\nRESULT " + " ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
