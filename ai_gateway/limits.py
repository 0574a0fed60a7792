"""Plan limits on model calls: requests a minute, calls at once, and the monthly quota.

``admit_*`` is one atomic step that either refuses a call, counting it nowhere, or counts it in
all of these at once:
- requests a minute: a sliding 60-second window per user (Plan.requests_per_minute);
- calls at once: at most settings.HERMIT_AI_MAX_CONCURRENT_CALLS per user (0 = no cap);
- the monthly quota, in money (Plan.monthly_spend_limit, kept in micro-USD) and in tokens
  (Plan.monthly_token_quota): the call's worst case (``Reservation``: its estimated input plus
  its max output, priced) is reserved on top of what the month's finished calls used and what
  calls under way reserved; a call that would not fit is refused.
``settle_*`` ends an admitted call: it releases the reservation and adds what the call really
used. Only operator-paid calls reserve and use quota (BYOK calls reserve nothing).

Where: with settings.REDIS_URL, one Lua script round trip per admission and one per settlement,
shared by every portal process. Without Redis, the rate window is kept in this process and the
rest in one conditional UPDATE of the user's ``SpendCounter`` row for the month. Either way the
used amounts start from the month's UsageRecords when first needed (or when Redis lost them).
Reservations and in-flight counts are a lease: if a process dies mid-call they lapse once the
user has started no call for HERMIT_AI_LEASE_SECONDS; a settlement never takes them below 0.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from typing import Any

from django.conf import settings
from django.db import IntegrityError
from django.db.models import BigIntegerField, Case, F, IntegerField, Q, Sum, Value, When
from django.db.models.functions import Greatest
from django.utils import timezone

from ai_gateway.models import SpendCounter, UsageRecord
from portal.lib.cache import aredis

WINDOW_SECONDS = 60.0
USED_TTL_SECONDS = 40 * 24 * 3600  # a month's used amounts outlive the month in Redis
MICROS = Decimal(1_000_000)


def month_start(now: datetime | None = None) -> datetime:
    """Return the start (UTC) of the calendar month containing ``now``."""
    now = now or timezone.now()
    return now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_month_start(now: datetime | None = None) -> datetime:
    start = month_start(now)
    if start.month == 12:
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)


def to_micros(usd: Decimal) -> int:
    """Return ``usd`` in whole micro-USD, rounded up."""
    return int((usd * MICROS).to_integral_value(rounding=ROUND_CEILING))


@dataclass(frozen=True)
class Limits:
    """What one user may do; every 0 means no limit."""

    requests_per_minute: int
    max_concurrent: int
    cost: int  # micro-USD a month
    tokens: int  # tokens a month


@dataclass(frozen=True)
class Amount:
    """A cost (micro-USD) and a number of tokens: reserved, used or a limit."""

    cost: int = 0
    tokens: int = 0


@dataclass(frozen=True)
class Ticket:
    """An admitted call's hold on its user's limits, until ``settle_*``."""

    user_id: int
    month: date
    reserved: Amount
    store: str  # "redis" or "db"


@dataclass(frozen=True)
class Verdict:
    """The outcome of an admission: a ticket, or why not (``reason``) with the figures."""

    ticket: Ticket | None = None
    reason: str = ""  # "rate", "busy", "cost" or "tokens"
    retry_after: float = 0.0
    used: int = 0  # of the limit that refused: used + reserved by calls under way
    limit: int = 0


def month_used(user_id: int, now: datetime | None = None) -> Amount:
    """Return what the user's operator-paid calls cost and used this month, from UsageRecords."""
    totals = UsageRecord.objects.filter(
        user_id=user_id, created_at__gte=month_start(now), byok=False
    ).aggregate(c=Sum("cost"), i=Sum("input_tokens"), o=Sum("output_tokens"))
    return Amount(to_micros(totals["c"] or Decimal(0)), (totals["i"] or 0) + (totals["o"] or 0))


def uses_redis() -> bool:
    return bool(getattr(settings, "REDIS_URL", ""))


# --- without Redis: the window in this process, the rest in the database --------------------


class LocalWindow:
    """An in-process sliding window counter (used when Redis is not configured)."""

    def __init__(self) -> None:
        self._hits: dict[int, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, user_id: int, limit: int, now: float) -> tuple[bool, float]:
        """Count one request at ``now`` if fewer than ``limit`` are in the window."""
        with self._lock:
            hits = self._hits.setdefault(user_id, deque())
            while hits and hits[0] <= now - WINDOW_SECONDS:
                hits.popleft()
            if len(hits) >= limit:
                return False, hits[0] + WINDOW_SECONDS - now
            hits.append(now)
            return True, 0.0

    def forget(self, user_id: int, at: float) -> None:
        """Uncount the request counted at ``at`` (it was refused by a later check)."""
        with self._lock:
            hits = self._hits.get(user_id)
            if hits is not None and at in hits:
                hits.remove(at)

    def reset(self, user_id: int) -> None:
        with self._lock:
            self._hits.pop(user_id, None)


_local = LocalWindow()


