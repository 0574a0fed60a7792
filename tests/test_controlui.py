"""The Control UI passthrough (HTTP proxy + WebSocket relay, on the Control UI's own origin)
against a real sandboxed gateway."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import AsyncClient

from portal.asgi import application
from sandboxes import controlui_auth
from sandboxes.models import Sandbox
from sandboxes.openclaw.protocol import ClientInfo, DeviceIdentity, build_connect_params
from sandboxes.origins import control_ui_origin, portal_origin
from tests.factories import make_user
from tests.fixtures.controlui import UIClient, enter_ui, portal_client, ticket_for, ui_host


@pytest.fixture
def alice_sandbox(sandbox_for: Callable[..., Sandbox]) -> Sandbox:
    return sandbox_for("alice@chat.test")


async def open_ui_socket(
    client: UIClient | None, origin: str | None = None
) -> WebsocketCommunicator:
    """A Control UI WebSocket, with the Control UI cookie of ``client`` if given."""
    headers = [
        (b"origin", (origin or control_ui_origin()).encode()),
        (b"host", ui_host().encode()),
    ]
    if client is not None:
        value = client.cookies[controlui_auth.COOKIE_NAME].value
        headers.append((b"cookie", f"{controlui_auth.COOKIE_NAME}={value}".encode()))
    return WebsocketCommunicator(application, "/", headers=headers)


async def body_of(response: Any) -> bytes:
    if getattr(response, "streaming", False):
        return b"".join([chunk async for chunk in response.streaming_content])
    return bytes(response.content)


async def test_it_hands_the_owner_the_ui_with_its_token(alice_sandbox: Sandbox) -> None:
    ticket = await ticket_for(alice_sandbox.owner)
    assert alice_sandbox.gateway_token not in ticket
    response = await UIClient().post(
        "/_hermit/enter", {"ticket": ticket}, headers={"origin": portal_origin()}
    )
    assert response.status_code == 303
    location = response["Location"]
    assert location.startswith("/#token=")
    assert unquote(location.split("#token=", 1)[1]) == alice_sandbox.gateway_token
    assert response["Cache-Control"] == "no-store"


async def test_it_proxies_the_ui_on_its_own_origin(alice_sandbox: Sandbox) -> None:
    client = await enter_ui(alice_sandbox.owner)
    page = await client.get("/")
    assert page.status_code == 200
    html = (await body_of(page)).decode()
    assert "<title>OpenClaw Control</title>" in html
    assert not page.has_header("Set-Cookie")
    assert "frame-ancestors 'none'" in page["Content-Security-Policy"]

    script = re.search(r'src="/(assets/[^"?]+\.js)', html)
    assert script, html[:2000]
    asset = await client.get("/" + script.group(1), headers={"accept-encoding": "identity"})
    assert asset.status_code == 200
    assert "javascript" in asset["Content-Type"]
    assert b"import" in await body_of(asset)

    # the gateway only serves its UI config to authenticated callers: the proxy adds the token
    config = await client.get("/control-ui-config.json", headers={"accept-encoding": "identity"})
    assert config.status_code == 200
    assert isinstance(json.loads(await body_of(config)), dict)


async def test_it_relays_the_ui_websocket_and_pairs_the_browser_device(
    alice_sandbox: Sandbox,
) -> None:
    comm = await open_ui_socket(await enter_ui(alice_sandbox.owner))
    connected, code = await comm.connect(timeout=15)
    assert connected, code
    try:
        challenge = json.loads(await comm.receive_from(timeout=10))
        assert challenge["event"] == "connect.challenge"
        browser = DeviceIdentity.generate()
        params = build_connect_params(
            token=alice_sandbox.gateway_token,
            identity=browser,
            nonce=challenge["payload"]["nonce"],
            info=ClientInfo(
                client_id="openclaw-control-ui",
                mode="webchat",
                scopes=("operator.read", "operator.write", "operator.admin"),
            ),
        )
        await comm.send_to(
            text_data=json.dumps({"type": "req", "id": "c1", "method": "connect", "params": params})
        )
        while True:
            frame = json.loads(await comm.receive_from(timeout=15))
            if frame.get("type") == "res" and frame.get("id") == "c1":
                break
        assert frame["ok"], frame
        assert frame["payload"]["type"] == "hello-ok"
        assert frame["payload"]["auth"]["deviceToken"]  # paired, no CLI involved

        await comm.send_to(
            text_data=json.dumps(
                {
                    "type": "req",
                    "id": "h1",
                    "method": "chat.history",
                    "params": {"sessionKey": "main", "limit": 5},
                }
            )
        )
        while True:
            frame = json.loads(await comm.receive_from(timeout=15))
            if frame.get("type") == "res" and frame.get("id") == "h1":
                break
        assert frame["ok"] and "messages" in frame["payload"]
    finally:
        await comm.disconnect()


async def test_it_refuses_cross_origin_writes_and_anonymous_users(
    alice_sandbox: Sandbox,
) -> None:
    client = await enter_ui(alice_sandbox.owner)
    response = await client.post(
        "/tools/invoke", data={}, headers={"Origin": "http://evil.example"}
    )
    assert response.status_code == 403

    response = await AsyncClient().get("/sandbox/control-ui/")
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]
    response = await UIClient().get("/")
    assert response.status_code == 302
    assert response["Location"] == settings.SITE_URL + "/sandbox/control-ui/"
    comm = await open_ui_socket(None)
    connected, code = await comm.connect(timeout=10)
    assert not connected and code == 4401
    comm = await open_ui_socket(client, origin="http://evil.example")
    connected, code = await comm.connect(timeout=10)
    assert not connected and code == 4403


async def test_bob_cannot_reach_alices_ui(alice_sandbox: Sandbox) -> None:
    bob = await sync_to_async(make_user)("bob@chat.test")
    await sync_to_async(Sandbox.objects.filter(owner=bob).delete)()
    assert (await (await portal_client(bob)).get("/sandbox/control-ui/")).status_code == 404
    for url in ("/", "/control-ui-config.json"):
        assert (await UIClient().get(url)).status_code == 302, url

    # with a sandbox of his own that is not running, bob still never sees alice's
    stopped = await sync_to_async(Sandbox.objects.create)(owner=bob, state="stopped")
    client = await enter_ui(bob, await sync_to_async(controlui_auth.mint_ticket)(bob, stopped))
    page = await client.get("/")
    assert page.status_code == 503
    assert alice_sandbox.gateway_token not in (await body_of(page)).decode()
    comm = await open_ui_socket(client)
    connected, code = await comm.connect(timeout=10)
    assert not connected and code == 4503


@pytest.mark.django_db(transaction=True)
def test_it_opens_the_control_ui_in_a_browser(
    sandbox_for: Callable[..., Sandbox],
    two_origin_portal: Callable[..., tuple[str, str]],
) -> None:
    from playwright.sync_api import sync_playwright

    from tests.factories import PASSWORD
    from tests.fixtures.chat import ARTIFACTS, CHROMIUM_ARGS

    sandbox = sandbox_for("alice@chat.test")
    # SITE_URL stays the origin the sandbox's gateway allows: the relay presents it
    portal, ui = two_origin_portal(
        SITE_URL=settings.SITE_URL, CSRF_TRUSTED_ORIGINS=settings.SITE_URL
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        frames: list[str] = []
        page.on("websocket", lambda ws: ws.on("framereceived", lambda f: frames.append(str(f))))
        page.goto(portal + "/accounts/login/")
        page.fill("input[name=login]", sandbox.owner.email)
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url("**/dashboard/")
        page.goto(portal + "/sandbox/control-ui/")
        deadline = time.monotonic() + 45
        while not any('"hello-ok"' in f for f in frames) and time.monotonic() < deadline:
            page.wait_for_timeout(250)
        assert any('"hello-ok"' in f for f in frames), frames[:3]
        assert '"deviceToken"' in next(f for f in frames if '"hello-ok"' in f)  # paired
        assert page.url.startswith(ui + "/"), page.url  # its own origin, not the portal's
        assert sandbox.gateway_token not in page.url  # the UI drops the fragment once read
        assert page.evaluate("document.cookie") == ""  # no portal cookie; its own is HttpOnly
        # Rendered, not its loading skeleton (which a busy machine shows for seconds): wait
        # until the page draws more than the skeleton's few flat shapes, whatever the session.
        deadline = time.monotonic() + 60
        while len(shot := page.screenshot()) <= 10_000 and time.monotonic() < deadline:
            page.wait_for_timeout(1000)
        (ARTIFACTS / "control-ui.png").write_bytes(shot)
        browser.close()
    assert (ARTIFACTS / "control-ui.png").stat().st_size > 10_000
