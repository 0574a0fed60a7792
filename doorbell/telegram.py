"""The Telegram Bot API, as the portal calls it (httpx): one small module, and the test seam.

Every call is ``POST {HERMIT_TELEGRAM_API_ROOT}/bot<token>/<method>`` with a JSON body; Telegram
answers ``{"ok": true, "result": ...}`` or ``{"ok": false, "error_code", "description"}``.
A refusal raises :class:`TelegramError` with Telegram's description; a network failure raises
it too, with a plain message. The bot token is in the URL, so no URL is ever logged or put in
an error message here (httpx's own exceptions name the URL: they are replaced, not chained).
"""

from __future__ import annotations

import re
from typing import Any

import httpx
from django.conf import settings

TIMEOUT = 10.0
# A bot token is "<bot id>:<35 characters>"; checked before it goes into a URL.
TOKEN_RE = re.compile(r"^[0-9]{1,20}:[A-Za-z0-9_-]{20,100}$")


class TelegramError(Exception):
    """Telegram refused a call, or could not be reached. ``code`` is Telegram's error_code
    (401 for a bad token), 0 when there was no answer."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


def api_root() -> str:
    return str(settings.HERMIT_TELEGRAM_API_ROOT).rstrip("/")


def valid_token(token: str) -> bool:
    return bool(TOKEN_RE.match(token))


def call(token: str, method: str, params: dict[str, Any] | None = None) -> Any:
    """Call ``method`` with ``params`` as ``token``'s bot; return Telegram's ``result``."""
    if not valid_token(token):
        raise TelegramError("That does not look like a bot token (it is like 123456:ABC-DEF...).")
    try:
        response = httpx.post(
            f"{api_root()}/bot{token}/{method}", json=params or {}, timeout=TIMEOUT
        )
        body = response.json()
    except (httpx.HTTPError, ValueError):
        raise TelegramError("Telegram could not be reached; try again in a minute.") from None
    if not isinstance(body, dict):
        raise TelegramError("Telegram answered with something that is not its API's format.")
    if not body.get("ok"):
        code = body.get("error_code")
        raise TelegramError(
            str(body.get("description") or "Telegram refused the request."),
            code if isinstance(code, int) else response.status_code,
        )
    return body.get("result")


def get_me(token: str) -> dict[str, Any]:
    """Return the bot's User object (``id``, ``username``, ``is_bot``...)."""
    result = call(token, "getMe")
    if not isinstance(result, dict) or not result.get("is_bot"):
        raise TelegramError("That token does not belong to a bot.")
    return result


def set_webhook(token: str, url: str, secret: str) -> None:
    """Point the bot's updates at ``url``; Telegram sends ``secret`` in each request's
    X-Telegram-Bot-Api-Secret-Token header."""
    call(
        token,
        "setWebhook",
        {"url": url, "secret_token": secret, "allowed_updates": ["message", "edited_message"]},
    )


def delete_webhook(token: str) -> None:
    call(token, "deleteWebhook", {"drop_pending_updates": False})