def admit_db(user_id: int, limits: Limits, reserve: Amount, now: datetime | None = None) -> Verdict:
    """Admit one call without Redis (sync): the local window, then the SpendCounter row."""
    now = now or timezone.now()
    stamp = time.time()
    if limits.requests_per_minute > 0:
        allowed, retry = _local.hit(user_id, limits.requests_per_minute, stamp)
        if not allowed:
            return Verdict(reason="rate", retry_after=retry)
    month = month_start(now).date()
    if not (limits.max_concurrent or limits.cost or limits.tokens):
        return Verdict(Ticket(user_id, month, Amount(), "none"))
    verdict = _claim_row(user_id, month, limits, reserve, now)
    if verdict.ticket is None and limits.requests_per_minute > 0:
        _local.forget(user_id, stamp)
    return verdict


def _claim_row(user_id: int, month: date, limits: Limits, reserve: Amount,
               now: datetime) -> Verdict:  # fmt: skip
    """Reserve on the user's counter row with one conditional UPDATE (creating the row once)."""
    lapsed = Q(lease_until__lt=now)
    big = BigIntegerField()
    live_n = Case(When(lapsed, then=Value(0)), default=F("in_flight"), output_field=IntegerField())
    live_c = Case(When(lapsed, then=Value(0)), default=F("reserved_cost"), output_field=big)
    live_t = Case(When(lapsed, then=Value(0)), default=F("reserved_tokens"), output_field=big)
    fits = Q()
    if limits.max_concurrent:
        fits &= Q(live_n__lt=limits.max_concurrent)
    if limits.cost:
        fits &= Q(total_c__lte=limits.cost - reserve.cost)
    if limits.tokens:
        fits &= Q(total_t__lte=limits.tokens - reserve.tokens)
    rows = SpendCounter.objects.filter(user_id=user_id, month=month)
    for _ in range(3):
        updated = (
            rows.alias(
                live_n=live_n, total_c=F("used_cost") + live_c, total_t=F("used_tokens") + live_t
            )
            .filter(fits)
            .update(
                in_flight=live_n + 1,
                reserved_cost=live_c + reserve.cost,
                reserved_tokens=live_t + reserve.tokens,
                lease_until=now + timedelta(seconds=settings.HERMIT_AI_LEASE_SECONDS),
            )
        )
        if updated:
            return Verdict(Ticket(user_id, month, reserve, "db"))
        row = rows.first()
        if row is not None:
            verdict = _why_not(row, limits, reserve, now)
            if verdict is not None:
                return verdict
            continue  # the row was created between the UPDATE and the read: try again
        used = month_used(user_id, now)
        with contextlib.suppress(IntegrityError):  # created meanwhile by another call
            SpendCounter.objects.create(
                user_id=user_id, month=month, used_cost=used.cost, used_tokens=used.tokens
            )
    raise RuntimeError("the spend counter row kept changing under this admission")


def _why_not(row: SpendCounter, limits: Limits, reserve: Amount,
             now: datetime) -> Verdict | None:  # fmt: skip
    """Return the refusal the row explains, or None if the call fits it after all."""
    live = row.lease_until >= now
    n = row.in_flight if live else 0
    used = Amount(
        row.used_cost + (row.reserved_cost if live else 0),
        row.used_tokens + (row.reserved_tokens if live else 0),
    )
    return _verdict_for(limits, reserve, n, used)


def _verdict_for(limits: Limits, reserve: Amount, in_flight: int, used: Amount) -> Verdict | None:
    if limits.max_concurrent and in_flight >= limits.max_concurrent:
        return Verdict(reason="busy", retry_after=1.0, used=in_flight, limit=limits.max_concurrent)
    if limits.cost and used.cost + reserve.cost > limits.cost:
        return Verdict(reason="cost", used=used.cost, limit=limits.cost)
    if limits.tokens and used.tokens + reserve.tokens > limits.tokens:
        return Verdict(reason="tokens", used=used.tokens, limit=limits.tokens)
    return None


def settle_db(ticket: Ticket, spent: Amount) -> None:
    """End an admitted call (sync): release its reservation, add what it used."""
    if ticket.store != "db":
        return
    SpendCounter.objects.filter(user_id=ticket.user_id, month=ticket.month).update(
        in_flight=Greatest(F("in_flight") - 1, Value(0)),
        reserved_cost=Greatest(F("reserved_cost") - ticket.reserved.cost, Value(0)),
        reserved_tokens=Greatest(F("reserved_tokens") - ticket.reserved.tokens, Value(0)),
        used_cost=F("used_cost") + spent.cost,
        used_tokens=F("used_tokens") + spent.tokens,
    )


# --- with Redis: one script per admission, one per settlement --------------------------------

