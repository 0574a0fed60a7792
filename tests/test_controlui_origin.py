"""The Control UI's own origin: what crosses it and what may not, against a hostile gateway double.

The Control UI is HTML and JS that the sandbox controls, so these tests put a hostile stand-in
(tests.fakes.gateway_double) where the sandbox's gateway would be and check that its pages,
headers and scripts cannot reach the portal: no portal route on its origin and no Control UI
route on the portal's, no cookie either way, the containment headers, writes and WebSockets only
from its own origin (scheme, host and port), an owner-bound grant re-checked on every request,
and, in Chromium, a hostile page that gets nothing from the portal.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import time_machine
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.utils import timezone

from portal.asgi import application
from sandboxes import controlui_auth
from sandboxes.models import Sandbox
from sandboxes.origins import control_ui_origin, portal_origin
from tests.factories import PASSWORD, make_user
from tests.fakes.gateway_double import GatewayDouble
from tests.fixtures.chat import session_cookie
from tests.fixtures.controlui import UIClient, enter_ui, portal_client, ticket_for, ui_host

pytestmark = pytest.mark.django_db(transaction=True)

GATEWAY_TOKEN = "gw-token-of-the-double"


@pytest.fixture
def double() -> Iterator[GatewayDouble]:
    with GatewayDouble() as gw:
        yield gw


def point_at(user: Any, double: GatewayDouble) -> Sandbox:
    """Make ``user``'s sandbox a running one whose gateway is the double."""
    Sandbox.objects.filter(owner=user).update(
        state=Sandbox.State.RUNNING,
        backend="local",
        backend_state={"host_port": double.port},
        gateway_token=GATEWAY_TOKEN,
    )
    return Sandbox.objects.get(owner=user)


@pytest.fixture
def alice(double: GatewayDouble) -> Any:
    user = make_user("alice@ui.test")
    point_at(user, double)
    return user


def ui_client() -> UIClient:
    return UIClient()


async def entered(user: Any) -> UIClient:
    return await enter_ui(user)


async def test_it_serves_no_control_ui_on_the_portal_origin_and_no_portal_on_its_own(
    alice: Any, double: GatewayDouble
) -> None:
    portal = await portal_client(alice)
    for path in ("/sandbox/ui/", "/sandbox/ui/index.html", "/_hermit/enter"):
        assert (await portal.get(path)).status_code == 404, path
    assert double.requests == []

    # the Control UI origin has no admin, no login and no portal page: only the proxy, which
    # sends a browser without its own grant to the portal to get one
    anonymous = ui_client()
    for path in ("/admin/", "/accounts/login/", "/dashboard/"):
        response = await anonymous.get(path)
        assert response.status_code == 302, path
        assert response["Location"] == settings.SITE_URL + "/sandbox/control-ui/"
    assert double.requests == []

    cookie = await sync_to_async(session_cookie)(alice)
    comm = WebsocketCommunicator(
        application,
        "/",
        headers=[
            (b"origin", b"http://testserver"),
            (b"host", b"testserver"),
            (b"cookie", cookie.encode()),
        ],
    )
    await comm.send_input({"type": "websocket.connect"})
    with pytest.raises(ValueError, match="No route"):
        await comm.wait(timeout=5)  # the router raises at once (connect() would wait 5 s)


async def test_it_hands_the_owner_a_one_time_ticket_for_a_cookie_of_the_ui_origin(
    alice: Any,
) -> None:
    ticket = await ticket_for(alice)
    assert GATEWAY_TOKEN not in ticket  # the token never shows on the portal's page

    client = ui_client()
    for origin in (None, "http://evil.example", control_ui_origin(), "https://127.0.0.1:8000"):
        headers = {"origin": origin} if origin else {}
        response = await client.post("/_hermit/enter", {"ticket": ticket}, headers=headers)
        assert response.status_code == 403, origin
    response = await client.post(
        "/_hermit/enter", {"ticket": ticket}, headers={"origin": portal_origin()}
    )
    assert response.status_code == 303
    assert unquote(response["Location"].split("/#token=", 1)[1]) == GATEWAY_TOKEN
    morsel = response.cookies[controlui_auth.COOKIE_NAME]
    assert morsel["httponly"] and morsel["samesite"] == "Lax"
    assert morsel["max-age"] == controlui_auth.SESSION_AGE and morsel["path"] == "/"
    assert not morsel["domain"]  # host-only: the Control UI's host alone
    assert set(response.cookies) == {controlui_auth.COOKIE_NAME}

    again = await ui_client().post(
        "/_hermit/enter", {"ticket": ticket}, headers={"origin": portal_origin()}
    )
    assert again.status_code == 403  # single use

    with time_machine.travel(timezone.now() + timedelta(seconds=controlui_auth.TICKET_AGE + 1)):
        late = await ui_client().post(
            "/_hermit/enter",
            {"ticket": await ticket_for(alice)},
            headers={"origin": portal_origin()},
        )
    # minted and spent at the same travelled time: still valid; spent later: expired
    assert late.status_code == 303
    stale = await ticket_for(alice)
    with time_machine.travel(timezone.now() + timedelta(seconds=controlui_auth.TICKET_AGE + 1)):
        late = await ui_client().post(
            "/_hermit/enter", {"ticket": stale}, headers={"origin": portal_origin()}
        )
    assert late.status_code == 403


