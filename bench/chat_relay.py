"""Benchmark the webchat relay (ChatConsumer in daphne) against talking to the gateway directly.

Part 1, per streamed frame, with a real OpenClaw gateway (bare, no sandbox) and the fake model
streaming in the real OpenAI format: one browser-like client chats through the portal while a
direct protocol client watches the same gateway. For every ``chat`` delta frame it records when
the gateway stamped it (``message.timestamp``), when the direct client got it and when the
portal client got it. Prints latency p50/p99 direct vs relay, their ratio, and the added ms.

Part 2, capacity: N concurrent chat sessions through ONE daphne process, each sending one
message a second; every reply streams 10 deltas 20 ms apart from a fake protocol-v4 gateway (a
small subprocess, so OpenClaw's own CPU cost does not hide the portal's). Each delta carries its
emission time; the same load is also run straight against the fake gateway. Prints p50/p99 per
N and the largest N whose p99 stays within 50 ms of the direct p99.

Everything runs on this machine: daphne as in production (``portal.asgi``, DEBUG off, a
throwaway SQLite database, in-memory channel layer), the load generator in this process. The
throwaway data dir is a fresh temporary directory; the runtime image is the one the settings
name (so no build), wherever the checkout is. Ends with one ``RESULT key=value ...`` line:
``relay_added_p50_ms``, ``relay_added_p99_ms``, ``direct_p50_ms``, ``relay_p50_ms`` (part 1)
and ``max_sessions``, ``relay_p99_ms_at_max``, ``direct_p99_ms_at_max`` (part 2).

    .venv/bin/python bench/chat_relay.py [--messages 40] [--levels 1,10,25,50,100,150,200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
from contextlib import contextmanager
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


async def fake_gateway(port: int, deltas: int, spacing: float) -> None:
    """Serve the v4 subset the portal uses: challenge, connect, chat.send/history/abort."""
    import websockets

    boot = str(uuid.uuid4())

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
        async for raw in ws:
            req = json.loads(raw)
            method, rid, params = req.get("method"), req.get("id"), req.get("params") or {}
            if method == "connect":
                payload: dict[str, Any] = {
                    "type": "hello-ok",
                    "protocol": 4,
                    "server": {"version": "fake", "bootId": boot, "connId": str(uuid.uuid4())},
                    "snapshot": {"sessionDefaults": {"mainSessionKey": "agent:main:main"}},
                }
            elif method == "chat.send":
                run = params["idempotencyKey"]
                payload = {"runId": run, "status": "started"}
                task = asyncio.ensure_future(stream(ws, run))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif method == "chat.history":
                payload = {"messages": []}
            else:
                payload = {"ok": True}
            await ws.send(json.dumps({"type": "res", "id": rid, "ok": True, "payload": payload}))

    def chat_event(run: str, state: str, text: str, **extra: Any) -> str:
        message = {"role": "assistant", "content": [{"type": "text", "text": text}]}
        payload = {"runId": run, "sessionKey": "agent:main:main", "state": state, **extra}
        return json.dumps(
            {"type": "event", "event": "chat", "payload": {**payload, "message": message}}
        )

    async def stream(ws: Any, run: str) -> None:
        text = ""
        for seq in range(deltas):
            await asyncio.sleep(spacing)
            piece = f"@{time.time():.6f} "
            text += piece
            await ws.send(chat_event(run, "delta", text, seq=seq, deltaText=piece))
        await ws.send(chat_event(run, "final", "done"))

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


def configure_django(tmp: Path, daphne_port: int) -> None:
    """Point Django (this process and the servers it starts) at a throwaway data dir in ``tmp``,
    keeping the runtime image the settings would use without it."""
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

    user = make_user(email)
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


# --- part 2: capacity --------------------------------------------------------------------------


def latencies_from(text: str, now: float) -> list[float]:
    return [(now - float(tok[1:])) * 1000 for tok in text.split() if tok.startswith("@")]


async def load_portal(daphne_port: int, cookies: list[str], seconds: float) -> list[float]:
    socks = await asyncio.gather(*(open_portal_chat(daphne_port, c) for c in cookies))
    lat: list[float] = []

    async def session(ws: Any) -> None:
        async def reader() -> None:
            async for raw in ws:
                frame = json.loads(raw)
                if frame["type"] == "delta":
                    lat.extend(latencies_from(frame["delta"], time.time()))

        task = asyncio.ensure_future(reader())
        await asyncio.sleep(secrets.randbelow(1000) / 1000)  # spread the senders over a second
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await ws.send(json.dumps({"type": "send", "id": uuid.uuid4().hex, "text": "hi"}))
            await asyncio.sleep(1.0)
        await asyncio.sleep(0.5)
        task.cancel()
        await ws.close()

    await asyncio.gather(*(session(ws) for ws in socks))
    return lat


async def load_direct(port: int, n: int, seconds: float) -> list[float]:
    from sandboxes.openclaw.protocol import DeviceIdentity, GatewayClient

    clients = [
        GatewayClient(
            f"ws://127.0.0.1:{port}", token=FAKE_TOKEN, identity=DeviceIdentity.generate()
        )
        for _ in range(n)
    ]
    await asyncio.gather(*(c.start() for c in clients))
    lat: list[float] = []

    async def session(c: GatewayClient) -> None:
        async def reader() -> None:
            async for event in c.events():
                if event.event == "chat" and event.payload.get("state") == "delta":
                    lat.extend(latencies_from(event.payload["deltaText"], time.time()))

        task = asyncio.ensure_future(reader())
        await asyncio.sleep(secrets.randbelow(1000) / 1000)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await c.request(
                "chat.send",
                {"sessionKey": "main", "message": "hi", "idempotencyKey": uuid.uuid4().hex},
            )
            await asyncio.sleep(1.0)
        await asyncio.sleep(0.5)
        task.cancel()
        await c.close()

    await asyncio.gather(*(session(c) for c in clients))
    return lat


async def capacity(
    daphne_port: int, fake_port: int, cookies: list[str], levels: list[int], seconds: float
) -> dict[str, str]:
    print(
        f"\nPart 2: sessions at 1 message/s, 10 deltas per reply, {seconds:g} s per level, "
        "one daphne process"
    )
    print(
        f"  {'sessions':>8} {'frames/s':>9} {'direct p50':>11} {'direct p99':>11}"
        f" {'relay p50':>10} {'relay p99':>10} {'extra p99':>10}"
    )
    best, at_best = 0, {"relay_p99_ms_at_max": "nan", "direct_p99_ms_at_max": "nan"}
    for n in levels:
        direct = await load_direct(fake_port, n, seconds)
        relay = await load_portal(daphne_port, cookies[:n], seconds)
        extra = pct(relay, 99) - pct(direct, 99)
        print(
            f"  {n:>8} {len(relay) / seconds:>9.0f} {pct(direct, 50):>11.1f}"
            f" {pct(direct, 99):>11.1f} {pct(relay, 50):>10.1f} {pct(relay, 99):>10.1f}"
            f" {extra:>10.1f}"
        )
        if extra > 50:
            break
        best = n
        at_best = {
            "relay_p99_ms_at_max": f"{pct(relay, 99):.1f}",
            "direct_p99_ms_at_max": f"{pct(direct, 99):.1f}",
        }
    print(f"  largest tested level within 50 ms extra p99: {best} sessions")
    return {"max_sessions": str(best), **at_best}


# --- main --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=40)
    parser.add_argument("--levels", default="1,10,25,50,100,150,200,300")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--skip-openclaw", action="store_true")
    parser.add_argument("--fake-gateway", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fake_gateway:
        asyncio.run(fake_gateway(args.fake_gateway, deltas=10, spacing=0.02))
        return

    levels = [int(x) for x in args.levels.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="hermit-chat-bench-"))
    daphne_port, fake_port = free_port(), free_port()
    try:
        configure_django(tmp, daphne_port)
        cookies = [
            make_chat_user(f"load{i}@bench.test", fake_port, FAKE_TOKEN) for i in range(max(levels))
        ]
        daphne = [
            PYTHON,
            "-m",
            "daphne",
            "-b",
            "127.0.0.1",
            "-p",
            str(daphne_port),
            "portal.asgi:application",
        ]
        fake = [PYTHON, str(Path(__file__).resolve()), "--fake-gateway", str(fake_port)]
        with (
            process(daphne, daphne_port, tmp / "daphne.log"),
            process(fake, fake_port, tmp / "fake-gateway.log"),
        ):
            result: dict[str, str] = {}
            if not args.skip_openclaw:
                result.update(run_part_one(tmp, daphne_port, args.messages))
            result.update(
                asyncio.run(capacity(daphne_port, fake_port, cookies, levels, args.seconds))
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
