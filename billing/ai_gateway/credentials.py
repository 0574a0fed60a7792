"""Per-sandbox gateway credentials: issue, rotate, authenticate.

A credential names exactly one sandbox. The plaintext is returned once, at rotation, and handed
to the sandbox as env ``HERMIT_AI_KEY``; only its SHA-256 is stored, so a database leak does not
leak usable keys. Rotating replaces the old key at once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
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


def authenticate(key: str | None) -> SandboxCredential | None:
    """Return the credential (with sandbox, owner, account, plan) that ``key`` opens, or None."""
    if not key or not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    digest = hash_key(key)
    credential = (
        SandboxCredential.objects.select_related("sandbox__owner__account__plan")
        .filter(key_hash=digest)
        .first()
    )
    # The lookup is by hash already; compare again in constant time for defence in depth.
    if credential is None or not hmac.compare_digest(credential.key_hash, digest):
        return None
    return credential
