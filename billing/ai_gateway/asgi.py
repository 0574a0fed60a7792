"""ASGI app for the sandbox-facing listener (settings.HERMIT_AI_GATEWAY_PORT).

Sandboxes can reach exactly one host port, and it must serve the AI gateway and nothing else
of the portal. This app resolves every request against ``billing.ai_gateway.sandbox_urls`` only
and runs no portal middleware (no sessions, no admin, no CSRF, no host check: callers are
sandboxes, authenticated per request by their gateway key). Run it as a second server:

    daphne -b 127.0.0.1 -p 8001 billing.ai_gateway.asgi:application
"""

from __future__ import annotations

import os
from typing import Any

import django
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

URLCONF = "billing.ai_gateway.sandbox_urls"


class GatewayASGIHandler(ASGIHandler):
    """Django's ASGI handler with the gateway URLconf and an empty middleware chain."""

    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware: list[Any] = []
        self._template_response_middleware: list[Any] = []
        self._exception_middleware: list[Any] = []
        handler = getattr(self, "_get_response_async" if is_async else "_get_response")
        self._middleware_chain = convert_exception_to_response(handler)

    def create_request(self, scope: Any, body_file: Any) -> Any:
        request, error = super().create_request(scope, body_file)
        if request is not None:
            request.urlconf = URLCONF
        return request, error


def get_application() -> GatewayASGIHandler:
    django.setup(set_prefix=False)
    return GatewayASGIHandler()


application = get_application()
