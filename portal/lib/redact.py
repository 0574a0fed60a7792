"""Mask secrets in free text: log lines, tracebacks, a sandbox's own logs shown to staff.

Contract: ``redact(text)`` returns ``text`` with every secret it recognises replaced by
``MASK``, keeping what is needed to read the line (the header or key name, a key's public kind
prefix such as ``sk-ant-`` or ``hmk_``). It is idempotent (redacting twice changes nothing
more) and never raises. What it recognises:

- Hermit's own: AI sandbox credentials (``hmk_…``, ai_gateway.credentials.KEY_PREFIX),
  and gateway tokens, device keys and restic passwords, which carry no prefix: they are
  ``secrets.token_urlsafe`` strings, caught by the high-entropy rule below and by their names;
- provider keys: OpenAI (``sk-…``, ``sk-proj-…``), Anthropic (``sk-ant-…``), OpenRouter
  (``sk-or-…``), Google (``AIza…``), Groq (``gsk_…``), xAI (``xai-…``);
- Stripe secret and restricted keys and webhook secrets (``sk_live_``, ``sk_test_``,
  ``rk_live_``, ``rk_test_``, ``whsec_``); GitHub and Slack tokens;
- Telegram bot tokens (``123456789:AA…``), also inside ``api.telegram.org/bot…`` URLs;
- ``Authorization``/``Proxy-Authorization`` header values and any ``Bearer …``;
- session cookies (``sessionid=…``, ``__Host-sessionid=…``) and whole ``Cookie`` headers;
- ``key=value``, ``"key": "value"`` and ``--key value`` pairs whose key names a secret
  (token, password, secret, api_key, private_key, credential, session, cookie, signature…);
  ``tokens=5`` or ``input_tokens=5`` are counts and stay;
- passwords in URLs (``scheme://user:password@host``), PEM private key blocks and JWTs;
- any run of 32 or more URL-safe base64 characters mixing upper case, lower case and digits
  (random tokens; hex digests and UUIDs have no upper case and stay).

Limits: a secret that is short, has no known prefix and no secret-naming key next to it (say a
bare 20-character password in prose) is not recognised; a standard-base64 secret containing
``/`` is cut there, and only its 32-character runs are caught.
"""

from __future__ import annotations

import re
from collections.abc import Callable

MASK = "[REDACTED]"

_I = re.IGNORECASE
_NOT_BEFORE = r"(?<![A-Za-z0-9_-])"  # a token starts at a word's edge
_NOT_AFTER = r"(?![A-Za-z0-9_-])"

# Values: a quoted string, or a bare word up to a separator. A bare value never starts with
# '=' (so ``token == other`` in traceback source is left alone).
_QUOTED = r"\"[^\"\n]+\"|'[^'\n]+'"
_BARE = r"[^\s=,;&\"'(){}\[\]<>][^\s,;&\"'(){}\[\]<>]*"

