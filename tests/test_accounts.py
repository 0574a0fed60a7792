"""Sign up, email verification, log in and out, password reset, TOTP, login rate limit."""

from __future__ import annotations

import re
import time

import pytest
from allauth.mfa.models import Authenticator
from allauth.mfa.totp.internal.auth import SECRET_SESSION_KEY
from django.contrib.auth import get_user_model
from django.core import mail
from django.test import Client
from django.urls import reverse

from tests.factories import PASSWORD, make_user

pytestmark = pytest.mark.django_db


def _link(body: str) -> str:
    match = re.search(r"https?://[^/\s]+(/\S+)", body)
    assert match, body
    return match.group(1)


def test_it_signs_up_verifies_and_reaches_the_dashboard(client: Client) -> None:
    response = client.post(
        reverse("account_signup"),
        {"email": "new@example.com", "password1": PASSWORD, "password2": PASSWORD},
    )
    assert response.status_code == 302
    assert response["Location"] == reverse("account_email_verification_sent")
    user = get_user_model().objects.get(email="new@example.com")
    assert user.account.plan.slug == "free"
    assert user.sandboxes.get().state == "provisioning"

    # Unverified: the dashboard is not reachable yet.
    assert client.get(reverse("dashboard")).status_code == 302
    assert len(mail.outbox) == 1
    confirm_url = _link(mail.outbox[0].body)
    assert client.get(confirm_url).status_code == 200
    response = client.post(confirm_url)
    assert response.status_code == 302
    response = client.get(reverse("dashboard"))
    assert response.status_code == 200
    assert b"Your agent" in response.content
    assert b"Free" in response.content


def test_it_refuses_a_duplicate_email_without_revealing_it(client: Client) -> None:
    make_user("taken@example.com")
    response = client.post(
        reverse("account_signup"),
        {"email": "taken@example.com", "password1": PASSWORD, "password2": PASSWORD},
    )
    # Same answer as a fresh sign-up (no account enumeration); the owner is told by mail.
    assert response.status_code == 302
    assert get_user_model().objects.filter(email="taken@example.com").count() == 1
    assert len(mail.outbox) == 1
    assert "already" in mail.outbox[0].body.lower()


def test_it_logs_in_and_out(client: Client, alice: object) -> None:
    response = client.post(
        reverse("account_login"), {"login": "alice@example.com", "password": PASSWORD}
    )
    assert response.status_code == 302
    assert client.get(reverse("dashboard")).status_code == 200
    client.post(reverse("account_logout"))
    assert client.get(reverse("dashboard")).status_code == 302


def test_it_rejects_a_wrong_password(client: Client, alice: object) -> None:
    response = client.post(
        reverse("account_login"), {"login": "alice@example.com", "password": "wrong"}
    )
    assert response.status_code == 200
    assert client.get(reverse("dashboard")).status_code == 302


def test_it_rate_limits_failed_logins(client: Client, alice: object) -> None:
    for _ in range(5):
        client.post(reverse("account_login"), {"login": "alice@example.com", "password": "no"})
    response = client.post(
        reverse("account_login"), {"login": "alice@example.com", "password": PASSWORD}
    )
    # Even the right password is refused once the limit is hit.
    assert response.status_code in (200, 429)
    assert client.get(reverse("dashboard")).status_code == 302


def test_it_resets_a_password(client: Client, alice: object) -> None:
    client.post(reverse("account_reset_password"), {"email": "alice@example.com"})
    assert len(mail.outbox) == 1
    response = client.get(_link(mail.outbox[0].body), follow=True)
    form_url = response.redirect_chain[-1][0] if response.redirect_chain else None
    assert form_url
    new = "a brand new passphrase 42"
    response = client.post(form_url, {"password1": new, "password2": new})
    assert response.status_code == 302
    assert (
        client.login(username="alice", password=new)
        or client.post(
            reverse("account_login"), {"login": "alice@example.com", "password": new}
        ).status_code
        == 302
    )


def _totp_now(secret: str) -> str:
    from allauth.mfa.totp.internal.auth import format_hotp_value, hotp_value

    return format_hotp_value(hotp_value(secret, int(time.time()) // 30))


def test_it_requires_totp_once_enabled(client: Client, alice: object) -> None:
    client.post(reverse("account_login"), {"login": "alice@example.com", "password": PASSWORD})
    # Enabling 2FA asks for the password again (allauth's reauthentication).
    response = client.get(reverse("mfa_activate_totp"))
    if response.status_code == 302:
        assert response["Location"].startswith(reverse("account_reauthenticate"))
        client.post(response["Location"], {"password": PASSWORD})
    assert client.get(reverse("mfa_activate_totp")).status_code == 200
    secret = client.session[SECRET_SESSION_KEY]
    response = client.post(reverse("mfa_activate_totp"), {"code": _totp_now(secret)})
    assert response.status_code == 302, response.content[:2000]
    assert Authenticator.objects.filter(user=alice, type=Authenticator.Type.TOTP).exists()

    client.post(reverse("account_logout"))
    response = client.post(
        reverse("account_login"), {"login": "alice@example.com", "password": PASSWORD}
    )
    assert response.status_code == 302
    assert response["Location"] == reverse("mfa_authenticate")
    # The password alone does not log in, nor does a wrong code.
    assert client.get(reverse("dashboard")).status_code == 302
    client.post(reverse("mfa_authenticate"), {"code": "000000"})
    assert client.get(reverse("dashboard")).status_code == 302
    response = client.post(reverse("mfa_authenticate"), {"code": _totp_now(secret)})
    assert response.status_code == 302
    assert client.get(reverse("dashboard")).status_code == 200
