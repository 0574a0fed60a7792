"""The Control UI origin's wall, as the first middleware of every request.

A request whose ``Host`` names the Control UI's host (``HERMIT_CONTROL_UI_URL``), on any port
(browsers share a host's cookies across its ports), is served by ``portal.urls_controlui`` only:
none of the portal's pages, admin or APIs exist there, and the Control UI's routes exist nowhere
else. Such a request keeps only the Control UI's own cookie (a browser may send the portal's
cookies to another port of the same host: nothing below ever sees them), and its response
carries the Control UI's Content-Security-Policy and the other containment headers, and sets no
cookie but the Control UI's own. Other requests pass untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from asgiref.sync import iscoroutinefunction
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.utils.decorators import sync_and_async_middleware

from sandboxes.controlui_auth import COOKIE_NAME
from sandboxes.origins import is_control_ui_host
from sandboxes.views_controlui import SECURITY_HEADERS, content_security_policy

CONTROL_UI_URLCONF = "portal.urls_controlui"


def _enter(request: HttpRequest) -> bool:
    """Route a Control UI request to its own URLs and drop foreign cookies. True if it is one."""
    if not is_control_ui_host(request.META.get("HTTP_HOST", "")):
        return False
    request.urlconf = CONTROL_UI_URLCONF
    own = request.COOKIES.get(COOKIE_NAME)
    request.COOKIES = {COOKIE_NAME: own} if own is not None else {}
    request.META.pop("HTTP_COOKIE", None)
    return True


def _leave(response: HttpResponseBase) -> HttpResponseBase:
    """Add the containment headers; keep no cookie but the Control UI's own."""
    for name in list(response.cookies):
        if name != COOKIE_NAME:
            del response.cookies[name]
    upstream = response.headers.get("Content-Security-Policy")
    ours = content_security_policy()
    # A comma joins policies; each is enforced, so the gateway's own can only tighten ours.
    response.headers["Content-Security-Policy"] = f"{ours}, {upstream}" if upstream else ours
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    return response


@sync_and_async_middleware
def control_ui_origin(
    get_response: Callable[[HttpRequest], HttpResponseBase]
    | Callable[[HttpRequest], Awaitable[HttpResponseBase]],
) -> (
    Callable[[HttpRequest], HttpResponseBase] | Callable[[HttpRequest], Awaitable[HttpResponseBase]]
):
    if iscoroutinefunction(get_response):

        async def amiddleware(request: HttpRequest) -> HttpResponseBase:
            ui = _enter(request)
            response = await get_response(request)
            return _leave(response) if ui else response

        return amiddleware

    def middleware(request: HttpRequest) -> HttpResponseBase:
        ui = _enter(request)
        response = get_response(request)
        assert isinstance(response, HttpResponseBase)
        return _leave(response) if ui else response

    return middleware
