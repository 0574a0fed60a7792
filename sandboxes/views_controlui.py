"""OpenClaw's own Control UI, passed through the portal under the user's Django login.

``/sandbox/control-ui/`` wakes the user's sandbox if needed and sends the browser to
``/sandbox/ui/#token=...``: the gateway token travels in the URL fragment (never in a request
line, a log or a Referer) and only to the sandbox's owner, so the UI connects and its browser
device is paired without anyone touching a CLI. ``/sandbox/ui/<path>`` is an HTTP proxy (httpx,
streaming) to the gateway's own HTTP server, and ``ws(s)://.../sandbox/ui`` is relayed by
:class:`sandboxes.consumers.controlui.ControlUIConsumer`.

Every request resolves the sandbox with :func:`sandboxes.access.aget_sandbox_for_user`: the URL
names no sandbox, so a user can only ever reach their own (another user's is a 404).

The gateway serves the UI at its root (OpenClaw's default, no ``controlUi.basePath``); the
proxy maps ``/sandbox/ui/X`` to ``/X`` and tells the UI its base path by rewriting the base-path
attribute and root-relative links of its HTML and the ``basePath`` of
``control-ui-config.json``. The gateway must list the portal's origin (``SITE_URL``) in
``gateway.controlUi.allowedOrigins`` (sandboxes.openclaw.setup does); the relay presents that
origin after checking the browser's own. Neither side forwards client addresses, so
``gateway.trustedProxies`` stays empty and the gateway treats the portal as a local client.

What crosses the proxy: a whitelist of request headers plus the gateway token as a Bearer
header (added here, never sent by the browser); the portal's cookies never reach the sandbox,
and the sandbox cannot set cookies on the portal's origin.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.contrib.auth.views import redirect_to_login
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    HttpResponseForbidden,
    StreamingHttpResponse,
)
from django.shortcuts import redirect
from django.views.decorators.csrf import csrf_exempt

from sandboxes import actions
from sandboxes.access import aget_sandbox_for_user, get_sandbox_for_user
from sandboxes.backends.base import BackendError
from sandboxes.models import Sandbox

BASE_PATH = "/sandbox/ui"
REQUEST_HEADERS = frozenset(
    {
        "accept",
        "accept-language",
        "cache-control",
        "content-type",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "range",
        "user-agent",
    }
)
DROPPED_RESPONSE_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "set-cookie",
        "content-length",
        "content-encoding",
    }
)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
REWRITE_LIMIT = 4 * 1024 * 1024
_ROOT_LINK = re.compile(rb'((?:href|src|action)=")/(?!/)')

_client: httpx.AsyncClient | None = None


def _http() -> httpx.AsyncClient:
    """One pooled client per process (the proxy's only outside system)."""
    global _client
    if _client is None:
        _client = httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None), follow_redirects=False)
    return _client


def portal_origin() -> str:
    """The portal's canonical origin, as the gateway's ``allowedOrigins`` lists it."""
    parts = urlsplit(settings.SITE_URL)
    return f"{parts.scheme}://{parts.netloc}"


def same_origin(request: HttpRequest) -> bool:
    """True if the request's Origin (or, lacking one, Referer) is this site."""
    source = request.headers.get("Origin") or request.headers.get("Referer") or ""
    if not source:
        return False
    parts = urlsplit(source)
    origin = f"{parts.scheme}://{parts.netloc}"
    return origin in settings.CSRF_TRUSTED_ORIGINS or parts.netloc == request.get_host()


@login_required
def open_control_ui(request: HttpRequest) -> HttpResponse:
    """Wake the user's sandbox if needed and hand the Control UI its token (owner only)."""
    sandbox = get_sandbox_for_user(request.user)
    try:
        for _ in actions.wake_sandbox(sandbox, actor_user=request.user):
            pass
    except BackendError as exc:
        return HttpResponse(
            f"Your agent could not start: {exc}",
            status=503,
            content_type="text/plain; charset=utf-8",
        )
    actions.record_activity(sandbox)
    response = redirect(f"{BASE_PATH}/#token={quote(sandbox.gateway_token, safe='')}")
    response["Cache-Control"] = "no-store"
    response["Referrer-Policy"] = "no-referrer"
    return response


