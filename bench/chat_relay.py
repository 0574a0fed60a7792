"""Benchmark the webchat relay (ChatConsumer in daphne): what it adds to every streamed frame,
and how many chat sessions ONE daphne process carries.

Part 1, per streamed frame, with a real OpenClaw gateway (bare, no sandbox) and the fake model
streaming in the real OpenAI format: one browser-like client chats through the portal while a
direct protocol client watches the same gateway. For every ``chat`` delta frame it records when
the gateway stamped it (``message.timestamp``), when the direct client got it and when the
portal client got it. Prints latency p50/p99 direct vs relay, their ratio, and the added ms.

Part 2, scale: levels of N concurrent chat sessions (default up to 1,000) through ONE daphne
process, each sending one message a second; every reply is 10 words from the model 20 ms
apart, which the gateway sends as OpenClaw does: the first delta at once, then at most one
delta every 75 ms with the words buffered since (OpenClaw's LIVE_TEXT_PACING_MS), so 4 delta
frames and a final per reply, about 5 x N frames a second for N sessions.
A real OpenClaw gateway per session is out of reach (about
0.9 GB and 12 CPU-s each), so the gateway is a protocol-v4 double in a subprocess (challenge,
connect, chat.send/history/abort, chat events as OpenClaw sends them), which also keeps
OpenClaw's own CPU cost from hiding the portal's. Every session's sandbox row points at it with
a token of its own; the browsers are load-worker subprocesses. Up to 100 sessions per level
also have a direct watcher on the double under the same token, which gets each delta when the
portal's connection does (a gateway broadcasts chat events to all its operator connections):
the relay's added latency of a frame is the browser's receipt minus the watcher's, so the load
generator's and the double's own lag cancel out. Per level it prints the relayed frames a
second, the share delivered, latency from the double's stamp, the added p50/p99, and daphne's
CPU-ms per relayed frame; then the largest level at which the relay adds under 50 ms p99
(target 1,000 sessions; that level and every one below it must pass and deliver every frame),
and the added latency per frame at 100 sessions (target: p99 under 2 ms). Once the relay has
fallen seconds behind (added p50 over 1 s) the larger levels are listed as not run, which keeps
the default run within minutes on a small machine (``--all-levels`` runs them anyway).

Everything runs on this machine: daphne as in production (``portal.asgi``, DEBUG off, Redis as
cache and channel layer when one answers at ``--redis``, database 14 by default; a throwaway
SQLite database), and the load average is printed at the start, per level and at the end, as
other work on the machine skews every figure. The throwaway data dir is a fresh temporary
directory; the runtime image is the one the settings name (so no build), wherever the checkout
is. ``--profile-daphne PATH`` writes daphne's cProfile stats. Ends with one
``RESULT key=value ...`` line: ``relay_added_p50_ms``, ``relay_added_p99_ms``,
``direct_p50_ms``, ``relay_p50_ms`` (part 1); ``max_sessions``, ``added_p50_ms_at_max``,
``added_p99_ms_at_max``, ``added_p50_ms_at_100``, ``added_p99_ms_at_100``,
``daphne_cpu_ms_per_frame`` (part 2); ``load1_start``, ``load1_end``, ``cpus``, ``wall_s``.

    .venv/bin/python bench/chat_relay.py [--messages 20] [--levels 1,10,100,250,500,750,1000]
        [--seconds 10] [--skip-openclaw] [--all-levels] [--redis URL|'']
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import runpy
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.net import free_port, stop_process, wait_for_port  # noqa: E402

PYTHON = sys.executable
FAKE_TOKEN = "fake-gateway-token"


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# --- a fake protocol-v4 gateway (part 2) ---------------------------------------------------------


# OpenClaw sends a run's chat deltas at most every 75 ms (LIVE_TEXT_PACING_MS in its
# server-chat module), buffering the model's text in between; the double does the same.
PACING = 0.075
REPLY_WORDS, WORD_SPACING = 10, 0.02  # a reply: 10 words from the model, 20 ms apart


async def fake_gateway(port: int, deltas: int, spacing: float) -> None:
    """Serve the v4 subset the portal uses: challenge, connect, chat.send/history/abort.

    Connections that authenticate with the same token are one gateway's operators: a reply to
    a ``chat.send`` from any of them streams to all of them (OpenClaw broadcasts chat events
    to every operator connection), each delta stamped with the time it is sent."""
    import websockets

    boot = str(uuid.uuid4())
    operators: dict[str, list[Any]] = {}

    async def handler(ws: Any) -> None:
        await ws.send(
            json.dumps(
                {
                    "type": "event",
                    "event": "connect.challenge",
                    "payload": {"nonce": str(uuid.uuid4()), "ts": 0},
                }
            )
        )
        tasks: set[asyncio.Task[None]] = set()
        token = ""
        try:
            async for raw in ws:
                req = json.loads(raw)
                method, rid, params = req.get("method"), req.get("id"), req.get("params") or {}
                if method == "connect":
                    token = str((params.get("auth") or {}).get("token") or "")
                    operators.setdefault(token, []).append(ws)
                    payload: dict[str, Any] = {
                        "type": "hello-ok",
                        "protocol": 4,
                        "server": {"version": "fake", "bootId": boot, "connId": str(uuid.uuid4())},
                        "snapshot": {"sessionDefaults": {"mainSessionKey": "agent:main:main"}},
                    }
                elif method == "chat.send":
                    run = params["idempotencyKey"]
                    payload = {"runId": run, "status": "started"}
                    task = asyncio.ensure_future(stream(token, run))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                elif method == "chat.history":
                    payload = {"messages": []}
                else:
                    payload = {"ok": True}
                await ws.send(
                    json.dumps({"type": "res", "id": rid, "ok": True, "payload": payload})
                )
        finally:
            if ws in operators.get(token, []):
                operators[token].remove(ws)

    def chat_event(run: str, state: str, text: str, **extra: Any) -> str:
        message = {"role": "assistant", "content": [{"type": "text", "text": text}]}
        payload = {"runId": run, "sessionKey": "agent:main:main", "state": state, **extra}
        return json.dumps(
            {"type": "event", "event": "chat", "payload": {**payload, "message": message}}
        )

    async def broadcast(token: str, frame: str) -> None:
        for ws in list(operators.get(token, [])):
            with suppress(websockets.ConnectionClosed):
                await ws.send(frame)

    async def stream(token: str, run: str) -> None:
        """The model's ``deltas`` words, ``spacing`` s apart, broadcast as OpenClaw paces them:
        the first at once, then buffered words at most every PACING s, the rest before the
        final. Each frame's ``deltaText`` starts with its send time (``@<epoch>``)."""
        text, pending, sent_at = "", "", -PACING
        for seq in range(deltas):
            await asyncio.sleep(spacing)
            pending += f"w{seq} "
            if time.monotonic() - sent_at >= PACING or seq == deltas - 1:
                piece, pending, sent_at = f"@{time.time():.6f} {pending}", "", time.monotonic()
                text += piece
                await broadcast(token, chat_event(run, "delta", text, seq=seq, deltaText=piece))
        await broadcast(token, chat_event(run, "final", "done"))

    async with websockets.serve(handler, "127.0.0.1", port, max_size=None, compression=None):
        await asyncio.Future()


