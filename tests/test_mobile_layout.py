"""In Chromium at a phone's size (390 x 844): no signed-in page is wider than the viewport (the
top bar wraps), and the usage charts scroll inside their own box at a size whose day labels can
be read; the delete buttons are red (class danger).
Screenshots: var/test-artifacts/mobile-dashboard.png and mobile-usage.png."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from playwright.sync_api import ViewportSize, sync_playwright

from sandboxes.backends.fake import FakeBackend
from tests.factories import PASSWORD
from tests.fixtures.chat import ARTIFACTS, CHROMIUM_ARGS
from tests.fixtures.live import Server
from tests.fixtures.metering import MONTH, seed_month

pytestmark = pytest.mark.django_db(transaction=True)
PHONE: ViewportSize = {"width": 390, "height": 844}
PAGES = ["/dashboard/", f"/usage/?month={MONTH}", "/usage/", "/pricing/", "/account/delete/",
         "/settings/keys/", "/accounts/2fa/", "/chat/"]  # fmt: skip
DANGER = {"/dashboard/": "#delete-account-link", "/account/delete/": "#delete-account-submit"}
BACKGROUND = "e => getComputedStyle(e).backgroundColor"
RED = "rgb(217, 45, 32)"
WIDTH = "[document.documentElement.scrollWidth, document.documentElement.clientWidth]"
# The chart's box, and the rendered height of a day label under the bars, in CSS pixels.
CHART = """() => {
  const box = document.querySelector('.chart'), label = box.querySelector('text.day');
  return [box.scrollWidth, box.clientWidth, label.getBoundingClientRect().height];
}"""


def test_it_fits_every_signed_in_page_in_a_phones_width(
    start_server: Callable[..., Server], fake_backend: FakeBackend, settings: Any
) -> None:
    seed_month(fake_backend, settings)  # bob's November, for charts with bars
    # Staff, for the longest top bar (with Admin).
    get_user_model().objects.filter(email="bob@example.com").update(is_staff=True)
    server = start_server("daphne", HERMIT_AUTO_PROVISION="False", REDIS_URL="")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shots = {"/dashboard/": "mobile-dashboard.png", f"/usage/?month={MONTH}": "mobile-usage.png"}
    widths = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=PHONE)
        page.set_default_timeout(10_000)
        page.goto(server.url + "/accounts/login/")
        page.fill("input[name=login]", "bob@example.com")
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url("**/dashboard/")
        for path in PAGES:
            page.goto(server.url + path)
            widths[path] = page.evaluate(WIDTH)
            nav = page.locator(".topbar nav")
            for link in ("Dashboard", "Usage", "Pricing", "Admin", "Log out"):
                box = nav.get_by_text(link, exact=True).bounding_box()
                assert box is not None and box["x"] + box["width"] <= PHONE["width"], (path, link)
            if path in DANGER:  # destructive buttons are red (hermit.css .danger)
                assert page.locator(DANGER[path]).evaluate(BACKGROUND) == RED, path
            if path in shots:
                page.screenshot(path=str(ARTIFACTS / shots[path]), full_page=True)
            if path.startswith("/usage/?"):
                scroll_width, client_width, label_height = page.evaluate(CHART)
                assert scroll_width > client_width  # the chart scrolls in its box
                assert label_height >= 10, label_height  # ~11 px text, not ~5 px
        browser.close()
    assert {path: w for path, w in widths.items() if w[0] > PHONE["width"]} == {}
    assert (ARTIFACTS / "mobile-dashboard.png").stat().st_size > 10_000
