"""What bench/wake.py reads off a sandbox: readiness, a chat turn's first token, memory, CPU.

A chat turn is what the portal's chat does (sandboxes.consumers.chat): connect to the gateway
with the sandbox's token and its portal device key (GatewayClient, protocol v4), ``chat.send``
on the main session, then wait for the reply's first ``delta`` event and its ``final``. The
reply comes from the fake model through the AI gateway, streamed in OpenAI's format.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MB = 1024 * 1024
SESSION_KEYS = {"main", "agent:main:main"}


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile, interpolated between the nearest ranks (nan if no values)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = p / 100 * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def endpoint_url(sandbox: Any) -> tuple[str, int]:
    from sandboxes import actions

    return actions.gateway_endpoint(sandbox)


def wait_ready(sandbox: Any, timeout: float = 120.0) -> float:
    """Poll the sandbox's gateway ``/readyz`` every 5 ms until it answers 200; return when
    (monotonic). Raises TimeoutError."""
    host, port = endpoint_url(sandbox)
    url = f"http://{host}:{port}/readyz"
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return time.monotonic()
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.005)
    raise TimeoutError(f"{url} did not answer 200 within {timeout:.0f} s ({last})")


@dataclass
class Turn:
    connected: float  # monotonic times
    acked: float
    first_token: float
    final: float
    text: str


async def _turn(url: str, token: str, identity: Any, message: str, timeout: float) -> Turn:
    from sandboxes.openclaw.protocol import GatewayClient

    client = GatewayClient(url, token=token, identity=identity, connect_timeout=timeout)
    await client.start()
    connected = time.monotonic()
    first: list[float] = []
    done = asyncio.get_running_loop().create_future()

    async def watch() -> None:
        async for event in client.events():
            p = event.payload
            if event.event != "chat" or p.get("sessionKey") not in SESSION_KEYS:
                continue
            state = p.get("state")
            if state == "delta" and not first:
                first.append(time.monotonic())
            elif state == "final" and not done.done():
                content = (p.get("message") or {}).get("content") or []
                text = "".join(c.get("text", "") for c in content if isinstance(c, dict))
                done.set_result((time.monotonic(), text))
            elif state in ("error", "aborted") and not done.done():
                done.set_exception(RuntimeError(f"the reply ended {state}: {p}"))

    watcher = asyncio.ensure_future(watch())
    try:
        await client.chat_send(
            message, session_key="main", idempotency_key=uuid.uuid4().hex, timeout=timeout
        )
        acked = time.monotonic()
        final, text = await asyncio.wait_for(done, timeout)
    finally:
        watcher.cancel()
        with contextlib.suppress(BaseException):
            await watcher
        await client.close()
    if not first:
        raise RuntimeError("the reply had no delta before its final")
    return Turn(connected, acked, first[0], final, text)


def chat_turn(sandbox: Any, message: str = "Say hello.", timeout: float = 90.0) -> Turn:
    """One chat turn on a new connection, as a newly opened chat does."""
    from sandboxes.consumers.chat import device_identity_for

    identity = device_identity_for(sandbox)
    host, port = endpoint_url(sandbox)
    return asyncio.run(
        _turn(f"ws://{host}:{port}", sandbox.gateway_token, identity, message, timeout)
    )


def cgroup_exists(paths: dict[str, str] | None) -> bool:
    return bool(paths) and any(Path(p).is_dir() for p in (paths or {}).values())


def memory(paths: dict[str, str] | None) -> tuple[float, float, int]:
    """(working set MB, anon+shmem MB, process count) of a sandbox's cgroup; zeros if it is
    gone."""
    from sandboxes.backends import cgroups

    if not cgroup_exists(paths):
        return 0.0, 0.0, 0
    assert paths is not None
    used, _ = cgroups.memory_usage(paths)
    return used / MB, cgroups.rss_bytes(paths) / MB, len(cgroups.pids(paths))


def cpu_seconds(paths: dict[str, str] | None) -> float:
    from sandboxes.backends import cgroups

    if not cgroup_exists(paths):
        return 0.0
    assert paths is not None
    return cgroups.cpu_seconds(paths)


def tree_size_mb(location: str) -> float:
    """Disk use of a checkpoint image (root's own files), in MB."""
    path = Path(location)
    if path.is_file():
        return path.stat().st_blocks * 512 / MB
    total = 0
    for item in path.rglob("*"):
        with contextlib.suppress(OSError):
            if item.is_file() and not item.is_symlink():
                total += item.stat().st_blocks * 512
    return total / MB


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "? ? ?"
