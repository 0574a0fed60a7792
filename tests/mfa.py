"""Second factors for tests: enrol a user in TOTP, make codes, and a test client whose
force_login also records the second factor, as allauth's TOTP step does at a real login."""

from __future__ import annotations

import time
from typing import Any

from allauth.account.internal.flows.login import record_authentication
from allauth.mfa.models import Authenticator
from allauth.mfa.totp.internal.auth import (
    TOTP,
    format_hotp_value,
    generate_totp_secret,
    hotp_value,
)
from django.http import HttpRequest
from django.test import Client


def enroll_totp(user: Any) -> str:
    """Give user an activated TOTP authenticator; return its secret."""
    secret = generate_totp_secret()
    TOTP.activate(user, secret)
    return secret


def totp_now(secret: str) -> str:
    """Return the code for now, first waiting out the last second of a 30 s period (a code
    made then would be stale by the time it is checked)."""
    if 30 - time.time() % 30 < 1.5:
        time.sleep(30 - time.time() % 30 + 0.05)
    return format_hotp_value(hotp_value(secret, int(time.time()) // 30))


class MfaClient(Client):
    """A Client whose force_login, for a user with TOTP, also passes the TOTP step."""

    def force_login(self, user: Any, backend: str | None = None) -> None:
        super().force_login(user, backend)
        authenticator = Authenticator.objects.filter(
            user=user, type=Authenticator.Type.TOTP
        ).first()
        if authenticator is None:
            return
        request = HttpRequest()
        request.session = self.session
        record_authentication(request, user, "mfa", id=authenticator.pk, type="totp")
        request.session.save()
