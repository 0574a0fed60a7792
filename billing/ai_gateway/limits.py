"""Plan limits on model calls: the monthly token quota and requests a minute.

Requests a minute is a sliding 60-second window per user, kept in Redis when settings.REDIS_URL
is set (shared by every portal process) and in this process's memory otherwise. Refused calls
do not count towards the window.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
import weakref
from collections import deque
from datetime import UTC, datetime

from django.conf import settings
from django.db.models import Sum
from django.utils import timezone

from billing.ai_gateway.models import UsageRecord

WINDOW_SECONDS = 60.0


def month_start(now: datetime | None = None) -> datetime:
    """Return the start (UTC) of the calendar month containing ``now``."""
    now = now or timezone.now()
    return now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_month_start(now: datetime | None = None) -> datetime:
    start = month_start(now)
    if start.month == 12:
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)


def tokens_this_month(user_id: int, now: datetime | None = None) -> int:
    """Return the user's metered tokens (input + output) this month, not counting BYOK calls."""
    totals = UsageRecord.objects.filter(
        user_id=user_id, created_at__gte=month_start(now), byok=False
    ).aggregate(i=Sum("input_tokens"), o=Sum("output_tokens"))
    return (totals["i"] or 0) + (totals["o"] or 0)


class LocalWindow:
    """An in-process sliding window counter (used when Redis is not configured)."""

    def __init__(self) -> None:
        self._hits: dict[int, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, user_id: int, limit: int, now: float) -> tuple[bool, float]:
        with self._lock:
            hits = self._hits.setdefault(user_id, deque())
            while hits and hits[0] <= now - WINDOW_SECONDS:
                hits.popleft()
            if len(hits) >= limit:
                return False, hits[0] + WINDOW_SECONDS - now
            hits.append(now)
            return True, 0.0

    def reset(self, user_id: int) -> None:
        with self._lock:
            self._hits.pop(user_id, None)


def _key(user_id: int) -> str:
    # User ids are per database, so the database name is part of the key (shared Redis).
    return f"hermit:ai:rpm:{settings.DATABASES['default']['NAME']}:{user_id}"


_local = LocalWindow()
_redis_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, object] = (
    weakref.WeakKeyDictionary()
)


def _redis():  # type: ignore[no-untyped-def]
    """Return a redis.asyncio client for the running loop, or None without REDIS_URL."""
    url = getattr(settings, "REDIS_URL", "")
    if not url:
        return None
    import redis.asyncio as aioredis

    loop = asyncio.get_running_loop()
    client = _redis_clients.get(loop)
    if client is None:
        client = aioredis.from_url(url)
        _redis_clients[loop] = client
    return client


async def check_rate(user_id: int, limit: int) -> tuple[bool, float]:
    """Count one request for ``user_id``; return (allowed, seconds until a slot frees up).

    ``limit`` 0 means unlimited.
    """
    if limit <= 0:
        return True, 0.0
    now = time.time()
    client = _redis()
    if client is None:
        return _local.hit(user_id, limit, now)
    key = _key(user_id)
    member = f"{now:.6f}:{secrets.token_hex(4)}"
    async with client.pipeline(transaction=True) as pipe:
        pipe.zremrangebyscore(key, 0, now - WINDOW_SECONDS)
        pipe.zadd(key, {member: now})
        pipe.zcard(key)
        pipe.zrange(key, 0, 0, withscores=True)
        pipe.expire(key, int(WINDOW_SECONDS) + 1)
        _, _, count, oldest, _ = await pipe.execute()
    if count <= limit:
        return True, 0.0
    await client.zrem(key, member)
    retry = (oldest[0][1] + WINDOW_SECONDS - now) if oldest else WINDOW_SECONDS
    return False, max(0.0, retry)


async def reset_rate(user_id: int) -> None:
    """Forget the user's recent requests (staff action, tests)."""
    _local.reset(user_id)
    client = _redis()
    if client is not None:
        await client.delete(_key(user_id))