async def test_it_never_forwards_the_browsers_cookies_or_credentials(
    alice: Any, double: GatewayDouble
) -> None:
    client = await entered(alice)
    own = client.cookies[controlui_auth.COOKIE_NAME].value
    # a browser sends every cookie of the host: the portal's, when it shares the host name
    client.cookies["sessionid"] = "the-portal-session"
    client.cookies["csrftoken"] = "portal-csrf"
    response = await client.get("/index.html", headers={"authorization": "Basic x"})
    assert response.status_code == 200
    sent = double.last["headers"]
    assert "cookie" not in sent
    assert sent["authorization"] == f"Bearer {GATEWAY_TOKEN}"
    leaked = repr(double.requests)
    for secret in (own, "the-portal-session", "portal-csrf", "Basic x"):
        assert secret not in leaked


def test_each_layer_alone_keeps_the_browsers_cookies_from_the_sandbox() -> None:
    """The middleware drops foreign cookies, and the proxy forwards no Cookie header even if
    one got through: either alone keeps a portal cookie from reaching a sandbox."""
    from django.test import RequestFactory

    from portal.middleware import _enter
    from sandboxes.views_controlui import _request_headers

    request = RequestFactory().get(
        "/", headers={"host": ui_host(), "cookie": f"sessionid=s; {controlui_auth.COOKIE_NAME}=g"}
    )
    assert _enter(request)
    assert "HTTP_COOKIE" not in request.META and "cookie" not in request.headers
    assert request.COOKIES == {controlui_auth.COOKIE_NAME: "g"}

    request = RequestFactory().get(
        "/", headers={"cookie": "sessionid=s", "authorization": "Basic x", "accept": "*/*"}
    )
    assert _request_headers(request, "t") == {
        "accept": "*/*",
        "accept-encoding": "identity",
        "authorization": "Bearer t",
    }


async def test_it_keeps_no_sandbox_cookie_for_the_next_request(
    alice: Any, double: GatewayDouble
) -> None:
    """The proxy's pooled upstream client must not be a cookie jar shared by all sandboxes."""
    bob = await sync_to_async(make_user)("bob@ui.test")
    with GatewayDouble() as bobs:
        await sync_to_async(point_at)(bob, bobs)
        alices, bobs_client = await entered(alice), await entered(bob)
        for client in (alices, bobs_client, alices):
            assert (await client.get("/")).status_code == 200
        assert len(bobs.requests) == 1
        assert "cookie" not in bobs.last["headers"]
    assert len(double.requests) == 2
    assert all("cookie" not in r["headers"] for r in double.requests)


async def test_it_strips_the_sandboxes_cookies_and_breakout_headers(
    alice: Any, double: GatewayDouble
) -> None:
    client = await entered(alice)
    response = await client.get("/")
    assert response.status_code == 200
    assert b"hostile" in b"".join([c async for c in response.streaming_content])  # type: ignore[attr-defined]
    for name in (
        "Set-Cookie",
        "Service-Worker-Allowed",
        "Access-Control-Allow-Origin",
        "Access-Control-Allow-Credentials",
        "Clear-Site-Data",
        "Refresh",
    ):
        assert name not in response.headers, name
    assert not response.cookies
    assert response["X-Frame-Options"] == "DENY"
    assert response["Cross-Origin-Opener-Policy"] == "same-origin"
    assert response["Referrer-Policy"] == "no-referrer"
    assert response["X-Content-Type-Options"] == "nosniff"
    ours, theirs = response["Content-Security-Policy"].split(", ", 1)
    for directive in (
        "frame-ancestors 'none'",
        "form-action 'self'",
        "base-uri 'none'",
        "object-src 'none'",
        f"connect-src 'self' ws://{ui_host()}",
    ):
        assert directive in ours.split("; "), directive
    assert theirs == "default-src *"  # one more policy: it can only tighten ours


