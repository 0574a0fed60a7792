"""The portal's path to a gateway on another sandbox host: a URL on that host's edge
(``hostedge``, which relays to the gateway's port on the host's own loopback), carrying a
short-lived token the portal signs. Gateways never listen on a network address.

Contract:

* **Who uses it.** A sandbox whose host is this machine (or that has no host yet) is reached
  as before, at the backend's endpoint on 127.0.0.1; :func:`is_remote` says when to come here
  instead, and :func:`gateway_url` builds the URL (``ws://`` for the chat and the Control UI's
  socket, ``http://`` for the Control UI's pages; ``wss://`` and ``https://`` with
  HERMIT_HOST_EDGE_TLS): ``<scheme>://<host address>:<edge port>/sandboxes/<id><path>
  ?edge_token=<token>``. The host's address is its
  ``SandboxHost.address``; a port in it (``10.0.0.2:9003``) overrides HERMIT_HOST_EDGE_PORT.
* **The token** is ``v1.<sandbox id>.<expiry>.<nonce>.<mac>``: the MAC is HMAC-SHA256 under
  HERMIT_HOST_LINK_SECRET over the host's name, the sandbox id, the expiry (Unix seconds, now +
  HERMIT_HOST_LINK_TTL) and a random nonce. It opens one connection (the edge remembers used
  nonces until they expire), to one sandbox, on one host, for a few seconds; a token for another
  host fails its MAC there. :func:`verify` checks one in constant time and raises
  :class:`TokenRefused` with the reason and the HTTP status to answer.
* **One secret per deployment**, shared by the portal and every host: every host already holds
  the deployment's database URL and encryption keys (its worker decrypts gateway tokens), so a
  secret per host would not keep a host that is broken into from the others' gateways, and
  would cost a secret store. The host name inside the MAC keeps a token to its host.
  Comma-separated secrets rotate: the first signs, any verifies. With DEBUG and no secret set,
  one is derived from SECRET_KEY; otherwise an unset (or short) secret is an error when a token
  is made or checked, so a single machine needs none.
* Tokens are secrets: never logged. The query parameter is named ``edge_token`` so that the
  log redaction (portal.lib.redact) masks it in any URL that reaches a log line.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from sandboxes import hosts
from sandboxes.models import Sandbox, SandboxHost

VERSION = "v1"
QUERY_PARAMETER = "edge_token"
MIN_SECRET_LENGTH = 32
_DOMAIN = b"hermit-host-link"


class TokenRefused(Exception):
    """A token the edge refuses: ``reason`` (safe to show, names no secret) and ``status``
    (401: no valid token; 403: a valid token for another sandbox)."""

    def __init__(self, reason: str, status: int = 401) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class Claims:
    """What a verified token grants: ``sandbox_id`` until ``expires`` (Unix seconds);
    ``nonce`` names the token, for the edge's record of used ones."""

    sandbox_id: int
    expires: int
    nonce: str


def link_secrets() -> list[bytes]:
    """The secrets, newest first (see the module docstring). Raise ImproperlyConfigured if
    there is none, or one is shorter than MIN_SECRET_LENGTH characters."""
    values = list(settings.HERMIT_HOST_LINK_SECRET)
    if not values and settings.DEBUG:
        values = [
            hashlib.sha256(f"hermit-dev-host-link:{settings.SECRET_KEY}".encode()).hexdigest()
        ]
    if not values:
        raise ImproperlyConfigured(
            "HERMIT_HOST_LINK_SECRET (or _FILE) must be set to reach sandboxes on other hosts"
        )
    if any(len(value) < MIN_SECRET_LENGTH for value in values):
        raise ImproperlyConfigured(
            f"HERMIT_HOST_LINK_SECRET: each secret needs {MIN_SECRET_LENGTH} characters or more"
        )
    return [value.encode() for value in values]


