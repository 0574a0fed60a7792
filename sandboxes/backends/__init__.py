"""Pick the sandbox backend named in settings (or on the sandbox row)."""

from __future__ import annotations

from functools import cache

from django.conf import settings

from sandboxes.backends.base import SandboxBackend


@cache
def get_backend(name: str | None = None) -> SandboxBackend:
    """Return the (process-wide) backend called ``name``, default settings.SANDBOX_BACKEND."""
    name = name or settings.SANDBOX_BACKEND
    if name == "local":
        from sandboxes.backends.local import LocalBackend

        return LocalBackend()
    if name == "fake":  # in memory, for the portal's own tests
        from sandboxes.backends.fake import FakeBackend

        return FakeBackend()
    raise ValueError(f"Unknown sandbox backend {name!r}; this build supports: local, fake")