async def test_it_refuses_writes_and_sockets_not_from_its_own_origin(
    alice: Any, double: GatewayDouble
) -> None:
    client = await entered(alice)
    refused: tuple[dict[str, str], ...] = (
        {},  # neither Origin nor Referer
        {"origin": portal_origin()},
        {"origin": "https://" + ui_host()},  # same host and port, other scheme
        {"origin": "http://localhost:9999"},  # same host, other port
        {"referer": portal_origin() + "/dashboard/"},
    )
    for headers in refused:
        response = await client.post("/tools/invoke", {}, headers=headers)
        assert response.status_code == 403, headers
    assert double.requests == []
    for headers in ({"origin": control_ui_origin()}, {"referer": control_ui_origin() + "/chat"}):
        response = await client.post("/tools/invoke", {}, headers=headers)
        assert response.status_code == 200, headers
    assert [r["method"] for r in double.requests] == ["POST", "POST"]

    own = client.cookies[controlui_auth.COOKIE_NAME].value
    for origin, code in (
        (None, 4403),
        (portal_origin(), 4403),
        ("https://" + ui_host(), 4403),
        ("http://localhost:9999", 4403),
        (control_ui_origin(), 4503),  # admitted; the double speaks no WebSocket
    ):
        handshake = [
            (b"host", ui_host().encode()),
            (b"cookie", f"{controlui_auth.COOKIE_NAME}={own}".encode()),
        ]
        if origin:
            handshake.append((b"origin", origin.encode()))
        comm = WebsocketCommunicator(application, "/", headers=handshake)
        connected, got = await comm.connect(timeout=10)
        assert not connected and got == code, (origin, got)
    comm = WebsocketCommunicator(
        application,
        "/",
        headers=[(b"host", ui_host().encode()), (b"origin", control_ui_origin().encode())],
    )
    connected, got = await comm.connect(timeout=10)
    assert not connected and got == 4401  # no grant


async def test_the_portals_sockets_check_scheme_and_port_of_the_origin() -> None:
    """Only a same-host origin passes the allowed-hosts check in front: admit() must refuse
    another scheme or port itself (4403), before it looks at the login (4401)."""
    for origin, code in (
        ("https://testserver", 4403),
        ("http://testserver:9999", 4403),
        ("http://testserver", 4401),
    ):
        for path in ("/ws/sandbox/progress/", "/ws/chat/"):
            comm = WebsocketCommunicator(
                application, path, headers=[(b"origin", origin.encode()), (b"host", b"testserver")]
            )
            connected, got = await comm.connect(timeout=10)
            assert not connected and got == code, (origin, path, got)
    comm = WebsocketCommunicator(application, "/ws/chat/", headers=[(b"host", b"testserver")])
    connected, got = await comm.connect(timeout=10)
    assert not connected and got != 4401  # no Origin: refused before any login is looked at


async def test_it_answers_bad_paths_cleanly(alice: Any, double: GatewayDouble) -> None:
    client = await entered(alice)
    for path in ("/%00", "/a%0d%0aSet-Cookie:%20x=1", "/%7f"):
        response = await client.get(path)
        assert response.status_code == 400, path
    assert double.requests == []
    assert (await (await portal_client(alice)).get("/sandbox/ui/%00")).status_code == 404
    response = await client.get("/a%3Fb%23c/d e")
    assert response.status_code == 200
    assert double.last["path"] == "/a%3Fb%23c/d%20e"
    # the gateway's own 404 (e.g. no avatar yet) reaches the browser as a 404, not a 500
    response = await client.get("/missing/api/users/gateway-owner/avatar")
    assert response.status_code == 404
    assert double.last["path"] == "/missing/api/users/gateway-owner/avatar"


