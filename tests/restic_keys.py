"""A restic repository key that opens in milliseconds, for the tests' copied repositories.

``restic init`` calibrates the scrypt parameters of the repository's key so that deriving it
from the password takes about half a second, and every restic run opens the key again: for the
small repositories of the tests that is most of each run (~0.4 s of CPU of ~0.5 s). The tests'
initialised repositories are copies of one ``restic init`` made (tests/fixtures/backups.py);
``cheapen_key`` re-seals that one's key (the same master keys, so the same repository) under
scrypt parameters that take about a millisecond, before it is copied. restic reads them from the
key file as it reads its own, so every run is still real restic on a real, encrypted repository.
Repositories made by the code under test (a first backup's ``restic init``) keep restic's own.

The key file is restic's documented format (doc/design.rst, "Keys, Encryption and MAC"): JSON
holding the scrypt parameters, a salt and ``data``: IV, the AES-256-CTR ciphertext of the master
keys, and a Poly1305-AES MAC of the ciphertext. The 64 derived bytes are the AES key (32), then
the MAC's AES key k (16) and its Poly1305 r (16); the file is named by its SHA-256.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.hazmat.primitives.poly1305 import Poly1305

CHEAP = {"N": 1024, "r": 8, "p": 1}  # restic's own calibration gives, say, N=32768, r=8, p=5


def _derive(password: str, salt: bytes, params: dict[str, Any]) -> tuple[bytes, bytes, bytes]:
    key = Scrypt(salt=salt, length=64, n=params["N"], r=params["r"], p=params["p"]).derive(
        password.encode()
    )
    return key[:32], key[32:48], key[48:]


def _mac(k: bytes, r: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    """Poly1305-AES: Poly1305 keyed with r and AES-128_k(IV)."""
    s = Cipher(algorithms.AES(k), modes.ECB()).encryptor().update(iv)  # one block: the IV
    return Poly1305.generate_tag(r + s, ciphertext)


def _open(doc: dict[str, Any], password: str) -> bytes:
    encrypt, k, r = _derive(password, base64.b64decode(doc["salt"]), doc)
    data = base64.b64decode(doc["data"])
    iv, ciphertext, tag = data[:16], data[16:-16], data[-16:]
    if _mac(k, r, iv, ciphertext) != tag:
        raise ValueError("the password does not open this restic key")
    return Cipher(algorithms.AES(encrypt), modes.CTR(iv)).decryptor().update(ciphertext)


def _seal(doc: dict[str, Any], plain: bytes, password: str) -> bytes:
    salt, iv = os.urandom(64), os.urandom(16)
    encrypt, k, r = _derive(password, salt, CHEAP)
    ciphertext = Cipher(algorithms.AES(encrypt), modes.CTR(iv)).encryptor().update(plain)
    data = iv + ciphertext + _mac(k, r, iv, ciphertext)
    sealed = {**doc, **CHEAP, "salt": base64.b64encode(salt).decode()}
    sealed["data"] = base64.b64encode(data).decode()
    return json.dumps(sealed).encode()


def cheapen_key(location: Path, password: str) -> None:
    """Replace the one key of the local repository at ``location`` by the same master keys
    sealed under ``password`` with CHEAP scrypt parameters."""
    [old] = list((location / "keys").iterdir())
    doc = json.loads(old.read_bytes())
    raw = _seal(doc, _open(doc, password), password)
    new = old.with_name(hashlib.sha256(raw).hexdigest())
    new.write_bytes(raw)
    new.chmod(old.stat().st_mode & 0o777)
    old.unlink()
