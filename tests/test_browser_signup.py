"""In headless Chromium: sign up, verify the email, and reach the dashboard."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest
from playwright.sync_api import sync_playwright

from tests.factories import PASSWORD
from tests.fixtures.chat import ARTIFACTS, CHROMIUM_ARGS
from tests.fixtures.live import Server

pytestmark = pytest.mark.django_db(transaction=True)


def _confirmation_link(server: Server, email: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = server.output()
        if email in out:
            links = re.findall(r"(http://\S+/accounts/confirm-email/\S+/)", out)
            if links:
                return links[-1]
        time.sleep(0.2)
    raise AssertionError("no confirmation email was printed:\n" + server.output()[-3000:])


def test_it_signs_up_and_reaches_the_dashboard(start_server: Callable[..., Server]) -> None:
    server = start_server(
        "daphne", HERMIT_AUTO_PROVISION="False", REDIS_URL="", SITE_URL="http://127.0.0.1"
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(server.url + "/")
        page.click("text=Get started free")
        page.fill("input[name=email]", "newuser@example.com")
        page.fill("input[name=password1]", PASSWORD)
        page.fill("input[name=password2]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url("**/accounts/confirm-email/")
        assert "verify" in page.content().lower()

        link = _confirmation_link(server, "newuser@example.com")
        page.goto(
            link.replace("http://127.0.0.1/", server.url + "/").replace(
                "http://testserver/", server.url + "/"
            )
        )
        page.click("button[type=submit]")
        page.wait_for_url("**/dashboard/")
        assert page.locator("h1").inner_text() == "Your agent"
        assert page.locator("#plan-name").inner_text() == "Free"
        assert page.locator("#sandbox-state").inner_text() == "Provisioning"
        page.screenshot(path=str(ARTIFACTS / "signup-dashboard.png"), full_page=True)
        browser.close()
    assert (ARTIFACTS / "signup-dashboard.png").stat().st_size > 10_000