async def test_it_rechecks_the_owner_on_every_request(alice: Any, double: GatewayDouble) -> None:
    client = await entered(alice)
    assert (await client.get("/")).status_code == 200

    await sync_to_async(type(alice).objects.filter(pk=alice.pk).update)(is_active=False)
    assert (await client.get("/")).status_code == 302
    assert (await client.post("/x", {}, headers={"origin": control_ui_origin()})).status_code == 403
    await sync_to_async(type(alice).objects.filter(pk=alice.pk).update)(is_active=True)
    assert (await client.get("/")).status_code == 200

    # the sandbox changes hands: alice's grant does not follow it
    bob = await sync_to_async(make_user)("bob@ui.test")
    await sync_to_async(Sandbox.objects.filter(owner=bob).delete)()
    await sync_to_async(Sandbox.objects.filter(owner=alice).update)(owner=bob)
    assert (await client.get("/")).status_code == 302
    await sync_to_async(Sandbox.objects.filter(owner=bob).update)(owner=alice)
    assert (await client.get("/")).status_code == 200

    # a new password ends every grant made before it
    def change_password() -> None:
        alice.set_password("another horse battery staple")
        alice.save()

    await sync_to_async(change_password)()
    assert (await client.get("/")).status_code == 302
    client = await entered(alice)
    with time_machine.travel(timezone.now() + timedelta(seconds=controlui_auth.SESSION_AGE + 1)):
        assert (await client.get("/")).status_code == 302
    assert (await client.get("/")).status_code == 200
    served = len(double.requests)
    sandbox = await Sandbox.objects.aget(owner=alice)
    forged = ui_client()
    forged.cookies[controlui_auth.COOKIE_NAME] = controlui_auth.session_value(
        controlui_auth.Grant(alice.pk, sandbox.pk, "guessed")
    )
    assert (await forged.get("/")).status_code == 302
    assert len(double.requests) == served


def hostile_results(context: Any, portal: str, ui: str, email: str) -> dict[str, str]:
    """Sign in on the portal, open the Control UI, run the hostile page; return what it got."""
    page = context.new_page()
    page.goto(portal + "/accounts/login/")
    page.fill("input[name=login]", email)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/dashboard/")
    page.goto(portal + "/sandbox/control-ui/")
    try:
        page.wait_for_url(ui + "/#token=*")
    except Exception:
        raise AssertionError(page.url + page.content()[:3000]) from None
    page.goto(f"{ui}/hostile.html?portal={portal}")
    page.wait_for_selector("#result:not(:empty)", state="attached", timeout=20000)
    results: dict[str, str] = json.loads(page.inner_text("#result"))
    page.goto(portal + "/dashboard/")  # the portal session survived whatever the page tried
    assert page.url == portal + "/dashboard/", page.url
    return results


def test_a_hostile_ui_page_gets_nothing_from_the_portal_in_chromium(
    double: GatewayDouble, two_origin_portal: Callable[..., tuple[str, str]]
) -> None:
    from playwright.sync_api import sync_playwright

    from tests.fixtures.chat import CHROMIUM_ARGS

    point_at(make_user("mallory-victim@ui.test"), double)
    portal, ui = two_origin_portal()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            # As served: the CSP stops every reach out of the Control UI origin.
            got = hostile_results(browser.new_context(), portal, ui, "mallory-victim@ui.test")
            # Without the CSP, the origin wall alone still holds.
            bare = hostile_results(
                browser.new_context(bypass_csp=True), portal, ui, "mallory-victim@ui.test"
            )
        finally:
            browser.close()
    for results in (got, bare):
        assert results["cookie"] == "", results  # no portal cookie, no planted one, ours HttpOnly
        assert results["read_dashboard"].startswith("error:"), results
        assert results["mint_ticket"].startswith("error:"), results
        assert not results["chat_socket"].startswith("message:"), results
        assert results["service_worker"].startswith("error:"), results
    assert got["logout"].startswith("error:"), got
    assert bare["logout"] == "sent:opaque"  # it went out, and the session survived (above)
    assert bare["chat_socket"].startswith("closed:"), bare
    assert all("cookie" not in r["headers"] for r in double.requests), json.dumps(
        [r["headers"] for r in double.requests], indent=1
    )
    assert {r["headers"]["authorization"] for r in double.requests} == {f"Bearer {GATEWAY_TOKEN}"}


# -- the Control UI's host name, whatever the port ---------------------------------------------


