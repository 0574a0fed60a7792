"""Who may use the Control UI origin: short-lived, owner-bound grants, re-checked every time.

The Control UI origin never sees the portal's session. The portal, on its own origin and with
the user's session, mints a *ticket* (:func:`mint_ticket`): signed with ``SECRET_KEY``
(``django.core.signing``, its own salt), naming the user and their sandbox, valid for
``TICKET_AGE`` seconds and redeemable once (:func:`redeem_ticket` inserts its nonce into a
unique column, :class:`sandboxes.models.SpentControlUITicket`: atomic in the database, whatever
the cache backend). The Control UI origin exchanges it for its own cookie (``COOKIE_NAME``:
HttpOnly, SameSite=Lax, host-only, ``SESSION_AGE`` seconds; ``__Host-`` prefixed, so also
Secure, Path=/ and without Domain, when the Control UI is on https), whose value is a second
signed grant.

Every request and WebSocket on the Control UI origin re-checks the grant
(:func:`sandbox_for_grant`): the user still exists and is active, their password has not
changed since (a tag of their session auth hash), and the one door
(:func:`sandboxes.access.get_sandbox_for_user`) still gives them that very sandbox.
Otherwise the answer is None, never another user's sandbox.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core import signing
from django.db import IntegrityError, transaction
from django.http import Http404
from django.utils import timezone
from django.utils.crypto import constant_time_compare, salted_hmac

from sandboxes.access import get_sandbox_for_user
from sandboxes.models import Sandbox, SpentControlUITicket

# __Host-: the browser keeps it to this very host (no Domain), https-only, Path=/
COOKIE_NAME = (
    "__Host-hermit_controlui"
    if settings.HERMIT_CONTROL_UI_URL.startswith("https://")
    else "hermit_controlui"
)
TICKET_AGE = 60
SESSION_AGE = 3600
_TICKET_SALT = "hermit.controlui.ticket"
_SESSION_SALT = "hermit.controlui.session"
_AUTH_SALT = "hermit.controlui.auth"


@dataclass(frozen=True)
class Grant:
    """The owner ``user_id`` may use the Control UI of sandbox ``sandbox_id``."""

    user_id: int
    sandbox_id: int
    auth: str  # tag of the user's session auth hash when granted


def _auth_tag(user: Any) -> str:
    return salted_hmac(_AUTH_SALT, user.get_session_auth_hash()).hexdigest()[:32]


def _parse(data: Any) -> Grant | None:
    if not isinstance(data, dict):
        return None
    user_id, sandbox_id, auth = data.get("u"), data.get("s"), data.get("a")
    if isinstance(user_id, int) and isinstance(sandbox_id, int) and isinstance(auth, str):
        return Grant(user_id, sandbox_id, auth)
    return None


def mint_ticket(user: Any, sandbox: Sandbox) -> str:
    """Return a one-time ticket for ``user``'s own ``sandbox`` (the caller checked ownership)."""
    data = {"u": user.pk, "s": sandbox.pk, "a": _auth_tag(user), "n": secrets.token_urlsafe(16)}
    return signing.dumps(data, salt=_TICKET_SALT)


def redeem_ticket(ticket: str) -> Grant | None:
    """Return the ticket's grant, once; None if it is forged, expired or already used."""
    try:
        data = signing.loads(ticket, salt=_TICKET_SALT, max_age=TICKET_AGE)
    except signing.BadSignature:  # also SignatureExpired
        return None
    grant = _parse(data)
    nonce = data.get("n") if isinstance(data, dict) else None
    if grant is None or not isinstance(nonce, str):
        return None
    return grant if _spend(nonce) else None


def _spend(nonce: str) -> bool:
    """Record ``nonce`` as spent; False if it already was. Purge nonces too old to matter."""
    now = timezone.now()
    SpentControlUITicket.objects.filter(
        spent_at__lt=now - timedelta(seconds=TICKET_AGE + 5)
    ).delete()
    try:
        with transaction.atomic():
            SpentControlUITicket.objects.create(nonce=nonce, spent_at=now)
    except IntegrityError:
        return False
    return True


def session_value(grant: Grant) -> str:
    """The Control UI cookie's value for ``grant``."""
    return signing.dumps(
        {"u": grant.user_id, "s": grant.sandbox_id, "a": grant.auth}, salt=_SESSION_SALT
    )


def grant_from_session(value: str | None) -> Grant | None:
    """Return the grant in a Control UI cookie, or None if it is missing, forged or too old."""
    if not value:
        return None
    try:
        return _parse(signing.loads(value, salt=_SESSION_SALT, max_age=SESSION_AGE))
    except signing.BadSignature:
        return None


def sandbox_for_grant(grant: Grant | None) -> Sandbox | None:
    """Return the granted sandbox if its owner may still use it now, else None."""
    if grant is None:
        return None
    user = get_user_model().objects.filter(pk=grant.user_id, is_active=True).first()
    if user is None or not constant_time_compare(_auth_tag(user), grant.auth):
        return None
    try:
        sandbox = get_sandbox_for_user(user)
    except Http404:
        return None
    return sandbox if sandbox.pk == grant.sandbox_id else None


def sandbox_for_session(value: str | None) -> Sandbox | None:
    """Return the sandbox a Control UI cookie grants, re-checked now; None if none."""
    return sandbox_for_grant(grant_from_session(value))


asandbox_for_session = database_sync_to_async(sandbox_for_session)