# --- processes and Django ----------------------------------------------------------------------


@contextmanager
def process(args: list[str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env=os.environ.copy(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for_port(port, timeout=60)
            yield proc
        finally:
            stop_process(proc)


def configure_django(tmp: Path, daphne_port: int, redis_url: str) -> None:
    """Point Django (this process and the servers it starts) at a throwaway data dir in ``tmp``
    (SQLite database), keeping the runtime image the settings would use without it; with
    ``redis_url``, the cache and channel layer are Redis, as in production."""
    from cryptography.fernet import Fernet

    for name in ("DATABASE_URL", "REDIS_URL"):
        os.environ.pop(name, None)
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "portal.settings",
            "DEBUG": "False",
            "SECRET_KEY": secrets.token_urlsafe(40),
            "HERMIT_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
            "ALLOWED_HOSTS": "127.0.0.1",
            "SITE_URL": f"http://127.0.0.1:{daphne_port}",
            "SECURE_SSL_REDIRECT": "False",
            "HERMIT_AUTO_PROVISION": "False",
        }
    )
    if redis_url:
        os.environ["REDIS_URL"] = redis_url
    if "HERMIT_RUNTIME_DIR" not in os.environ:  # the settings' choice, before the data dir moves
        defaults = runpy.run_path(str(ROOT / "portal" / "settings.py"))
        os.environ["HERMIT_RUNTIME_DIR"] = str(defaults["HERMIT_RUNTIME_DIR"])
    os.environ["HERMIT_DATA_DIR"] = str(tmp)
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)