async def test_it_serves_only_the_control_ui_on_every_port_of_its_host_name(
    alice: Any, double: GatewayDouble
) -> None:
    """Cookies ignore ports: the portal answering on the UI's host name (another port) would
    hand sandbox JS its session and CSRF cookies. Any port of that host gets the Control UI."""
    from portal.asgi import ByHost

    other_port = UIClient(host=f"{urlsplit(settings.HERMIT_CONTROL_UI_URL).hostname}:8000")
    for path in ("/accounts/login/", "/admin/login/", "/dashboard/"):
        response = await other_port.get(path)
        assert response.status_code == 302, path
        assert response["Location"] == settings.SITE_URL + "/sandbox/control-ui/"
        assert not response.cookies  # no csrftoken or session from the portal
    assert double.requests == []

    reached: list[str] = []

    def app(name: str) -> Any:
        async def called(scope: Any, receive: Any, send: Any) -> None:
            reached.append(name)

        return called

    router = ByHost(control_ui=app("ui"), portal=app("portal"))
    name = urlsplit(settings.HERMIT_CONTROL_UI_URL).hostname or ""
    for host in (ui_host(), f"{name}:8000", f"{name.upper()}.:1", "testserver"):
        await router({"type": "websocket", "headers": [(b"host", host.encode())]}, None, None)
    assert reached == ["ui", "ui", "ui", "portal"]


@pytest.mark.parametrize(
    ("env", "refused"),
    [
        (
            {"SITE_URL": "http://127.0.0.1:8000", "HERMIT_CONTROL_UI_URL": "http://127.0.0.1:8002"},
            True,
        ),
        (
            {"SITE_URL": "http://localhost:8000", "HERMIT_CONTROL_UI_URL": "http://LOCALHOST:8002"},
            True,
        ),
        (
            {"SITE_URL": "http://127.0.0.1:8000", "HERMIT_CONTROL_UI_URL": "http://localhost:8002"},
            False,
        ),
    ],
)
def test_settings_refuse_a_control_ui_on_the_portals_host_name(
    env: dict[str, str], refused: bool
) -> None:
    result = load_settings(DEBUG="True", **env)
    assert (result.returncode != 0) == refused, result.stderr[-2000:]
    if refused:
        assert "HERMIT_CONTROL_UI_URL must be on another host name than SITE_URL" in result.stderr


PRODUCTION = {
    "DEBUG": "False",
    "SECRET_KEY": "k" * 50,
    "ALLOWED_HOSTS": "portal.example.com",
    "SITE_URL": "https://portal.example.com",
    "HERMIT_CONTROL_UI_URL": "https://ui.example.net",
}


def test_production_uses_host_prefixed_secure_cookies_and_warns_of_a_shared_site() -> None:
    result = load_settings(**PRODUCTION)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "session": ["__Host-sessionid", True, "/", None],
        "csrf": ["__Host-csrftoken", True, "/", None],
        "ui": "__Host-hermit_controlui",
    }
    assert "same site" not in result.stderr

    shared = load_settings(**{**PRODUCTION, "HERMIT_CONTROL_UI_URL": "https://ui.example.com"})
    assert shared.returncode == 0, shared.stderr[-2000:]
    assert "looks like the same site as SITE_URL" in shared.stderr


def load_settings(**env: str) -> Any:
    """Load portal.settings (and the Control UI's cookie name) in a fresh interpreter."""
    import os
    import subprocess
    import sys

    from cryptography.fernet import Fernet

    script = (
        "import json, django; django.setup(); from django.conf import settings as s;"
        "from sandboxes.controlui_auth import COOKIE_NAME;"
        "print(json.dumps({'session': [s.SESSION_COOKIE_NAME, s.SESSION_COOKIE_SECURE,"
        " s.SESSION_COOKIE_PATH, s.SESSION_COOKIE_DOMAIN], 'csrf': [s.CSRF_COOKIE_NAME,"
        " s.CSRF_COOKIE_SECURE, s.CSRF_COOKIE_PATH, s.CSRF_COOKIE_DOMAIN], 'ui': COOKIE_NAME}))"
    )
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("DEBUG", "SITE_URL"))}
    keep.update(env, DJANGO_SETTINGS_MODULE="portal.settings")
    keep.setdefault("HERMIT_ENCRYPTION_KEYS", Fernet.generate_key().decode())
    return subprocess.run(
        [sys.executable, "-c", script], env=keep, capture_output=True, text=True, timeout=60
    )


