"""What Django's error pages and error mails may show.

Contract: the technical 500 page and error mails never carry a password found in a URL or a
setting. Settings whose names speak of URLs, DSNs or brokers are hidden outright, on top of
Django's own list (keys, tokens, secrets, passwords); and in the whole rendered report (settings
left shown such as a cache's LOCATION, request META, local variables, the exception's message)
the password of every ``scheme://user:password@host`` is replaced with stars. Limit: a secret
that is neither in such a URL nor under a name Django or this filter hides is shown.
"""

from __future__ import annotations

import re
from typing import Any

from django.utils.safestring import SafeString, mark_safe
from django.views.debug import ExceptionReporter, SafeExceptionReporterFilter

_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/?#@\s]*):[^@/?#\s]*@", re.I)
STARS = SafeExceptionReporterFilter.cleansed_substitute


def mask_url_passwords(text: str) -> str:
    """Return text with the password of every URL in it replaced by stars."""
    return _URL_PASSWORD.sub(rf"\g<head>:{STARS}@", text)


class SafeReporterFilter(SafeExceptionReporterFilter):
    """Django's filter, also hiding URL, DSN and broker settings and passwords in URLs."""

    hidden_settings = re.compile(
        "API|AUTH|TOKEN|KEY|SECRET|PASS|SIGNATURE|HTTP_COOKIE|URL|DSN|BROKER", flags=re.I
    )

    def cleanse_setting(self, key: Any, value: Any) -> Any:
        cleansed = super().cleanse_setting(key, value)
        return mask_url_passwords(cleansed) if isinstance(cleansed, str) else cleansed


class SafeReporter(ExceptionReporter):
    """Django's reporter, with every URL's password masked in the rendered report."""

    # Stars in place of a password add no markup: what was safe stays safe.
    def get_traceback_html(self) -> SafeString:
        return mark_safe(mask_url_passwords(super().get_traceback_html()))  # noqa: S308

    def get_traceback_text(self) -> SafeString:
        return mark_safe(mask_url_passwords(super().get_traceback_text()))  # noqa: S308
