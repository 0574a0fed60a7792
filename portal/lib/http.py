"""The one shared outbound HTTP client for streamed calls (aiohttp), and the test seam for it.

aiohttp rather than httpx here because this client carries every model call's stream: measured
with 50 concurrent 20-chunk streams, httpx (0.28, httpcore 1.0) spent ~10x the CPU of aiohttp,
most of it rescanning its whole connection pool (a readability poll per idle connection) each
time a request starts or ends. Plain requests elsewhere keep using httpx.

A server process runs one event loop, so in practice there is one session with one connection
pool. A session must not be used from a loop other than the one that created it, so
``client()`` keeps one per running loop (tests and benchmarks run several loops).
"""

from __future__ import annotations

import asyncio
import weakref

import aiohttp

MAX_CONNECTIONS = 500
KEEPALIVE_SECONDS = 30.0

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = (
    weakref.WeakKeyDictionary()
)


def client() -> aiohttp.ClientSession:
    """Return the shared session for the running event loop, creating it on first use.

    It reads no proxy settings from the environment, keeps no cookies and does not decompress:
    callers pass bodies through as they come. Callers give each request its timeout and
    ``allow_redirects=False``.
    """
    loop = asyncio.get_running_loop()
    existing = _clients.get(loop)
    if existing is None or existing.closed:
        connector = aiohttp.TCPConnector(
            limit=MAX_CONNECTIONS, limit_per_host=0, keepalive_timeout=KEEPALIVE_SECONDS
        )
        existing = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        _clients[loop] = existing
    return existing


async def aclose() -> None:
    """Close the running loop's session (at shutdown, or between tests)."""
    loop = asyncio.get_running_loop()
    existing = _clients.pop(loop, None)
    if existing is not None:
        await existing.close()
