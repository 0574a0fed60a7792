"""In headless Chromium: staff sign in through allauth with TOTP, open the fleet overview and a
sandbox's page, and approve a device waiting to pair with its real OpenClaw gateway.

Everything is real: daphne serving the portal, the session's pooled gateway in a real
bubblewrap sandbox, its device API. Screenshots land in var/test-artifacts/ (admin-fleet.png,
admin-sandbox.png, admin-device-approved.png).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from asgiref.sync import async_to_sync
from playwright.sync_api import sync_playwright

from sandboxes.models import Sandbox
from sandboxes.openclaw import devices
from sandboxes.openclaw.protocol import DeviceIdentity
from tests.factories import PASSWORD, make_user
from tests.fixtures.chat import ARTIFACTS, CHROMIUM_ARGS
from tests.fixtures.live import Server
from tests.mfa import enroll_totp, totp_now
from tests.test_admin_e2e import ask_to_pair

pytestmark = pytest.mark.django_db(transaction=True)
STAFF_EMAIL = "ops@admin.test"


def test_it_signs_staff_in_with_totp_and_approves_a_device(
    sandbox_for: Callable[..., Sandbox], start_server: Callable[..., Server], celery_queue: str
) -> None:
    sandbox = sandbox_for("alice@chat.test")
    staff = make_user(STAFF_EMAIL, is_staff=True, is_superuser=True)
    secret = enroll_totp(staff)
    phone = DeviceIdentity.generate()
    request_id = async_to_sync(ask_to_pair)(sandbox, phone)
    assert request_id
    # The page asks the worker on the sandbox's host for what runs inside and for its devices.
    env = {"HERMIT_AUTO_PROVISION": "False", "HERMIT_CELERY_QUEUE": celery_queue}
    server = start_server("daphne", **env)
    worker = start_server("celery", name="admin-worker", **env)
    try:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server.url + "/admin/")
            page.wait_for_url("**/accounts/login/**")
            page.fill("input[name=login]", STAFF_EMAIL)
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url("**/accounts/2fa/authenticate/**")
            page.fill("input[name=code]", totp_now(secret))
            page.click("button[type=submit]")
            page.wait_for_url(server.url + "/admin/")
            fleet = page.locator("#fleet")
            assert "RAM in use by awake sandboxes" in fleet.inner_text()
            assert page.locator("#fleet-chart").count() == 1
            running = page.locator("a.fleet-state[data-state=running]")
            assert running.inner_text().endswith("running")
            page.screenshot(path=str(ARTIFACTS / "admin-fleet.png"), full_page=True)

            running.click()  # the filtered list
            page.wait_for_url("**/admin/sandboxes/sandbox/?state=running")
            assert str(sandbox) in page.inner_text("#result_list")
            page.goto(f"{server.url}/admin/sandboxes/sandbox/{sandbox.pk}/change/")
            page.wait_for_selector("#sandbox-devices")
            assert "openclaw" in page.locator("#sandbox-processes").inner_text()
            page.screenshot(path=str(ARTIFACTS / "admin-sandbox.png"), full_page=True)

            page.click(f"button.device-approve[value='{request_id}']")
            page.wait_for_selector("ul.messagelist li.success")
            approved = f"Staff approved device {phone.device_id[:12]}"
            assert approved in page.inner_text("ul.messagelist")
            paired = page.locator(f"#devices-paired tr[data-device='{phone.device_id}']")
            assert paired.count() == 1 and "active" in paired.inner_text()
            page.locator("#sandbox-devices").scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "admin-device-approved.png"), full_page=True)
            browser.close()
    finally:
        # Left running, the worker would take the tasks of later tests (it shares their queue).
        worker.stop()
    event = sandbox.events.get(kind="device-approved")
    assert event.actor_user == staff
    assert phone.device_id in {d.device_id for d in devices.list_devices(sandbox).paired}
    for name in ("admin-fleet.png", "admin-sandbox.png", "admin-device-approved.png"):
        assert (ARTIFACTS / name).stat().st_size > 10_000