@csrf_exempt  # the Control UI cannot know Django's CSRF token; unsafe methods need our Origin
async def proxy(request: HttpRequest, path: str) -> HttpResponseBase:
    """Forward one request to the user's own gateway and stream the answer back."""
    user = await request.auser()
    if not user.is_authenticated:
        return redirect_to_login(request.get_full_path())
    if request.method not in SAFE_METHODS and not same_origin(request):
        return HttpResponseForbidden("Cross-origin requests to the Control UI are refused.")
    sandbox = await aget_sandbox_for_user(user)  # Http404 for anyone without one
    if sandbox.state != Sandbox.State.RUNNING:
        return HttpResponse(
            "Your agent is not running. Open it again from the dashboard.",
            status=503,
            content_type="text/plain",
        )
    try:
        host, port = await sync_to_async(actions.gateway_endpoint)(sandbox)
    except BackendError:
        raise Http404("No running agent") from None
    await sync_to_async(actions.record_activity)(sandbox)
    upstream = _http().build_request(
        request.method or "GET",
        f"http://{host}:{port}/{path}",
        params=request.GET.urlencode() or None,
        headers=_request_headers(request, sandbox.gateway_token),
        content=request.body if request.method not in SAFE_METHODS else None,
    )
    try:
        response = await _http().send(upstream, stream=True)
    except httpx.HTTPError:
        return HttpResponse("Your agent did not answer.", status=502, content_type="text/plain")
    return await _relay(response, path)


def _request_headers(request: HttpRequest, token: str) -> dict[str, str]:
    headers = {k: v for k, v in request.headers.items() if k.lower() in REQUEST_HEADERS}
    headers["Authorization"] = f"Bearer {token}"
    headers["Accept-Encoding"] = "identity"  # so bodies can be rewritten and streamed as-is
    return headers


async def _relay(response: httpx.Response, path: str) -> HttpResponseBase:
    content_type = response.headers.get("content-type", "")
    out: HttpResponseBase
    if _rewritable(path, content_type):
        body = await response.aread()
        await response.aclose()
        out = HttpResponse(_rewrite(path, content_type, body), status=response.status_code)
    else:
        out = StreamingHttpResponse(_stream(response), status=response.status_code)
    for name, value in response.headers.multi_items():
        if name.lower() not in DROPPED_RESPONSE_HEADERS:
            out[name] = value
    if "location" in response.headers:
        out["Location"] = _rebase_location(response.headers["location"])
    out["Cache-Control"] = "private, no-cache"
    out["Vary"] = "Cookie"
    return out


async def _stream(response: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    finally:
        await response.aclose()


def _rewritable(path: str, content_type: str) -> bool:
    return content_type.startswith("text/html") or path.endswith("control-ui-config.json")


def _rewrite(path: str, content_type: str, body: bytes) -> bytes:
    """Tell the UI it lives under BASE_PATH (see the module docstring)."""
    if len(body) > REWRITE_LIMIT:
        return body
    if path.endswith("control-ui-config.json"):
        try:
            data: Any = json.loads(body)
        except ValueError:
            return body
        if isinstance(data, dict) and not data.get("basePath"):
            data["basePath"] = BASE_PATH
        return json.dumps(data).encode()
    body = body.replace(
        b'data-openclaw-control-ui-base-path=""',
        f'data-openclaw-control-ui-base-path="{BASE_PATH}"'.encode(),
    )
    return _ROOT_LINK.sub(rb"\1" + BASE_PATH.encode() + b"/", body)


def _rebase_location(location: str) -> str:
    return (
        BASE_PATH + location
        if location.startswith("/") and not location.startswith("//")
        else location
    )
