"""portal.lib.redact: secrets in free text are masked, the rest of the line stays readable."""

from __future__ import annotations

import secrets

import pytest

from ai_gateway.credentials import KEY_PREFIX
from portal.lib.redact import MASK, redact


def _random(n: int = 32) -> str:
    """A token_urlsafe string, with upper and lower case and digits, as Hermit's tokens are."""
    while True:
        token = secrets.token_urlsafe(n)
        if any(c.isupper() for c in token) and any(c.isdigit() for c in token):
            return token


def _alnum(n: int) -> str:
    return "".join(
        secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789")
        for _ in range(n)
    )


def _assert_masked(text: str, secret: str) -> str:
    out = redact(text)
    assert secret not in out, out
    assert MASK in out, out
    assert redact(out) == out  # idempotent
    return out


def test_it_masks_an_ai_sandbox_credential_keeping_its_prefix() -> None:
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    out = _assert_masked(f"model call refused for {key} (rate limit)", key)
    assert out == f"model call refused for {KEY_PREFIX}{MASK} (rate limit)"


def test_it_masks_a_bare_gateway_token() -> None:
    token = _random()
    out = _assert_masked(f"connect ws://127.0.0.1:18789 with {token} failed", token)
    assert out == f"connect ws://127.0.0.1:18789 with {MASK} failed"


def test_it_masks_a_gateway_token_in_a_url_fragment_and_env_line() -> None:
    token = _random()
    assert redact(f"/#token={token}") == f"/#token={MASK}"
    assert redact(f"OPENCLAW_GATEWAY_TOKEN={token}") == f"OPENCLAW_GATEWAY_TOKEN={MASK}"


@pytest.mark.parametrize(
    ("prefix", "kept"),
    [
        ("sk-", "sk-"),
        ("sk-proj-", "sk-proj-"),
        ("sk-ant-api03-", "sk-ant-"),
        ("sk_live_", "sk_live_"),
        ("sk_test_", "sk_test_"),
        ("rk_live_", "rk_live_"),
        ("whsec_", "whsec_"),
    ],
)
def test_it_masks_provider_and_stripe_keys(prefix: str, kept: str) -> None:
    key = prefix + _alnum(40)
    out = _assert_masked(f"upstream said 401 for key {key}.", key)
    assert out == f"upstream said 401 for key {kept}{MASK}."


def test_it_masks_a_telegram_bot_token_also_inside_its_api_url() -> None:
    token = "123456789:AA" + _alnum(33)
    out = _assert_masked(f"GET https://api.telegram.org/bot{token}/getMe 200", token)
    assert out == f"GET https://api.telegram.org/bot123456789:{MASK}/getMe 200"


@pytest.mark.parametrize(
    "line",
    [
        "Authorization: Bearer {s}",
        "authorization: Basic {s}",
        "{{'authorization': 'Bearer {s}', 'accept': '*/*'}}",
        "curl -H 'Authorization: Bearer {s}' http://x/",
        "bearer {s}",
    ],
)
def test_it_masks_authorization_headers(line: str) -> None:
    secret = _alnum(20)
    out = _assert_masked(line.format(s=secret), secret)
    assert "uthorization" in out or "bearer" in out


@pytest.mark.parametrize(
    "line",
    [
        "Cookie: csrftoken=abc; sessionid={s}",
        "Set-Cookie: __Host-sessionid={s}; Path=/; Secure",
        "sessionid={s}",
        "__Host-sessionid={s}",
        "{{'HTTP_COOKIE': 'sessionid={s}'}}",
        "COOKIES={{'sessionid': '{s}'}}",
    ],
)
def test_it_masks_session_cookies(line: str) -> None:
    secret = "z" + _alnum(31).lower()  # Django's session keys: lower case and digits
    _assert_masked(line.format(s=secret), secret)


@pytest.mark.parametrize(
    "line",
    [
        "password=hunter2hunter2",
        "db_password: hunter2hunter2",
        '{{"api_key": "hunter2hunter2"}}',
        "x-api-key: hunter2hunter2",
        "HERMIT_AI_KEY=hunter2hunter2",
        "STRIPE_SECRET=hunter2hunter2",
        "https://example.org/cb?access_token=hunter2hunter2&state=ok",
        "client_secret='hunter2hunter2'",
        "restic --password hunter2hunter2 backup",
        "RESTIC_PASSWORD=hunter2hunter2 restic backup",
    ],
)
def test_it_masks_values_of_keys_that_name_a_secret(line: str) -> None:
    out = redact(line.format())
    assert "hunter2hunter2" not in out, out
    assert MASK in out


def test_it_keeps_counts_and_ordinary_words() -> None:
    line = (
        "usage sandbox=12 input_tokens=523 output_tokens=91 tokens=614 token_count=3 "
        "model=claude-sonnet-4 status=200 author=ann duration_ms=1520 "
        "snapshot=3f2a9c1e8b7d6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a1f "
        "uuid=123e4567-e89b-12d3-a456-426614174000 path=/var/lib/hermit/sandboxes/alice-default"
    )
    assert redact(line) == line


def test_it_masks_a_password_in_a_url_and_keeps_the_host() -> None:
    out = _assert_masked("broker redis://:s3cretpass@10.0.0.5:6379/0 down", "s3cretpass")
    assert out == f"broker redis://:{MASK}@10.0.0.5:6379/0 down"
    out = _assert_masked("postgres://hermit:pw-1234@db/hermit", "pw-1234")
    assert out == f"postgres://hermit:{MASK}@db/hermit"


def test_it_masks_private_key_blocks_and_jwts() -> None:
    pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA\n-----END PRIVATE KEY-----"
    out = _assert_masked(f"key:\n{pem}\ndone", "MC4CAQAwBQYDK2VwBCIEIA")
    assert out == f"key:\n{MASK}\ndone"
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"
    assert redact(f"got {jwt} ok") == f"got {MASK} ok"


def test_it_masks_secrets_inside_a_traceback_text() -> None:
    key = "sk-ant-api03-" + _alnum(60)
    text = (
        "Traceback (most recent call last):\n"
        '  File "ai_gateway/proxy.py", line 10, in forward\n'
        "    raise ValueError(f'bad key {key}')\n"
        f"ValueError: bad key {key}\n"
    )
    out = _assert_masked(text, key)
    assert "ValueError: bad key sk-ant-" in out
    assert "line 10, in forward" in out


def test_it_returns_empty_text_unchanged() -> None:
    assert redact("") == ""
