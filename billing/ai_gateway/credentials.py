"""Per-sandbox gateway credentials: issue, rotate, authenticate.

A credential names exactly one sandbox. The plaintext is returned once, at rotation, and handed
to the sandbox as env ``HERMIT_AI_KEY``; only its SHA-256 is stored, so a database leak does not
leak usable keys. Rotating replaces the old key at once.

``authenticate`` runs on every model call, so it is one query that reads only the columns the
gateway needs (no model instances, no secrets but the owner's own provider keys).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from django.utils import timezone

from billing.ai_gateway.models import SandboxCredential

if TYPE_CHECKING:
    from sandboxes.models import Sandbox

KEY_PREFIX = "hmk_"


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


_OWNER = "sandbox__owner__"
_PLAN = _OWNER + "account__plan__"
_COLUMNS = (
    "key_hash", "pk", "last_used_at", "sandbox_id", _OWNER + "id", _OWNER + "is_active",
    _PLAN + "name", _PLAN + "requests_per_minute", _PLAN + "monthly_spend_limit",
    _PLAN + "monthly_token_quota", _OWNER + "provider_keys__provider",
    _OWNER + "provider_keys__api_key",
)  # fmt: skip


def authenticate(key: str | None) -> KeyHolder | None:
    """Return who ``key`` speaks for (sandbox, owner, plan, the owner's own keys), or None.

    One row per provider key of the owner (or one row if none), from one query.
    """
    if not key or not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    digest = hash_key(key)
    rows = list(SandboxCredential.objects.filter(key_hash=digest).values_list(*_COLUMNS))
    # The lookup is by hash already; compare again in constant time for defence in depth.
    if not rows or not hmac.compare_digest(rows[0][0], digest):
        return None
    _, pk, last_used, sandbox_id, owner_id, active, name, rpm, spend, tokens = rows[0][:10]
    plan = PlanLimits(name, rpm, spend, tokens) if name is not None else None
    keys = {provider: api_key for *_, provider, api_key in rows if provider is not None}
    return KeyHolder(pk, last_used, sandbox_id, owner_id, active, plan, keys)
