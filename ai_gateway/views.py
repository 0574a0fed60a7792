"""The gateway's HTTP endpoints (async views; served under /ai/v1/).

- ``POST chat/completions``: OpenAI Chat Completions, streaming or not.
- ``POST messages``: Anthropic Messages, streaming or not.
- ``GET models``: the models the gateway routes, in OpenAI's list format (Anthropic's when the
  request carries ``anthropic-version``).
Every endpoint needs the sandbox's gateway key (``Authorization: Bearer`` or ``x-api-key``).
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponseBase, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from ai_gateway import db, proxy
from ai_gateway.errors import error_response
from ai_gateway.models import Api
from ai_gateway.upstreams import listed_models

MODEL_CREATED = 1_735_689_600  # 2025-01-01: a stable "created" for listed models


@csrf_exempt
@require_POST
async def chat_completions(request: HttpRequest) -> HttpResponseBase:
    return await proxy.forward(request, Api.OPENAI)


@csrf_exempt
@require_POST
async def messages(request: HttpRequest) -> HttpResponseBase:
    return await proxy.forward(request, Api.ANTHROPIC)


def _models_for(key: str | None) -> list[str]:
    proxy.authorized_owner(key)
    return listed_models()


@require_GET
async def models(request: HttpRequest) -> HttpResponseBase:
    api = Api.ANTHROPIC if "anthropic-version" in request.headers else Api.OPENAI
    try:
        names = await db.run(_models_for, proxy.presented_key(request))
    except proxy.Refused as refusal:
        return error_response(api, refusal.kind, refusal.message)
    data: list[dict[str, Any]]
    if api == Api.ANTHROPIC:
        data = [
            {"type": "model", "id": n, "display_name": n, "created_at": "2025-01-01T00:00:00Z"}
            for n in names
        ]
        first, last = (names[0], names[-1]) if names else (None, None)
        return JsonResponse({"data": data, "has_more": False, "first_id": first, "last_id": last})
    data = [
        {"id": n, "object": "model", "created": MODEL_CREATED, "owned_by": "hermit"} for n in names
    ]
    return JsonResponse({"object": "list", "data": data})
