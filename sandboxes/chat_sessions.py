"""How many chat sessions are open, across every web process, counted through the cache.

Contract: ``hold()`` is a coroutine a chat consumer runs as one of its tasks; it counts one
session open in this process until it is cancelled (the consumer's disconnect cancels its
tasks). ``open_sessions()`` returns the sum over every live process.

Each process publishes its own count under a key of its own that expires after ``TTL``
seconds, re-published at least every ``REFRESH`` seconds while it holds a session, and lists
that key in a registry (one cache key). A process that dies stops publishing, so its sessions
drop out of the sum within ``TTL`` seconds: a crash never leaks a count. Limit: two processes
registering at the same instant can lose one registration (the registry is read, changed and
written); that process puts itself back at its next refresh, so it is missing from the sum for
at most ``REFRESH`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time

from asgiref.sync import sync_to_async
from django.core.cache import cache

TTL = 90  # seconds a process's count lives without a refresh
REFRESH = 30
REGISTRY = "hermit:chat:processes"
PROCESS_KEY = f"hermit:chat:open:{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"

log = logging.getLogger(__name__)
_open = 0  # this process's open sessions
_published_at = 0.0  # time.monotonic() of this process's last publish


def _publish() -> None:
    """Write this process's count and make sure the registry lists it. A cache outage is
    logged, never raised: counting must not break a chat."""
    global _published_at
    try:
        _write()
    except Exception as exc:  # the cache backend's own errors (Redis down)
        log.warning("chat sessions: cannot publish this process's count: %s", exc)
    _published_at = time.monotonic()


def _write() -> None:
    cache.set(PROCESS_KEY, _open, TTL)
    now = time.time()
    registry: dict[str, float] = cache.get(REGISTRY) or {}
    if now - registry.get(PROCESS_KEY, 0) >= REFRESH:
        registry = {key: seen for key, seen in registry.items() if now - seen < TTL}
        registry[PROCESS_KEY] = now
        cache.set(REGISTRY, registry, None)


_apublish = sync_to_async(_publish, thread_sensitive=False)


async def hold() -> None:
    """Count one open session in this process until cancelled."""
    global _open
    _open += 1
    try:
        await _apublish()
        while True:
            await asyncio.sleep(REFRESH)
            if time.monotonic() - _published_at >= REFRESH * 0.9:  # one session of many does it
                await _apublish()
    finally:
        _open -= 1
        await _apublish()


def open_sessions() -> int:
    """Return the number of chat sessions open in every live process."""
    registry: dict[str, float] = cache.get(REGISTRY) or {}
    return sum(int(count) for count in cache.get_many(list(registry)).values())
