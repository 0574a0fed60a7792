"""In Chromium against a real portal (daphne): a user's usage page and staff's cost table for a
seeded month (tests/fixtures/metering.py), screenshots saved to var/test-artifacts/ (usage.png,
staff-costs.png). Staff sign in through allauth with their TOTP code, as the admin requires."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from playwright.sync_api import Page, sync_playwright

from sandboxes.backends.fake import FakeBackend
from tests.factories import PASSWORD, make_user
from tests.fixtures.chat import ARTIFACTS, CHROMIUM_ARGS
from tests.fixtures.live import Server
from tests.fixtures.metering import (
    EXPECTED_ROWS,
    MONTH,
    PER_ALWAYS_ON_USER,
    PER_FREE_USER,
    seed_month,
)
from tests.mfa import enroll_totp, totp_now

pytestmark = pytest.mark.django_db(transaction=True)


def log_in(page: Page, server: Server, email: str, totp_secret: str = "") -> None:
    page.goto(server.url + "/accounts/login/")
    page.fill("input[name=login]", email)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    if totp_secret:
        page.wait_for_url("**/accounts/2fa/authenticate/")
        page.fill("input[name=code]", totp_now(totp_secret))
        page.click("button[type=submit]")
    page.wait_for_url("**/dashboard/")


def test_it_shows_a_seeded_month_to_the_user_and_to_staff(
    start_server: Callable[..., Server], fake_backend: FakeBackend, settings: Any
) -> None:
    seed_month(fake_backend, settings)
    staff = make_user("costs@example.com", is_staff=True, is_superuser=True)
    secret = enroll_totp(staff)
    server = start_server("daphne", HERMIT_AUTO_PROVISION="False", REDIS_URL="")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    usage_png, costs_png = ARTIFACTS / "usage.png", ARTIFACTS / "staff-costs.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        log_in(page, server, "bob@example.com")
        page.click("#usage-link")
        page.wait_for_url("**/usage/")
        page.goto(f"{server.url}/usage/?month={MONTH}")
        assert page.locator("h1").inner_text() == "Usage in November 2026"
        assert page.locator("#usage-tokens").inner_text() == "80,000"
        assert page.locator("#usage-cost").inner_text() == "$0.2592"
        assert page.locator("#usage-awake").inner_text() == "240.0"
        assert page.locator("#cost-compute").inner_text() == "$0.1442"
        assert page.locator("svg rect").count() == 90
        page.screenshot(path=str(usage_png), full_page=True)

        page = browser.new_page(viewport={"width": 1400, "height": 800})
        log_in(page, server, "costs@example.com", totp_secret=secret)
        page.goto(f"{server.url}/admin/")
        page.click("text=Usage and cost")
        page.goto(f"{server.url}/admin/metering/dailyusage/?month={MONTH}&o=-margin")
        cells = page.locator("#cost-table tbody tr").evaluate_all(
            "rows => rows.map(r => [...r.cells].map(c => c.innerText.split('\\n')[0]))"
        )
        by_margin = [EXPECTED_ROWS[i] for i in (0, 2, 3, 1)]
        assert cells == [row[:6] + row[7:] for row in by_margin]
        assert page.locator("#fleet-always-on").inner_text() == f"${PER_ALWAYS_ON_USER}"
        assert page.locator("#fleet-sleeping").inner_text() == f"${PER_FREE_USER}"
        page.screenshot(path=str(costs_png), full_page=True)
        browser.close()
    assert usage_png.stat().st_size > 20_000
    assert costs_png.stat().st_size > 20_000