async def test_the_portals_renamed_cookies_still_log_in_and_stay_off_the_ui(
    alice: Any, double: GatewayDouble
) -> None:
    """With production's ``__Host-`` names the portal's sockets still find the session, and the
    Control UI origin still drops the portal's cookies."""
    from django.test import override_settings

    with override_settings(
        SESSION_COOKIE_NAME="__Host-sessionid", CSRF_COOKIE_NAME="__Host-csrftoken"
    ):
        cookie = await sync_to_async(session_cookie)(alice)
        assert cookie.startswith("__Host-sessionid=")
        comm = WebsocketCommunicator(
            application,
            "/ws/sandbox/progress/",
            headers=[
                (b"origin", b"http://testserver"),
                (b"host", b"testserver"),
                (b"cookie", cookie.encode()),
            ],
        )
        connected, _ = await comm.connect(timeout=10)
        assert connected  # logged in through the renamed session cookie
        await comm.disconnect()

        client = await entered(alice)
        client.cookies["__Host-sessionid"] = "the-portal-session"
        client.cookies["__Host-csrftoken"] = "portal-csrf"
        assert (await client.get("/")).status_code == 200
        assert "cookie" not in double.last["headers"]
        assert "the-portal-session" not in repr(double.requests)


# -- only the Control UI's own requests reach the gateway --------------------------------------

NAVIGATE = {"sec-fetch-mode": "navigate", "sec-fetch-dest": "document"}


async def test_it_lets_other_sites_only_navigate_to_the_entry_page(
    alice: Any, double: GatewayDouble
) -> None:
    """Each proxied request carries the gateway's token, and a top-level navigation from another
    site carries the Lax cookie: other sites may open ``/`` and nothing else."""
    client = await entered(alice)
    cases: list[tuple[str, dict[str, str], int]] = [
        ("/", {"sec-fetch-site": "cross-site", **NAVIGATE}, 200),  # the entry redirect
        ("/", {"sec-fetch-site": "same-site", **NAVIGATE}, 200),
        ("/", {"sec-fetch-site": "none", **NAVIGATE}, 200),  # typed, bookmarked
        ("/index.html", {"sec-fetch-site": "same-origin"}, 200),
        ("/api/sessions/delete", {"sec-fetch-site": "cross-site", **NAVIGATE}, 403),
        ("/?action=reset", {"sec-fetch-site": "cross-site", **NAVIGATE}, 403),
        (
            "/",
            {
                "sec-fetch-site": "cross-site",
                "sec-fetch-mode": "no-cors",
                "sec-fetch-dest": "image",
            },
            403,
        ),
        (
            "/",
            {
                "sec-fetch-site": "cross-site",
                "sec-fetch-mode": "navigate",
                "sec-fetch-dest": "iframe",
            },
            403,
        ),
        ("/api/x", {"sec-fetch-site": "same-site", "sec-fetch-mode": "cors"}, 403),
    ]
    for path, headers, code in cases:
        before = len(double.requests)
        response = await client.get(path, headers=headers)
        assert response.status_code == code, (path, headers)
        assert len(double.requests) == before + (code == 200), (path, headers)

    # without Fetch Metadata (old browsers, scripts) nothing is proxied, cookie or not
    bare = UIClient(fetch_metadata=False)
    bare.cookies = client.cookies
    for method in (bare.get, bare.head):
        assert (await method("/")).status_code == 403
    assert (await UIClient(fetch_metadata=False).get("/")).status_code == 403
    assert all(r["path"] in ("/", "/index.html") for r in double.requests)


# -- one-time tickets, whatever the cache ----------------------------------------------------


async def test_a_ticket_is_spent_once_even_if_the_cache_forgets_or_races(alice: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from django.core.cache import cache
    from django.db import connection

    ticket = await ticket_for(alice)
    assert await sync_to_async(controlui_auth.redeem_ticket)(ticket) is not None
    await sync_to_async(cache.clear)()  # an evicted, restarted or per-process cache
    assert await sync_to_async(controlui_auth.redeem_ticket)(ticket) is None

    racing = await ticket_for(alice)

    def redeem(_: int) -> bool:
        try:
            return controlui_auth.redeem_ticket(racing) is not None
        finally:
            connection.close()

    def race() -> list[bool]:
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(redeem, range(8)))

    assert sorted(await sync_to_async(race)()) == [False] * 7 + [True]
