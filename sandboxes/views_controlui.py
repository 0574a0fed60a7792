"""OpenClaw's own Control UI, served from its own origin, never the portal's.

The Control UI is HTML and JS that the sandbox controls, so it must not run where the portal's
cookies, pages and admin live. It is served on ``HERMIT_CONTROL_UI_URL`` (another host, or in
the embedded default another host name and port, ``http://localhost:8002``), which
:mod:`portal.middleware` gives only the Control UI's URLs (``portal.urls_controlui``), only its
own cookie, and the containment headers below; the portal's origin has no Control UI route.

1. ``/sandbox/control-ui/`` (portal origin, Django login): has the privileged worker on the
   sandbox's host wake the user's sandbox (sandboxes.tasks_host.wake; this process is
   unprivileged and never calls the backend), waits for it, and answers a page that POSTs a
   one-time ticket (:mod:`sandboxes.controlui_auth`) to the Control UI origin. The ticket
   travels in a POST body, not a URL (logs, Referer).
2. ``/_hermit/enter`` (Control UI origin): takes a ticket only from a POST whose Origin is the
   portal's, so no other site can log a browser into someone else's Control UI. It sets the
   Control UI cookie and sends the browser to ``/#token=...``: the gateway token travels in the
   URL fragment (never in a request line, a log or a Referer) and only to the sandbox's owner,
   so the UI connects and its browser device is paired without anyone touching a CLI.
3. Every other path (Control UI origin) is an HTTP proxy (httpx, streaming) to the gateway's
   own HTTP server, at the same path (the gateway serves its UI at its root). A dozing agent
   is thawed by the worker first (sandboxes.tasks_host.thaw).
   :class:`sandboxes.consumers.controlui.ControlUIConsumer` relays the WebSocket.

Only requests the Control UI makes itself reach the gateway (the proxy adds the gateway's
token to each, and a top-level navigation from another site carries the Lax cookie): a browser's
``Sec-Fetch-Site`` must be ``same-origin`` or ``none`` (typed, bookmarked, reloaded), except for
a top-level navigation (``Sec-Fetch-Mode: navigate``, ``Sec-Fetch-Dest: document``) to exactly
``/`` with no query, the entry page, which is how step 2's redirect arrives (its chain began on
the portal, so Chromium sends ``cross-site``). Everything else, and a request without
``Sec-Fetch-Site`` (browsers from before 2023, non-browsers), is refused with 403: every current
browser sends it to an https or localhost origin, which the Control UI's must be.

Each request re-checks its cookie's grant (:func:`controlui_auth.sandbox_for_session`: active
owner, same password, the sandbox the one door gives them). Writes (any method but GET, HEAD,
OPTIONS) need the Control UI's own Origin (or Referer); none at all is refused.

What crosses the proxy. Up: a whitelist of request headers plus the gateway token as a Bearer
header (added here, never sent by the browser); no Cookie, no Authorization from the browser,
and the upstream client keeps no cookie jar. Down: a whitelist of response headers (no
Set-Cookie, Service-Worker-Allowed, Access-Control-*, X-Frame-Options, ...); the gateway's
own Content-Security-Policy passes, as it can only tighten ours. Requests that would register
a service worker are refused, so a sandbox cannot leave code running on the shared Control UI
origin. The middleware adds :func:`content_security_policy` and :data:`SECURITY_HEADERS` to
every response of the Control UI origin.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from http.cookiejar import CookieJar, DefaultCookiePolicy
from urllib.parse import quote

import httpx
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseBadRequest,
    HttpResponseBase,
    HttpResponseForbidden,
    HttpResponseRedirect,
    StreamingHttpResponse,
)
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from sandboxes import actions, controlui_auth, hostlink, tasks_host
from sandboxes.access import get_sandbox_for_user
from sandboxes.backends.base import BackendError
from sandboxes.models import Sandbox
from sandboxes.origins import control_ui_origin, origin_of, portal_origins

ENTER_PATH = "_hermit/enter"
WAKE_TIMEOUT = 180.0  # how long opening the UI waits for the worker to wake the agent
THAW_TIMEOUT = 10.0  # how long a request waits for the worker to thaw a doze
REQUEST_HEADERS = frozenset(
    {
        "accept",
        "accept-encoding",
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
RESPONSE_HEADERS = frozenset(
    {
        "accept-ranges",
        "content-disposition",
        "content-encoding",
        "content-language",
        "content-range",
        "content-security-policy",
        "content-type",
        "etag",
        "last-modified",
        "location",
    }
)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_PATH_SAFE = "/!$&'()*+,;=:@-._~"


def content_security_policy() -> str:
    """Our policy for every Control UI response: it may not be framed, reach other origins,
    post forms elsewhere, change its base URL or load plugins. Scripts from its own origin and
    inline ones may run (the sandbox serves the origin's scripts anyway; the gateway's own
    hash-based policy, passed through, restricts inline ones for the genuine UI)."""
    ui = control_ui_origin()
    ws = "ws" + ui.removeprefix("http")
    return "; ".join(
        [
            "default-src 'self'",
            "script-src 'self' 'unsafe-inline' 'wasm-unsafe-eval'",
            "style-src 'self' 'unsafe-inline'",
            "img-src 'self' data: blob:",
            "media-src 'self' data: blob:",
            "font-src 'self' data:",
            f"connect-src 'self' {ws}",
            "worker-src 'self'",
            "frame-src 'self'",
            "frame-ancestors 'none'",
            "form-action 'self'",
            "base-uri 'none'",
            "object-src 'none'",
        ]
    )


SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}

_client: httpx.AsyncClient | None = None


def _http() -> httpx.AsyncClient:
    """One pooled client per process (the proxy's only outside system). Its cookie jar accepts
    nothing: a jar would keep every sandbox's cookies and send them on to every other sandbox."""
    global _client
    if _client is None:
        _client = httpx.AsyncClient(
            timeout=httpx.Timeout(30.0, read=None),
            follow_redirects=False,
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
        )
    return _client


def _plain(text: str, status: int) -> HttpResponse:
    return HttpResponse(text, status=status, content_type="text/plain; charset=utf-8")


# -- portal origin ---------------------------------------------------------------------------


@login_required
def open_control_ui(request: HttpRequest) -> HttpResponse:
    """Wake the user's sandbox if needed and hand its owner a ticket to the Control UI origin."""
    sandbox = get_sandbox_for_user(request.user)
    if sandbox.state != Sandbox.State.RUNNING:
        token = tasks_host.new_token()
        tasks_host.wake.delay(sandbox.pk, request.user.pk, token)
        reply = tasks_host.wait_reply(token, WAKE_TIMEOUT, poll=0.2)
        if reply is None:
            return _plain("Your agent's host did not answer in time. Try again shortly.", 503)
        if not reply.get("ok"):
            return _plain(str(reply.get("message")), 503)
    actions.record_activity(sandbox)
    response = render(
        request,
        "sandboxes/controlui_open.html",
        {
            "enter_url": f"{control_ui_origin()}/{ENTER_PATH}",
            "ticket": controlui_auth.mint_ticket(request.user, sandbox),
        },
    )
    response["Cache-Control"] = "no-store"
    # "origin", not "no-referrer": with the latter, browsers send the POST's Origin as "null"
    response["Referrer-Policy"] = "origin"
    return response


# -- Control UI origin -----------------------------------------------------------------------


@csrf_exempt  # a cross-origin POST by design: the portal's Origin and the ticket are the proof
@require_POST
def enter(request: HttpRequest) -> HttpResponse:
    """Exchange a ticket from the portal for the Control UI cookie, then open the UI."""
    if origin_of(request.headers.get("Origin", "")) not in portal_origins():
        return _plain("Open the Control UI from your dashboard.", 403)
    grant = controlui_auth.redeem_ticket(request.POST.get("ticket", ""))
    sandbox = controlui_auth.sandbox_for_grant(grant)
    if grant is None or sandbox is None:
        return _plain("This link has expired. Open the Control UI again from your dashboard.", 403)
    response = HttpResponseRedirect(f"/#token={quote(sandbox.gateway_token, safe='')}")
    response.status_code = 303
    response["Cache-Control"] = "no-store"
    response.set_cookie(
        controlui_auth.COOKIE_NAME,
        controlui_auth.session_value(grant),
        max_age=controlui_auth.SESSION_AGE,
        path="/",
        secure=control_ui_origin().startswith("https:"),
        httponly=True,
        samesite="Lax",
    )
    return response


def same_origin(request: HttpRequest) -> bool:
    """True if the request's Origin (or, lacking one, Referer) is the Control UI's own."""
    source = request.headers.get("Origin") or request.headers.get("Referer") or ""
    return bool(source) and origin_of(source) == control_ui_origin()


def upstream_path(path: str) -> str | None:
    """The path to ask the gateway for, quoted; None if it holds control characters."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return None
    return "/" + quote(path, safe=_PATH_SAFE)


def from_the_ui(request: HttpRequest, path: str) -> bool:
    """True if the browser says the Control UI itself (or its user, directly) made the request,
    or it is a top-level navigation to the entry page ``/`` (see the module docstring)."""
    site = request.headers.get("Sec-Fetch-Site")
    if site in ("same-origin", "none"):
        return True
    return (
        site is not None
        and path == ""
        and not request.META.get("QUERY_STRING")
        and request.method in ("GET", "HEAD")
        and request.headers.get("Sec-Fetch-Mode") == "navigate"
        and request.headers.get("Sec-Fetch-Dest") == "document"
    )


@csrf_exempt  # the Control UI cannot know Django's CSRF token; writes need our own Origin
async def proxy(request: HttpRequest, path: str) -> HttpResponseBase:
    """Forward one request to the granted sandbox's gateway and stream the answer back."""
    if not from_the_ui(request, path):
        return HttpResponseForbidden("Open the Control UI from your dashboard.")
    if request.method not in SAFE_METHODS and not same_origin(request):
        return HttpResponseForbidden("Cross-origin requests to the Control UI are refused.")
    if request.headers.get("Service-Worker"):
        return HttpResponseForbidden("Service workers are not allowed on the Control UI origin.")
    target = upstream_path(path)
    if target is None:
        return HttpResponseBadRequest("Bad path.")
    value = request.COOKIES.get(controlui_auth.COOKIE_NAME)
    sandbox = await controlui_auth.asandbox_for_session(value)
    if sandbox is None:
        if request.method in ("GET", "HEAD"):
            return HttpResponseRedirect(
                settings.SITE_URL + reverse("controlui-open", urlconf=settings.ROOT_URLCONF)
            )
        return HttpResponseForbidden("Open the Control UI from your dashboard.")
    if sandbox.state == Sandbox.State.DOZING:  # paused in place: thawing takes milliseconds
        token = tasks_host.new_token()
        await sync_to_async(tasks_host.thaw.delay, thread_sensitive=False)(
            sandbox.pk, request.user.pk, token
        )
        await tasks_host.await_reply(token, THAW_TIMEOUT, poll=0.02)
        await sync_to_async(sandbox.refresh_from_db)()
    if sandbox.state != Sandbox.State.RUNNING:
        return _plain("Your agent is not running. Open it again from the dashboard.", 503)
    query = request.GET.urlencode()
    try:
        if await sync_to_async(hostlink.is_remote)(sandbox):  # through its host's edge
            url = await sync_to_async(hostlink.gateway_url)(
                sandbox, target, scheme="http", query=query
            )
            query = ""  # already in the signed URL
        else:
            host, port = await sync_to_async(actions.gateway_endpoint)(sandbox)
            url = f"http://{host}:{port}{target}"
    except BackendError:
        raise Http404("No running agent") from None
    except ValueError:
        return HttpResponseBadRequest("Bad path.")
    await sync_to_async(actions.record_activity)(sandbox)
    try:
        upstream = _http().build_request(
            request.method or "GET",
            url,
            params=query or None,
            headers=_request_headers(request, sandbox.gateway_token),
            content=request.body if request.method not in SAFE_METHODS else None,
        )
        response = await _http().send(upstream, stream=True)
    except httpx.InvalidURL:
        return HttpResponseBadRequest("Bad path.")
    except httpx.HTTPError:
        return _plain("Your agent did not answer.", 502)
    return _relay(response)


def _request_headers(request: HttpRequest, token: str) -> dict[str, str]:
    headers = {k.lower(): v for k, v in request.headers.items() if k.lower() in REQUEST_HEADERS}
    headers.setdefault("accept-encoding", "identity")  # none would mean "any" to the gateway
    headers["authorization"] = f"Bearer {token}"
    return headers


def _relay(response: httpx.Response) -> StreamingHttpResponse:
    out = StreamingHttpResponse(_stream(response), status=response.status_code)
    for name, value in response.headers.multi_items():
        if name.lower() in RESPONSE_HEADERS:
            out.headers[name] = value
    out["Cache-Control"] = "private, no-cache"
    return out


async def _stream(response: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    finally:
        await response.aclose()
