"""In headless Chromium: sign up, open the pricing page, upgrade through the fake Stripe
Checkout, and come back to a dashboard that says "Pro, always on".

The portal is a real daphne server; Stripe is the local fake (tests/fakes/stripe_api.py), which
the server's stripe SDK talks to and which posts its signed webhooks to the server."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from playwright.sync_api import sync_playwright

from billing.models import Account, PlanChange
from tests.factories import PASSWORD
from tests.fakes.stripe_api import FakeStripe
from tests.fixtures.chat import ARTIFACTS, CHROMIUM_ARGS
from tests.fixtures.live import Server
from tests.fixtures.stripe import WEBHOOK_PATH, sell_plan
from tests.test_browser_signup import _confirmation_link

pytestmark = pytest.mark.django_db(transaction=True)


def test_it_upgrades_to_pro_through_checkout(
    start_server: Callable[..., Server], stripe_api: FakeStripe, stripe_env: dict[str, str]
) -> None:
    sell_plan(stripe_api, "pro")
    server = start_server(
        "daphne",
        HERMIT_AUTO_PROVISION="False",
        REDIS_URL="",
        SITE_URL="http://127.0.0.1",
        **stripe_env,
    )
    stripe_api.webhook_url = server.url + WEBHOOK_PATH
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    email = "upgrader@example.com"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(server.url + "/")
        page.click("text=Get started free")
        page.fill("input[name=email]", email)
        page.fill("input[name=password1]", PASSWORD)
        page.fill("input[name=password2]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url("**/accounts/confirm-email/")
        link = _confirmation_link(server, email)
        page.goto(link.replace("http://127.0.0.1/", server.url + "/"))
        page.click("button[type=submit]")
        page.wait_for_url("**/dashboard/")
        assert page.locator("#plan-summary").inner_text() == "Free, sleeps when idle"

        page.click("#upgrade-link")
        page.wait_for_url("**/pricing/")
        assert page.locator("#plan-free .plan-policy").inner_text() == (
            "Sleeps when idle, wakes in about a second"
        )
        assert page.locator("#plan-pro .plan-policy").inner_text() == "Always on"
        assert page.locator("#plan-pro .plan-price").inner_text() == "$12 / month"
        page.screenshot(path=str(ARTIFACTS / "pricing.png"), full_page=True)

        page.click("#plan-pro button.upgrade")
        page.wait_for_url(f"{stripe_api.url}/c/pay/*")
        assert page.locator("#amount").inner_text() == "$12.00 per month"
        page.click("#pay")
        page.wait_for_url("**/dashboard/?checkout=success")
        assert page.locator("#plan-summary").inner_text() == "Pro, always on"
        assert page.locator("#plan-name").inner_text() == "Pro"
        assert page.locator("#manage-billing").is_visible()
        page.screenshot(path=str(ARTIFACTS / "upgraded-dashboard.png"), full_page=True)
        browser.close()

    assert [status for _, status in stripe_api.delivered] == [200, 200, 200, 200]
    account = Account.objects.get(user__email=email)
    assert account.plan.slug == "pro" and account.subscription_status == "active"
    assert PlanChange.objects.filter(account=account, source="stripe").count() == 1
    assert (ARTIFACTS / "pricing.png").stat().st_size > 20_000
    assert (ARTIFACTS / "upgraded-dashboard.png").stat().st_size > 20_000
