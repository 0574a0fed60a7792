"""The portal's Telegram egress relay, for agents' replies (served on the sandbox-facing
listener, ``ai_gateway.sandbox_urls``, at ``/telegram/bot<token>/<method>``).

A sandbox reaches one host port only, so its OpenClaw Telegram channel has this relay as its
``apiRoot`` (:mod:`doorbell.gateway_config`) whatever its plan: a plan without internet can
answer on Telegram, and every plan's bot traffic leaves through one place. The relay forwards
a call to HERMIT_TELEGRAM_API_ROOT as it came (method, body, content type) and returns
Telegram's answer as it came, only for a token that belongs to a linked bot (by its SHA-256:
no other token is relayed, so the portal is no open proxy). The webhook is the portal's:
``setWebhook`` and ``deleteWebhook`` are answered here without reaching Telegram, and
``getUpdates`` gets Telegram's own 409 answer for a bot with a webhook. Nothing here logs a URL
(it holds the token).
"""

from __future__ import annotations

import re

import httpx
from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from doorbell import telegram
from doorbell.models import TelegramLink, token_hash

TIMEOUT = 60.0  # sendDocument and friends upload files
METHOD_RE = re.compile(r"^[A-Za-z]{1,64}$")
ANSWERED_HERE = frozenset({"setWebhook", "deleteWebhook"})


def _error(code: int, description: str) -> JsonResponse:
    return JsonResponse({"ok": False, "error_code": code, "description": description}, status=code)


def _linked(token: str) -> bool:
    return TelegramLink.objects.filter(token_hash=token_hash(token)).exists()


@csrf_exempt
async def relay(request: HttpRequest, token: str, method: str) -> HttpResponse:
    if not METHOD_RE.match(method):
        return _error(404, "Not Found")
    if not telegram.valid_token(token) or not await sync_to_async(_linked, thread_sensitive=False)(
        token
    ):
        return _error(401, "Unauthorized")
    if method in ANSWERED_HERE:
        return JsonResponse({"ok": True, "result": True, "description": "Webhook is Hermit's"})
    if method == "getUpdates":
        return _error(409, "Conflict: can't use getUpdates method while webhook is active")
    headers = {}
    if request.content_type:
        headers["Content-Type"] = request.headers.get("Content-Type", request.content_type)
    try:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            upstream = await client.request(
                "POST" if request.method == "POST" else "GET",
                f"{telegram.api_root()}/bot{token}/{method}",
                content=request.body,
                headers=headers,
                params=request.GET,
            )
    except httpx.HTTPError:
        return _error(502, "Bad Gateway: Telegram could not be reached")
    return HttpResponse(
        upstream.content,
        status=upstream.status_code,
        content_type=upstream.headers.get("content-type", "application/json"),
    )