def make_chat_user(email: str, gateway_port: int, token: str) -> str:
    """Create a user whose running sandbox is the gateway on ``gateway_port``; return a cookie."""
    from django.conf import settings
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.sessions.backends.db import SessionStore

    from sandboxes.models import Sandbox
    from tests.factories import make_user

    user = make_user(email, password=None)  # type: ignore[arg-type]  # no hashing: 1,000 users
    sandbox, _ = Sandbox.objects.get_or_create(owner=user, name="default")
    sandbox.state = Sandbox.State.RUNNING
    sandbox.backend = "local"
    sandbox.backend_state = {"host_port": gateway_port}  # the local backend's endpoint record
    sandbox.gateway_token = token
    sandbox.save()
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.create()
    return f"{settings.SESSION_COOKIE_NAME}={session.session_key}"


async def open_portal_chat(daphne_port: int, cookie: str) -> Any:
    import websockets

    ws = await websockets.connect(
        f"ws://127.0.0.1:{daphne_port}/ws/chat/",
        additional_headers={"Cookie": cookie},
        origin=f"http://127.0.0.1:{daphne_port}",  # type: ignore[arg-type]
        max_size=None,
        compression=None,
        open_timeout=30,
    )
    while json.loads(await ws.recv()).get("type") != "history":
        pass
    return ws


# --- part 1: real OpenClaw, per frame ---------------------------------------------------------


async def per_frame(daphne_port: int, gateway: Any, cookie: str, messages: int) -> dict[str, str]:
    from sandboxes.openclaw.protocol import DeviceIdentity, GatewayClient

    direct = GatewayClient(gateway.url, token=gateway.token, identity=DeviceIdentity.generate())
    await direct.start()
    seen_direct: dict[str, list[tuple[float, float]]] = {}

    async def watch() -> None:
        async for event in direct.events():
            p = event.payload
            if event.event == "chat" and p.get("state") == "delta":
                stamp = (p.get("message") or {}).get("timestamp")
                seen_direct.setdefault(p["runId"], []).append((time.time(), stamp / 1000))

    watcher = asyncio.ensure_future(watch())
    ws = await open_portal_chat(daphne_port, cookie)
    seen_relay: dict[str, list[float]] = {}
    for i in range(messages):
        msg = uuid.uuid4().hex
        await ws.send(json.dumps({"type": "send", "id": msg, "text": f"message {i}"}))
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == "delta":
                seen_relay.setdefault(frame["runId"], []).append(time.time())
            if frame["type"] in ("final", "run_error", "aborted"):
                break
        await asyncio.sleep(0.3)
    await asyncio.sleep(0.5)
    watcher.cancel()
    await ws.close()
    await direct.close()

    direct_ms, relay_ms, added_ms = [], [], []
    for run, relayed in seen_relay.items():
        for (t_direct, stamped), t_relay in zip(seen_direct.get(run, []), relayed, strict=False):
            direct_ms.append((t_direct - stamped) * 1000)
            relay_ms.append((t_relay - stamped) * 1000)
            added_ms.append((t_relay - t_direct) * 1000)
    if not added_ms:
        print("part 1: no frames matched (did the direct client see the portal's runs?)")
        return {"relay_added_p50_ms": "nan"}
    print(f"\nPart 1: real OpenClaw gateway, {messages} replies, {len(added_ms)} delta frames")
    print("  latency from the gateway's stamp on a delta to the client (ms; 1 ms clock grain)")
    print(f"  {'':8}{'p50':>8}{'p99':>8}")
    print(f"  {'direct':8}{pct(direct_ms, 50):8.1f}{pct(direct_ms, 99):8.1f}")
    print(f"  {'relay':8}{pct(relay_ms, 50):8.1f}{pct(relay_ms, 99):8.1f}")
    print(
        f"  {'ratio':8}{pct(relay_ms, 50) / max(pct(direct_ms, 50), 0.5):8.2f}"
        f"{pct(relay_ms, 99) / max(pct(direct_ms, 99), 0.5):8.2f}"
    )
    print(
        f"  added by the portal per frame: p50 {pct(added_ms, 50):.2f} ms, "
        f"p99 {pct(added_ms, 99):.2f} ms, mean {statistics.fmean(added_ms):.2f} ms"
    )
    return {
        "relay_added_p50_ms": f"{pct(added_ms, 50):.2f}",
        "relay_added_p99_ms": f"{pct(added_ms, 99):.2f}",
        "direct_p50_ms": f"{pct(direct_ms, 50):.1f}",
        "relay_p50_ms": f"{pct(relay_ms, 50):.1f}",
    }