_SECRET_WORDS = (
    r"token|password|passwd|passphrase|pwd|secret|credentials?|signature|sessionid|session"
    r"|csrftoken|cookie|auth|dsn|api[_-]?key|apikey"
    r"|(?:private|access|secret|signing|encryption|webhook|master|ai|account)[_-]?key"
)
# A key ends with a secret word (``gateway_token``, ``HERMIT_AI_KEY``, ``x-api-key``), right
# before its separator: ``input_tokens`` or ``token_count`` do not.
_KEY_VALUE = re.compile(
    rf"(?P<key>(?<![A-Za-z0-9_.-])[A-Za-z0-9_.-]*?(?:{_SECRET_WORDS}))"
    rf"(?P<sep>[\"']?\s*[=:]\s*)(?P<value>{_QUOTED}|{_BARE})",
    _I,
)
# Command-line flags: ``--password VALUE``, ``-token=VALUE``.
_FLAG = re.compile(
    rf"(?P<key>(?<![A-Za-z0-9_.-])--?[A-Za-z0-9_-]*?(?:{_SECRET_WORDS}))"
    rf"(?P<sep>[ =])(?P<value>{_QUOTED}|{_BARE})",
    _I,
)
_AUTH_HEADER = re.compile(
    r"(?P<head>\b(?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?"
    r"(?:(?:bearer|basic|token|digest|bot)\s+)?)(?P<value>[^\s\"',;]+)",
    _I,
)
_BEARER = re.compile(r"(?P<head>\bbearer\s+)(?P<value>[A-Za-z0-9._~+/=-]+)", _I)
_COOKIE_HEADER = re.compile(r"(?P<head>\b(?:set-)?cookie:\s*)(?P<value>[^\n\"']+)", _I)
_SESSION_COOKIE = re.compile(
    r"(?P<head>(?<![A-Za-z0-9_-])(?:__(?:Host|Secure)-)?[A-Za-z0-9_-]*session(?:id)?=)"
    r"(?P<value>[^\s;,&\"']+)",
    _I,
)
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^:/?#@\s]*:)[^@/?#\s]+(?=@)", _I)
_PEM = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)", re.DOTALL
)
_JWT = re.compile(rf"{_NOT_BEFORE}eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# Known prefixes: the prefix (a public kind) is kept, the rest is masked.
_PREFIXED = re.compile(
    _NOT_BEFORE + r"(?P<head>"
    r"hmk_"  # Hermit's AI sandbox credential (ai_gateway.credentials.KEY_PREFIX)
    r"|sk-(?:ant-|proj-|or-|svcacct-|admin-)?"  # Anthropic, OpenAI, OpenRouter
    r"|(?:sk|rk)_(?:live|test)_|whsec_"  # Stripe secret and restricted keys, webhook secrets
    r"|gsk_|xai-|AIza"  # Groq, xAI, Google
    r"|gh[pousr]_|github_pat_|xox[abposr]-"  # GitHub, Slack
    r")(?P<value>[A-Za-z0-9_-]{12,}=*)" + _NOT_AFTER
)
_TELEGRAM = re.compile(
    r"(?<![0-9])(?P<head>[0-9]{5,12}:)(?P<value>[A-Za-z0-9_-]{30,})" + _NOT_AFTER
)
_RANDOM = re.compile(_NOT_BEFORE + r"[A-Za-z0-9_+-]{32,}={0,2}" + _NOT_AFTER)


def _keep_head(match: re.Match[str]) -> str:
    return match.group("head") + MASK


def _mask_value(match: re.Match[str]) -> str:
    value = match.group("value")
    if value[0] in "\"'":
        return f"{match.group('key')}{match.group('sep')}{value[0]}{MASK}{value[0]}"
    return f"{match.group('key')}{match.group('sep')}{MASK}"


def _mask_random(match: re.Match[str]) -> str:
    run = match.group(0)
    mixed = (any(c.isupper() for c in run) and any(c.islower() for c in run)) and any(
        c.isdigit() for c in run
    )
    return MASK if mixed else run


_KEY_HINTS = (
    "token", "pass", "pwd", "secret", "credential", "signature", "session", "cookie", "auth",
    "dsn", "key",
)  # fmt: skip
_PREFIX_HINTS = (
    "hmk_", "sk-", "sk_", "rk_", "whsec_", "gsk_", "xai-", "aiza", "ghp_", "gho_", "ghu_",
    "ghs_", "ghr_", "github_pat_", "xox",
)  # fmt: skip
Replacement = str | Callable[[re.Match[str]], str]
# (pattern, replacement, hints): a rule runs only on text holding one of its hints (lower
# case), so that a line with nothing secret-looking costs a few substring searches.
_RULES: list[tuple[re.Pattern[str], Replacement, tuple[str, ...]]] = [
    (_PEM, MASK, ("private key",)),
    (_URL_PASSWORD, _keep_head, ("://",)),
    (_AUTH_HEADER, _keep_head, ("authorization",)),
    (_BEARER, _keep_head, ("bearer",)),
    (_COOKIE_HEADER, _keep_head, ("cookie",)),
    (_SESSION_COOKIE, _keep_head, ("session",)),
    (_KEY_VALUE, _mask_value, _KEY_HINTS),
    (_FLAG, _mask_value, _KEY_HINTS),
    (_JWT, MASK, ("eyj",)),
    (_PREFIXED, _keep_head, _PREFIX_HINTS),
    (_TELEGRAM, _keep_head, (":",)),
    (_RANDOM, _mask_random, ()),
]


def redact(text: str) -> str:
    """Return ``text`` with the secrets it holds replaced by ``MASK`` (see the module doc)."""
    if not text:
        return text
    lower = text.lower()
    for pattern, replacement, hints in _RULES:
        if not hints or any(hint in lower for hint in hints):
            text = pattern.sub(replacement, text)
    return text