# KEYS: rate window (zset), calls under way (hash n/c/t), month used (hash c/t).
# ARGV: now, window, rpm, member, max_concurrent, cost limit, token limit, reserve cost,
#       reserve tokens, lease seconds.
# Returns {0} admitted, {-1} month used unknown (load it, retry), {1, oldest} rate, {2, n} busy,
# {3, used+reserved cost} or {4, used+reserved tokens} over the quota.
ADMIT = """
local now, window, rpm = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cap, climit, tlimit = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local rc, rt, lease = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local uc, ut = 0, 0
if climit > 0 or tlimit > 0 then
  local used = redis.call('HMGET', KEYS[3], 'c', 't')
  if not used[1] then return {-1} end
  uc, ut = tonumber(used[1]), tonumber(used[2])
end
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  if redis.call('ZCARD', KEYS[1]) >= rpm then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {1, oldest[2]}
  end
end
local live = redis.call('HMGET', KEYS[2], 'n', 'c', 't')
local n, lc, lt = tonumber(live[1] or 0), tonumber(live[2] or 0), tonumber(live[3] or 0)
if cap > 0 and n >= cap then return {2, n} end
if climit > 0 and uc + lc + rc > climit then return {3, uc + lc} end
if tlimit > 0 and ut + lt + rt > tlimit then return {4, ut + lt} end
if rpm > 0 then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('EXPIRE', KEYS[1], math.ceil(window) + 1)
end
redis.call('HINCRBY', KEYS[2], 'n', 1)
redis.call('HINCRBY', KEYS[2], 'c', rc)
redis.call('HINCRBY', KEYS[2], 't', rt)
redis.call('EXPIRE', KEYS[2], lease)
return {0}
"""

# KEYS: calls under way, month used. ARGV: reserved cost, reserved tokens, spent cost, tokens.
SETTLE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  local fields = {'n', 'c', 't'}
  local minus = {1, tonumber(ARGV[1]), tonumber(ARGV[2])}
  for i = 1, 3 do
    local left = tonumber(redis.call('HGET', KEYS[1], fields[i]) or 0) - minus[i]
    redis.call('HSET', KEYS[1], fields[i], math.max(left, 0))
  end
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], 'c', ARGV[3])
  redis.call('HINCRBY', KEYS[2], 't', ARGV[4])
end
return 0
"""


def _redis() -> Any:
    """Return the running loop's redis.asyncio client (settings.REDIS_URL must be set), with
    this module's scripts registered on it."""
    client = aredis()
    if not hasattr(client, "admit"):
        client.admit = client.register_script(ADMIT)
        client.settle = client.register_script(SETTLE)
    return client


def _keys(user_id: int, month: date) -> list[str]:
    # User ids are per database, so the database name is part of the key (shared Redis).
    base = f"hermit:ai:{settings.DATABASES['default']['NAME']}:{user_id}"
    return [f"{base}:rpm", f"{base}:live", f"{base}:used:{month:%Y%m}"]


async def admit_redis(user_id: int, limits: Limits, reserve: Amount,
                      now: datetime | None = None) -> Verdict:  # fmt: skip
    """Admit one call with one Lua script on Redis (two when the month's usage is not loaded)."""
    from ai_gateway import db

    now = now or timezone.now()
    stamp = time.time()
    month = month_start(now).date()
    keys = _keys(user_id, month)
    member = f"{stamp:.6f}:{secrets.token_hex(4)}"
    args = [stamp, WINDOW_SECONDS, limits.requests_per_minute, member, limits.max_concurrent,
            limits.cost, limits.tokens, reserve.cost, reserve.tokens,
            settings.HERMIT_AI_LEASE_SECONDS]  # fmt: skip
    client = _redis()
    for _ in range(2):
        result = [int(float(x)) if i else int(x) for i, x in enumerate(
            await client.admit(keys=keys, args=args))]  # fmt: skip
        code = result[0]
        if code == 0:
            return Verdict(Ticket(user_id, month, reserve, "redis"))
        if code == -1:
            used = await db.run(month_used, user_id, now)
            async with client.pipeline(transaction=True) as pipe:
                pipe.hsetnx(keys[2], "c", used.cost)
                pipe.hsetnx(keys[2], "t", used.tokens)
                pipe.expire(keys[2], USED_TTL_SECONDS)
                await pipe.execute()
            continue
        if code == 1:
            return Verdict(reason="rate", retry_after=max(0.0, result[1] + WINDOW_SECONDS - stamp))
        if code == 2:
            return Verdict(reason="busy", retry_after=1.0, used=result[1],
                           limit=limits.max_concurrent)  # fmt: skip
        if code == 3:
            return Verdict(reason="cost", used=result[1], limit=limits.cost)
        return Verdict(reason="tokens", used=result[1], limit=limits.tokens)
    raise RuntimeError("the month's usage could not be loaded into Redis")


async def settle_redis(ticket: Ticket, spent: Amount) -> None:
    """End an admitted call: release its reservation, add what it used."""
    if ticket.store != "redis":
        return
    keys = _keys(ticket.user_id, ticket.month)[1:]
    args = [ticket.reserved.cost, ticket.reserved.tokens, spent.cost, spent.tokens]
    await _redis().settle(keys=keys, args=args)


async def reset_rate(user_id: int) -> None:
    """Forget the user's recent requests (staff action, tests)."""
    _local.reset(user_id)
    if uses_redis():
        await _redis().delete(_keys(user_id, month_start().date())[0])
