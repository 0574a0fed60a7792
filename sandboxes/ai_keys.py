"""What sandboxes ask of the AI gateway, which sits above them: functions it registers.

The gateway (``ai_gateway``) holds foreign keys to sandboxes and imports them; sandboxes never
import it. At app-ready it registers (:func:`register`) how a sandbox gets a fresh credential
for a start (:func:`mint_key`) and a line about an owner's model use for staff pages
(:func:`usage_line`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from django.core.exceptions import ImproperlyConfigured

if TYPE_CHECKING:
    from sandboxes.models import Sandbox

Minter = Callable[["Sandbox"], str]
UsageLine = Callable[[Any], str]

_minter: Minter | None = None
_usage_line: UsageLine | None = None


def register(*, mint: Minter, usage: UsageLine | None = None) -> None:
    """Register the gateway's credential minter (and, optionally, its usage line)."""
    global _minter, _usage_line
    _minter = mint
    _usage_line = usage


def mint_key(sandbox: Sandbox) -> str:
    """Issue a new AI-gateway credential for ``sandbox`` (the old one stops working at once);
    return its plaintext, which only the gateway's environment or config should hold."""
    if _minter is None:
        raise ImproperlyConfigured(
            "No AI-gateway credential minter is registered: the ai_gateway app registers one "
            "with sandboxes.ai_keys.register() in its AppConfig.ready()."
        )
    return _minter(sandbox)


def usage_line(owner: Any) -> str:
    """This month's model use of ``owner`` in one line, or "-" without a gateway."""
    return _usage_line(owner) if _usage_line is not None else "-"
