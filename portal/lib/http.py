"""The one shared outbound HTTP client (httpx.AsyncClient), and the test seam for it.

A server process runs one event loop, so in practice there is one client with one connection
pool. An AsyncClient must not be used from a loop other than the one that created it, so
``client()`` keeps one per running loop (tests and benchmarks run several loops).
"""

from __future__ import annotations

import asyncio
import weakref

import httpx

LIMITS = httpx.Limits(max_connections=500, max_keepalive_connections=100, keepalive_expiry=30)
DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=10.0)

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
    weakref.WeakKeyDictionary()
)


def client() -> httpx.AsyncClient:
    """Return the shared AsyncClient for the running event loop, creating it on first use.

    It follows no redirects, does not read proxy settings from the environment and does not
    decompress on its own terms: callers that stream bytes through use ``aiter_raw``.
    """
    loop = asyncio.get_running_loop()
    existing = _clients.get(loop)
    if existing is None or existing.is_closed:
        existing = httpx.AsyncClient(
            limits=LIMITS, timeout=DEFAULT_TIMEOUT, follow_redirects=False, trust_env=False
        )
        _clients[loop] = existing
    return existing


async def aclose() -> None:
    """Close the running loop's client (at shutdown, or between tests)."""
    loop = asyncio.get_running_loop()
    existing = _clients.pop(loop, None)
    if existing is not None:
        await existing.aclose()
