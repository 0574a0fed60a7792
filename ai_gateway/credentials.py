"""Per-sandbox gateway credentials: issue, rotate, authenticate.

A credential names exactly one sandbox. The plaintext is returned once, at rotation, and handed
to the sandbox as env ``HERMIT_AI_KEY``; only its SHA-256 is stored, so a database leak does not
leak usable keys. Rotating replaces the old key at once.

``authenticate`` runs on every model call, so it is one query that reads only the columns the
gateway needs (no model instances, no secrets but the owner's own provider keys), and what a
valid key opens is kept for settings.HERMIT_AI_KEY_CACHE_SECONDS in this process. Saves made in
this process (a rotation, a deactivated owner, a plan or provider key change) drop the cache at
once (``forget_keys``, wired in apps.ready); saves made elsewhere reach the gateway within that
time. Unknown keys are never cached: a new key works at once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.utils import timezone

from ai_gateway.models import SandboxCredential

if TYPE_CHECKING:
    from sandboxes.models import Sandbox

KEY_PREFIX = "hmk_"
CACHE_MAX = 10_000  # keys; the whole cache is dropped when it would grow past this


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def rotate_credential(sandbox: Sandbox) -> str:
    """Issue a new credential for ``sandbox`` (replacing any old one); return its plaintext."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    SandboxCredential.objects.update_or_create(
        sandbox=sandbox,
        defaults={"key_hash": hash_key(key), "prefix": key[:12], "rotated_at": timezone.now()},
    )
    return key


@dataclass(frozen=True)
class PlanLimits:
    """The owner's plan, as far as model calls are concerned."""

    name: str
    requests_per_minute: int
    monthly_spend_limit: Decimal
    monthly_token_quota: int


@dataclass(frozen=True)
class KeyHolder:
    """Who a valid key speaks for. ``plan`` is None when the owner has no account yet.

    ``user_keys`` (provider: the owner's own key) holds secrets: it is left out of the repr.
    """

    credential_id: int
    last_used_at: datetime | None
    sandbox_id: int
    owner_id: int
    owner_active: bool
    plan: PlanLimits | None
    user_keys: dict[str, str] = field(repr=False)
    owner_suspended: bool = False  # staff suspended the owner (sandboxes.accounts)


_OWNER = "sandbox__owner__"
_PLAN = _OWNER + "account__plan__"
_COLUMNS = (
    "key_hash", "pk", "last_used_at", "sandbox_id", _OWNER + "id", _OWNER + "is_active",
    _PLAN + "name", _PLAN + "requests_per_minute", _PLAN + "monthly_spend_limit",
    _PLAN + "monthly_token_quota", _OWNER + "suspension__id", _OWNER + "provider_keys__provider",
    _OWNER + "provider_keys__api_key",
)  # fmt: skip


_cache: dict[str, tuple[float, KeyHolder]] = {}  # key hash: (expiry, holder)
_cache_lock = threading.Lock()


def authenticate(key: str | None, now: float | None = None) -> KeyHolder | None:
    """Return who ``key`` speaks for (sandbox, owner, plan, the owner's own keys), or None.

    ``now`` is a ``time.monotonic()`` reading (tests move it on).
    """
    if not key or not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    digest = hash_key(key)
    now = time.monotonic() if now is None else now
    hit = _cache.get(digest)
    if hit is not None and hit[0] > now:
        return hit[1]
    holder = _lookup(digest)
    ttl = settings.HERMIT_AI_KEY_CACHE_SECONDS
    if holder is not None and ttl > 0:
        with _cache_lock:
            if len(_cache) >= CACHE_MAX:
                _cache.clear()
            _cache[digest] = (now + ttl, holder)
    return holder


def _lookup(digest: str) -> KeyHolder | None:
    """Read the holder of the key hashed ``digest``: one row per provider key of the owner (or
    one row if none), from one query."""
    rows = list(SandboxCredential.objects.filter(key_hash=digest).values_list(*_COLUMNS))
    # The lookup is by hash already; compare again in constant time for defence in depth.
    if not rows or not hmac.compare_digest(rows[0][0], digest):
        return None
    _, pk, last_used, sandbox_id, owner_id, active, name, rpm, spend, tokens, held = rows[0][:11]
    plan = PlanLimits(name, rpm, spend, tokens) if name is not None else None
    keys = {provider: api_key for *_, provider, api_key in rows if provider is not None}
    return KeyHolder(pk, last_used, sandbox_id, owner_id, active, plan, keys, held is not None)


def touched(holder: KeyHolder, when: datetime) -> None:
    """Note that the holder's ``last_used_at`` was set to ``when`` (so it is not set again
    while the cached holder lives)."""
    with _cache_lock:
        for digest, (expiry, cached) in list(_cache.items()):
            if cached.credential_id == holder.credential_id:
                _cache[digest] = (expiry, replace(cached, last_used_at=when))


def forget_keys(**kwargs: Any) -> None:
    """Signal receiver: drop every cached holder (a credential, owner, plan or key changed)."""
    with _cache_lock:
        _cache.clear()