def _mac(secret: bytes, host_name: str, sandbox_id: int, expires: int, nonce: str) -> str:
    message = b"\n".join(
        [_DOMAIN, VERSION.encode(), host_name.encode(), str(sandbox_id).encode(),
         str(expires).encode(), nonce.encode()]
    )  # fmt: skip
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def sign(host_name: str, sandbox_id: int, *, now: float | None = None) -> str:
    """A token that opens sandbox ``sandbox_id``'s gateway on host ``host_name`` once, within
    HERMIT_HOST_LINK_TTL seconds of ``now`` (default: the current time)."""
    expires = int(time.time() if now is None else now) + int(settings.HERMIT_HOST_LINK_TTL)
    nonce = secrets.token_urlsafe(12)
    mac = _mac(link_secrets()[0], host_name, sandbox_id, expires, nonce)
    return f"{VERSION}.{sandbox_id}.{expires}.{nonce}.{mac}"


def verify(token: str, host_name: str, sandbox_id: int, *, now: float | None = None) -> Claims:
    """Check ``token`` for a request to sandbox ``sandbox_id`` on host ``host_name``; return
    its claims. Raise TokenRefused: 401 if it is missing, malformed, not signed for this host
    by a current secret, or expired; 403 if it is valid but for another sandbox. (Whether its
    nonce was used before is the caller's record: see hostedge.)"""
    if not token:
        raise TokenRefused("no token")
    parts = token.split(".")
    if len(parts) != 5 or parts[0] != VERSION or not parts[1].isdigit() or not parts[2].isdigit():
        raise TokenRefused("malformed token")
    claimed, expires, nonce, mac = int(parts[1]), int(parts[2]), parts[3], parts[4]
    valid = False
    for secret in link_secrets():  # every secret, so the time taken says nothing of which
        expected = _mac(secret, host_name, claimed, expires, nonce)
        valid |= hmac.compare_digest(expected.encode(), mac.encode())
    if not valid:
        raise TokenRefused("bad token")
    if expires <= (time.time() if now is None else now):
        raise TokenRefused("expired token")
    if claimed != sandbox_id:
        raise TokenRefused("token for another sandbox", status=403)
    return Claims(sandbox_id=claimed, expires=expires, nonce=nonce)


def is_remote(sandbox: Sandbox) -> bool:
    """Whether the sandbox runs on another host than this machine (then reach it through
    :func:`gateway_url`). A sandbox with no host yet counts as this machine's."""
    return not hosts.is_here(sandbox)


def edge_base(host: SandboxHost, scheme: str = "ws") -> str:
    """``<scheme>://<address>:<port>`` of a host's edge (see the module docstring)."""
    if not host.address:
        raise ImproperlyConfigured(f"sandbox host {host.name} has no address")
    parts = urlsplit(f"//{host.address}")
    port = parts.port or int(settings.HERMIT_HOST_EDGE_PORT)
    name = parts.hostname or ""
    if ":" in name:  # IPv6
        name = f"[{name}]"
    return f"{scheme}://{name}:{port}"


def gateway_url(sandbox: Sandbox, path: str = "/", *, scheme: str = "ws", query: str = "") -> str:
    """The signed URL of ``path`` on the gateway of ``sandbox`` (on another host) through that
    host's edge; ``query`` (already encoded) is passed on to the gateway; ``scheme`` is ws or
    http, made wss or https with HERMIT_HOST_EDGE_TLS. Queries the sandbox's
    host (a database read: call it from sync code or through sync_to_async)."""
    if sandbox.host_id is None:
        raise ValueError(f"sandbox {sandbox.pk} has no host: reach it on this machine")
    host = SandboxHost.objects.get(pk=sandbox.host_id)
    if not path.startswith("/"):
        raise ValueError(f"path must start with /: {path!r}")
    token = urlencode({QUERY_PARAMETER: sign(host.name, sandbox.pk)})
    if settings.HERMIT_HOST_EDGE_TLS:
        scheme = {"ws": "wss", "http": "https"}.get(scheme, scheme)
    return f"{edge_base(host, scheme)}/sandboxes/{sandbox.pk}{path}?{token}" + (
        f"&{query}" if query else ""
    )
