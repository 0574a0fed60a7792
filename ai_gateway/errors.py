"""Gateway errors in each provider's own format, so clients (OpenClaw) show them as they are.

OpenAI: ``{"error": {"message", "type", "param", "code"}}``.
Anthropic: ``{"type": "error", "error": {"type", "message"}}``.
"""

from __future__ import annotations

import enum
import math

from django.http import JsonResponse

from ai_gateway.models import Api


class Kind(enum.Enum):
    """(status, OpenAI type, OpenAI code, Anthropic type)"""

    BAD_REQUEST = (400, "invalid_request_error", None, "invalid_request_error")
    AUTH = (401, "invalid_request_error", "invalid_api_key", "authentication_error")
    FORBIDDEN = (403, "invalid_request_error", "account_deactivated", "permission_error")
    NOT_FOUND = (404, "invalid_request_error", "model_not_found", "not_found_error")
    QUOTA = (429, "insufficient_quota", "insufficient_quota", "rate_limit_error")
    RATE_LIMIT = (429, "requests", "rate_limit_exceeded", "rate_limit_error")
    UPSTREAM = (502, "server_error", "upstream_error", "api_error")
    TIMEOUT = (504, "server_error", "upstream_timeout", "api_error")

    @property
    def status(self) -> int:
        return int(self.value[0])


def error_response(
    api: str, kind: Kind, message: str, retry_after: float | None = None
) -> JsonResponse:
    """Return a JSON error response for ``api`` (an ``Api`` value)."""
    status, openai_type, openai_code, anthropic_type = kind.value
    if api == Api.ANTHROPIC:
        body: dict[str, object] = {
            "type": "error",
            "error": {"type": anthropic_type, "message": message},
        }
    else:
        body = {
            "error": {"message": message, "type": openai_type, "param": None, "code": openai_code}
        }
    response = JsonResponse(body, status=status)
    if retry_after is not None:
        response["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return response
