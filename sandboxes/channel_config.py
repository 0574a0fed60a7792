"""Messenger channels' part of a sandbox's OpenClaw config, as the sandboxes layer sees it.

Sandboxes never read channel links. The app that owns them (``doorbell``) registers a provider
at app-ready (:func:`register_provider`) that turns a sandbox into a :class:`ChannelConfig`: a
config fragment (top-level OpenClaw keys such as ``channels`` and ``hooks``, with secrets only
as ``${VAR}`` references) and the environment that carries those secrets. A start merges both
into the spec (:mod:`sandboxes.openclaw.setup`). With no provider, or none for this sandbox,
the config is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sandboxes.models import Sandbox


@dataclass(frozen=True)
class ChannelConfig:
    config: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


Provider = Callable[["Sandbox"], ChannelConfig]
_providers: list[Provider] = []


def register_provider(provider: Provider) -> None:
    """Add ``provider`` (idempotent: registering the same function twice keeps one)."""
    if provider not in _providers:
        _providers.append(provider)


def for_sandbox(sandbox: Sandbox) -> ChannelConfig:
    """Return every provider's fragment for ``sandbox`` merged (later keys win at top level)."""
    config: dict[str, Any] = {}
    env: dict[str, str] = {}
    for provider in _providers:
        part = provider(sandbox)
        config.update(part.config)
        env.update(part.env)
    return ChannelConfig(config, env)
