"""Encryption of secrets at rest (provider keys, gateway tokens, device keys).

Keys come from settings.HERMIT_ENCRYPTION_KEYS (Fernet keys, newest first); older keys still
decrypt, so keys rotate without a migration. In development with no keys set, one key is
derived from SECRET_KEY.
"""

from __future__ import annotations

import base64
import hashlib
from functools import cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings

__all__ = ["InvalidToken", "decrypt", "encrypt", "generate_key"]


def generate_key() -> str:
    return Fernet.generate_key().decode()


@cache
def _fernet() -> MultiFernet:
    keys = list(settings.HERMIT_ENCRYPTION_KEYS)
    if not keys:
        digest = hashlib.sha256(f"hermit-dev-encryption:{settings.SECRET_KEY}".encode()).digest()
        keys = [base64.urlsafe_b64encode(digest).decode()]
    return MultiFernet([Fernet(key.encode()) for key in keys])


def encrypt(text: str) -> str:
    """Return the ciphertext of ``text`` as an ASCII string."""
    return _fernet().encrypt(text.encode()).decode()


def decrypt(token: str) -> str:
    """Return the plaintext of ``token``. Raise InvalidToken if no configured key opens it."""
    return _fernet().decrypt(token.encode()).decode()
