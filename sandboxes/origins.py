"""Origins, compared as scheme + host + port: the portal's, and the Control UI's own.

An origin is ``scheme://host[:port]``, lower-cased, with the scheme's default port left out, so
``HTTP://Example.com:80`` and ``http://example.com`` are one origin and ``https://example.com``
is another. The Control UI (HTML and JS the sandbox controls) lives on its own origin,
``HERMIT_CONTROL_UI_URL``; the portal's origins are ``SITE_URL`` and ``CSRF_TRUSTED_ORIGINS``,
never including the Control UI's.

Browsers do not keep cookies apart by port, so the Control UI owns its whole *host name*: a
request to any port of it is a Control UI request (:func:`is_control_ui_host`), and the portal
is never served there (settings refuse a ``SITE_URL`` on the same host name).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from django.conf import settings

DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(url: str) -> str:
    """Return the origin of an absolute http(s) URL, or "" if it has none or is malformed."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return ""
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    if scheme not in DEFAULT_PORTS or not host or parts.username or parts.password:
        return ""
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def control_ui_origin() -> str:
    """The Control UI's own origin."""
    return origin_of(settings.HERMIT_CONTROL_UI_URL)


def portal_origin() -> str:
    """The portal's canonical origin (``SITE_URL``), as the gateways' ``allowedOrigins`` list it."""
    return origin_of(settings.SITE_URL)


def portal_origins() -> frozenset[str]:
    """Every origin the portal is served from; never the Control UI's."""
    listed = {portal_origin(), *(origin_of(o) for o in settings.CSRF_TRUSTED_ORIGINS)}
    return frozenset(listed - {"", control_ui_origin()})


def hostname_of(host: str) -> str:
    """The lower-cased host name in a ``Host`` header (``host[:port]``), or "" if malformed."""
    try:
        name = urlsplit(f"//{host.strip()}").hostname or ""
    except ValueError:
        return ""
    return name.rstrip(".")  # as Django's host check does: "localhost." is "localhost"


def is_control_ui_host(host: str) -> bool:
    """True if a request's ``Host`` header names the Control UI's host, on whatever port:
    a browser would share that host's cookies with the Control UI's origin."""
    ours = urlsplit(settings.HERMIT_CONTROL_UI_URL).hostname
    return bool(host) and hostname_of(host) == ours