# --- part 2: capacity, with a paired direct watcher per frame -----------------------------------
#
# Each level runs in load-worker subprocesses (so the load generator is not one Python loop
# that lags behind 10,000 frames a second). Every session has a relay client (browser-like,
# through daphne); up to WATCHED of them also have a direct watcher on the fake gateway,
# subscribed to the same gateway token, which receives each delta at the same moment the
# gateway sends it to the portal (as an OpenClaw gateway broadcasts chat events to every
# operator connection). The relay's added latency of a frame is when the relay client got it
# minus when the watcher got it: the load generator's and fake gateway's own lag cancel out.

WATCHED = 100  # sessions per level with a direct watcher (all of them up to 100)
CONNECTS_IN_FLIGHT = 20  # WebSocket opens per worker at once (a browser fleet reconnecting)


async def load_worker(cfg: dict[str, Any]) -> None:
    """Open the sessions in ``cfg``, say READY, wait for GO on stdin, run the load for
    ``cfg["seconds"]`` and print one JSON line of what was measured."""
    import websockets

    gate = asyncio.Semaphore(CONNECTS_IN_FLIGHT)
    opts: dict[str, Any] = {"max_size": None, "compression": None, "ping_interval": None}

    async def open_relay(cookie: str) -> Any:
        async with gate:
            ws = await websockets.connect(
                f"ws://127.0.0.1:{cfg['daphne_port']}/ws/chat/",
                additional_headers={"Cookie": cookie},
                origin=f"http://127.0.0.1:{cfg['daphne_port']}",
                open_timeout=180,
                **opts,
            )
            while json.loads(await ws.recv()).get("type") != "history":
                pass
            return ws

    async def open_watcher(token: str) -> Any:
        async with gate:
            ws = await websockets.connect(f"ws://127.0.0.1:{cfg['fake_port']}", **opts)
            await ws.recv()  # connect.challenge
            hello = {"type": "req", "id": "c", "method": "connect"}
            await ws.send(json.dumps({**hello, "params": {"auth": {"token": token}}}))
            while json.loads(await ws.recv()).get("type") != "res":
                pass
            return ws

    async def opened(coro: Any) -> Any:
        """The open socket, or None if it could not be opened (daphne drops a handshake its
        application has not accepted within 5 s, as in production)."""
        try:
            return await coro
        except (OSError, websockets.WebSocketException):  # TimeoutError is an OSError
            return None

    began = time.monotonic()
    wanted = cfg["sessions"]
    opens = await asyncio.gather(*(opened(open_relay(s["cookie"])) for s in wanted))
    sessions = [s for s, ws in zip(wanted, opens, strict=True) if ws is not None]
    relays = [ws for ws in opens if ws is not None]
    watches = await asyncio.gather(
        *(opened(open_watcher(s["token"])) for s in sessions if s["watched"])
    )
    watchers = [ws for ws in watches if ws is not None]
    connect_s = time.monotonic() - began
    refused = len(wanted) - len(relays)
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    relay_ms: list[float] = []
    relay_seen: dict[str, float] = {}  # stamp of a watched session's frame -> when relayed
    direct_seen: dict[str, float] = {}
    counts = {"sent": 0, "frames": 0, "words": 0, "errors": 0}
    seconds = float(cfg["seconds"])
    go = time.monotonic()

    async def read_relay(ws: Any, watched: bool) -> None:
        async for raw in ws:
            now = time.time()
            frame = json.loads(raw)
            kind = frame.get("type")
            if kind == "delta":
                counts["frames"] += 1
                for tok in frame["delta"].split():
                    counts["words"] += tok.startswith("w")
                    if tok.startswith("@"):
                        relay_ms.append((now - float(tok[1:])) * 1000)
                        if watched:
                            relay_seen[tok] = now
            elif kind == "error":
                counts["errors"] += 1

    async def read_direct(ws: Any) -> None:
        async for raw in ws:
            now = time.time()
            frame = json.loads(raw)
            payload = frame.get("payload") or {}
            if frame.get("event") == "chat" and payload.get("state") == "delta":
                direct_seen[payload["deltaText"].split()[0]] = now

    async def send(ws: Any) -> None:
        await asyncio.sleep(secrets.randbelow(1000) / 1000)  # spread the senders over a second
        first = time.monotonic()
        tick = 0
        while time.monotonic() - go < seconds:
            await ws.send(json.dumps({"type": "send", "id": uuid.uuid4().hex, "text": "hi"}))
            counts["sent"] += 1
            tick += 1
            await asyncio.sleep(max(0.0, first + tick - time.monotonic()))

    readers = [
        asyncio.ensure_future(read_relay(ws, s["watched"]))
        for ws, s in zip(relays, sessions, strict=True)
    ]
    readers += [asyncio.ensure_future(read_direct(ws)) for ws in watchers]
    await asyncio.gather(*(send(ws) for ws in relays))
    await asyncio.sleep(1.0)  # the last replies stream for 0.2 s
    for task in readers:
        task.cancel()
    await asyncio.gather(*(ws.close() for ws in [*relays, *watchers]), return_exceptions=True)
    added = [(t - direct_seen[k]) * 1000 for k, t in relay_seen.items() if k in direct_seen]
    print(
        json.dumps(
            {
                "connect_s": connect_s,
                "relay_ms": relay_ms,
                "added_ms": added,
                "watched_frames": len(direct_seen),
                "refused": refused,
                **counts,
            }
        ),
        flush=True,
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_level(
    daphne: int,
    daphne_port: int,
    fake_port: int,
    users: list[tuple[str, str]],
    n: int,
    seconds: float,
) -> dict[str, Any]:
    """Run one level of ``n`` sessions in load-worker subprocesses; return the merged figures."""
    watched = set(range(0, n, max(1, n // WATCHED))[:WATCHED])
    workers = 1 if n <= 100 else 2 if n <= 500 else 3
    procs: list[subprocess.Popen[str]] = []
    try:
        return _drive(procs, workers, daphne, daphne_port, fake_port, users, n, seconds, watched)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _drive(
    procs: list[subprocess.Popen[str]],
    workers: int,
    daphne: int,
    daphne_port: int,
    fake_port: int,
    users: list[tuple[str, str]],
    n: int,
    seconds: float,
    watched: set[int],
) -> dict[str, Any]:
    for w in range(workers):
        sessions = [
            {"cookie": users[i][0], "token": users[i][1], "watched": i in watched}
            for i in range(w, n, workers)
        ]
        cfg = {
            "daphne_port": daphne_port,
            "fake_port": fake_port,
            "seconds": seconds,
            "sessions": sessions,
        }
        proc = subprocess.Popen(
            [PYTHON, str(Path(__file__).resolve()), "--load-worker"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(cfg) + "\n")
        proc.stdin.flush()
        procs.append(proc)
    for proc in procs:  # every session open before any sends: the level starts at once
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "READY":
            raise RuntimeError(f"a load worker failed while connecting (exit {proc.wait()})")
    cpu_before = cpu_seconds(daphne)
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("GO\n")
        proc.stdin.flush()
    merged: dict[str, Any] = {"relay_ms": [], "added_ms": [], "connect_s": 0.0}
    outs = [proc.communicate(timeout=seconds + 120)[0] for proc in procs]
    merged["daphne_cpu_s"] = cpu_seconds(daphne) - cpu_before
    for proc, out in zip(procs, outs, strict=True):
        if not out.strip():
            raise RuntimeError(f"a load worker failed mid-level (exit {proc.returncode})")
        got = json.loads(out.strip().splitlines()[-1])
        merged["relay_ms"] += got["relay_ms"]
        merged["added_ms"] += got["added_ms"]
        merged["connect_s"] = max(merged["connect_s"], got["connect_s"])
        for key in ("sent", "frames", "words", "errors", "watched_frames", "refused"):
            merged[key] = merged.get(key, 0) + got[key]
    return merged


def capacity(
    daphne: int,
    daphne_port: int,
    fake_port: int,
    users: list[tuple[str, str]],
    levels: list[int],
    seconds: float,
    all_levels: bool = False,
) -> dict[str, str]:
    print(
        f"\nPart 2: sessions at 1 message/s through ONE daphne process, each reply "
        f"{REPLY_WORDS} words {WORD_SPACING * 1000:g} ms apart from the model, sent by the fake "
        f"gateway as OpenClaw paces its deltas (at most one per {PACING * 1000:g} ms), "
        f"{seconds:g} s per level; delivered = the share of the words that reached the browsers; "
        f"added = relay client's receipt minus a direct watcher's receipt of the same frame "
        f"({WATCHED} sessions watched)"
    )
    print(
        f"  {'sessions':>8} {'load1':>6} {'connect':>8} {'frames/s':>9} {'delivered':>9}"
        f" {'relay p50':>10} {'relay p99':>10} {'added p50':>10} {'added p99':>10}"
        f" {'daphne CPU':>11}"
    )
    best, result = 0, {}
    failed_below = False
    cpu_per_frame: list[tuple[int, float]] = []  # (frames relayed, daphne CPU-ms per frame)
    saturated_at = 0
    for n in levels:
        load1 = os.getloadavg()[0]
        if saturated_at and not all_levels:
            print(f"  {n:>8} {load1:>6.2f}  not run: the relay fell behind at {saturated_at}")
            continue
        try:
            got = run_level(daphne, daphne_port, fake_port, users, n, seconds)
        except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
            print(f"  {n:>8} {load1:>6.2f}  the level did not complete: {exc}")
            failed_below = True
            continue
        relay, added = got["relay_ms"], got["added_ms"]
        expected = got["sent"] * REPLY_WORDS
        delivered = got["words"] / expected if expected else 0.0
        if not added:
            print(f"  {n:>8} {load1:>6.2f}  no frame was relayed ({got['errors']} errors)")
            failed_below = True
            continue
        a50, a99 = pct(added, 50), pct(added, 99)
        cpu_ms = 1000 * got["daphne_cpu_s"] / max(1, got["frames"])
        cpu_per_frame.append((got["frames"], cpu_ms))
        print(
            f"  {n:>8} {load1:>6.2f} {got['connect_s']:>7.1f}s {got['frames'] / seconds:>9.0f}"
            f" {delivered:>9.1%} {pct(relay, 50):>10.1f} {pct(relay, 99):>10.1f}"
            f" {a50:>10.2f} {a99:>10.2f} {cpu_ms:>6.2f} ms/f"
            + (f"  ({got['errors']} error frames)" if got["errors"] else "")
            + (f"  ({got['refused']} sessions could not connect)" if got["refused"] else "")
        )
        if n == 100:
            result["added_p50_ms_at_100"] = f"{a50:.2f}"
            result["added_p99_ms_at_100"] = f"{a99:.2f}"
        ok = a99 < 50 and delivered >= 0.99 and not got["errors"] and not got["refused"]
        if ok and not failed_below:
            best = n
            result["added_p50_ms_at_max"] = f"{a50:.2f}"
            result["added_p99_ms_at_max"] = f"{a99:.2f}"
        failed_below = failed_below or not ok
        if a50 > 1000:  # a backlog of seconds: larger levels only take longer to say the same
            saturated_at = n
    print(
        f"  largest level where the relay adds under 50 ms p99 (and every level below it "
        f"does, delivering every frame): {best} sessions (target 1000)"
    )
    if cpu_per_frame:
        # Everything daphne did in the level's window (relaying, reading the browsers' sends,
        # forwarding them, the per-frame activity check), per frame it relayed, at the level
        # that relayed the most frames (where its fixed costs weigh least).
        per_frame = max(cpu_per_frame)[1]
        result["daphne_cpu_ms_per_frame"] = f"{per_frame:.2f}"
        print(
            f"  daphne spent {per_frame:.2f} CPU-ms per relayed frame (at the busiest level): one "
            f"uncontended core would relay about {1000 / per_frame:.0f} frames/s (the cost "
            f"of each session's own frames, its message, ack and final, is counted in)"
        )
    if "added_p99_ms_at_100" in result:
        print(
            f"  per frame at 100 sessions the relay adds p50 {result['added_p50_ms_at_100']} ms,"
            f" p99 {result['added_p99_ms_at_100']} ms (target: p99 under 2 ms)"
        )
    return {"max_sessions": str(best), **result}


# --- main --------------------------------------------------------------------------------------


def redis_for_bench(url: str) -> str:
    """Return ``url`` if a Redis answers there (the portal's cache in production), else ""."""
    if not url:
        return ""
    import redis

    try:
        redis.Redis.from_url(url, socket_timeout=2).ping()
    except (redis.RedisError, OSError):
        return ""
    return url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--levels", default="1,10,100,250,500,750,1000")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--skip-openclaw", action="store_true")
    parser.add_argument(
        "--all-levels",
        action="store_true",
        help="run every level even after the relay fell behind (added p50 over 1 s)",
    )
    parser.add_argument(
        "--redis",
        default="redis://127.0.0.1:6379/14",
        help="the portal's cache and channel layer, as in production ('' for none: a file cache)",
    )
    parser.add_argument(
        "--profile-daphne", metavar="PATH", help="write daphne's cProfile stats (main thread) here"
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the temporary folder with the servers' logs"
    )
    parser.add_argument("--fake-gateway", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--load-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fake_gateway:
        asyncio.run(fake_gateway(args.fake_gateway, deltas=REPLY_WORDS, spacing=WORD_SPACING))
        return
    if args.load_worker:
        asyncio.run(load_worker(json.loads(sys.stdin.readline())))
        return

    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # a level a line
    levels = [int(x) for x in args.levels.split(",")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # daphne holds 2 sockets a session
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    redis_url = redis_for_bench(args.redis)
    load = os.getloadavg()
    print(
        f"chat relay bench: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} "
        f"{load[2]:.2f} at start; cache and channel layer: "
        f"{'Redis ' + redis_url if redis_url else 'file cache, in-memory layer (no Redis)'}",
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix="hermit-chat-bench-"))
    daphne_port, fake_port = free_port(), free_port()
    began = time.monotonic()
    try:
        configure_django(tmp, daphne_port, redis_url)
        users = [
            (
                make_chat_user(f"load{i}@bench.test", fake_port, f"bench-token-{i}"),
                f"bench-token-{i}",
            )
            for i in range(max(levels))
        ]
        profile = ["-m", "cProfile", "-o", args.profile_daphne] if args.profile_daphne else []
        daphne = [
            PYTHON,
            *profile,
            "-m",
            "portal.daphne_uvloop",  # as bin/run starts it
            "-b",
            "127.0.0.1",
            "-p",
            str(daphne_port),
            "portal.asgi:application",
        ]
        fake = [PYTHON, str(Path(__file__).resolve()), "--fake-gateway", str(fake_port)]
        with (
            process(daphne, daphne_port, tmp / "daphne.log") as portal,
            process(fake, fake_port, tmp / "fake-gateway.log"),
        ):
            result: dict[str, str] = {}
            if not args.skip_openclaw:
                result.update(run_part_one(tmp, daphne_port, args.messages))
            result.update(
                capacity(
                    portal.pid, daphne_port, fake_port, users, levels, args.seconds, args.all_levels
                )
            )
    finally:
        if args.keep_logs:
            print(f"\nlogs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    end = os.getloadavg()
    result["load1_start"] = f"{load[0]:.2f}"
    result["load1_end"] = f"{end[0]:.2f}"
    result["cpus"] = str(os.cpu_count())
    result["wall_s"] = f"{time.monotonic() - began:.0f}"
    print(f"\nload average at the end: {end[0]:.2f} {end[1]:.2f} {end[2]:.2f}")
    print("\nRESULT " + " ".join(f"{k}={v}" for k, v in result.items()), flush=True)


def run_part_one(tmp: Path, daphne_port: int, messages: int) -> dict[str, str]:
    from django.conf import settings

    from sandboxes.openclaw.runtime import build_runtime
    from tests.fakes.model_server import FakeModelServer
    from tests.fixtures.chat import BareGateway
    from tests.fixtures.runtime import NODE_VERSION, OPENCLAW_VERSION

    with FakeModelServer() as model:
        model.script(reply=" ".join(f"word{i}" for i in range(16)), chunks=16, delay=0.03)
        runtime = build_runtime(settings.HERMIT_RUNTIME_DIR, OPENCLAW_VERSION, NODE_VERSION)
        gateway = BareGateway(tmp / "gateway", model.openai_base_url, runtime)
        gateway.start()
        try:
            cookie = make_chat_user("relay@bench.test", gateway.port, gateway.token)
            return asyncio.run(per_frame(daphne_port, gateway, cookie, messages))
        finally:
            gateway.stop()


if __name__ == "__main__":
    main()
