"""In headless Chromium: sign up, wait for the sandbox, chat with a streamed reply, reload.

Everything is real: daphne serving the portal, a Celery worker provisioning the sandbox, a real
OpenClaw gateway in a real bubblewrap sandbox, the AI gateway, and the fake model behind it.
Screenshots land in var/test-artifacts/.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from playwright.sync_api import Page, sync_playwright

from sandboxes import actions
from sandboxes.models import Sandbox
from tests.factories import PASSWORD
from tests.fakes.model_server import FakeModelServer
from tests.fixtures.chat import ARTIFACTS, CHROMIUM_ARGS
from tests.fixtures.live import Server

pytestmark = pytest.mark.django_db(transaction=True)

EMAIL = f"browser-{os.getpid()}@chat.test"  # allauth rate-limits mail per address
REPLY = "Hello from your own agent, streamed word by word."


def confirmation_link(server: Server, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        links = re.findall(r"(http://\S+/accounts/confirm-email/\S+/)", server.output())
        if links:
            return re.sub(r"^http://[^/]+/", server.url + "/", links[-1])
        time.sleep(0.2)
    raise AssertionError("no confirmation email was printed:\n" + server.output()[-3000:])


def sign_up(page: Page, server: Server) -> None:
    page.goto(server.url + "/accounts/signup/")
    page.fill("input[name=email]", EMAIL)
    page.fill("input[name=password1]", PASSWORD)
    page.fill("input[name=password2]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/accounts/confirm-email/")
    page.goto(confirmation_link(server))
    page.click("button[type=submit]")
    page.wait_for_url("**/dashboard/")


def wait_ready(page: Page, timeout_s: float) -> None:
    page.wait_for_selector("#chat[data-status=ready]", timeout=timeout_s * 1000)


def test_it_signs_up_chats_and_keeps_the_conversation_across_a_reload(
    sandbox_pool: Any,
    start_server: Callable[..., Server],
    celery_queue: str,
    model_server: FakeModelServer,
) -> None:
    sandbox_pool.restore_shared()  # plans, the built runtime and the model routes
    env = {
        "HERMIT_AUTO_PROVISION": "True",
        "HERMIT_CELERY_QUEUE": celery_queue,
        "HERMIT_AI_GATEWAY_PORT": str(sandbox_pool.ai_gateway.port),
    }
    server = start_server("daphne", **env)
    worker = start_server("celery", name="chat-worker", **env)
    model_server.script(reply=REPLY, chunks=8, delay=0.25)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            sign_up(page, server)
            page.goto(server.url + "/chat/")
            wait_ready(page, 150)  # the first start of a new sandbox (provisioned by the worker)
            page.screenshot(path=str(ARTIFACTS / "chat-ready.png"))

            page.fill("#chat-input", "Hello, agent!")
            page.press("#chat-input", "Enter")
            assistant = page.locator(".msg.assistant").last
            seen: list[str] = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if assistant.count():
                    text = assistant.locator(".text").inner_text()
                    if text and (not seen or seen[-1] != text):
                        seen.append(text)
                        if len(seen) == 2:
                            page.screenshot(path=str(ARTIFACTS / "chat-streaming.png"))
                    done = "streaming" not in (assistant.get_attribute("class") or "")
                    if done and REPLY in text:
                        break
                time.sleep(0.05)
            assert REPLY in seen[-1], seen
            partial = [t for t in seen if t and REPLY not in t]
            assert len(partial) >= 2, f"the reply did not stream: {seen}"
            assert all(REPLY.startswith(t.strip()) for t in partial), seen
            page.screenshot(path=str(ARTIFACTS / "chat-replied.png"))

            page.reload()
            wait_ready(page, 60)
            page.wait_for_selector(f".msg.assistant:has-text('{REPLY}')", timeout=20_000)
            texts = page.locator(".msg .text").all_inner_texts()
            assert texts[-2:] == ["Hello, agent!", REPLY], texts
            page.screenshot(path=str(ARTIFACTS / "chat-reloaded.png"))
            browser.close()
    except Exception:
        print(worker.output()[-3000:])
        raise
    finally:
        # Left running, the worker would take the tasks of later tests (it shares their queue),
        # starting with the backup this stop queues.
        worker.stop()
        for sandbox in Sandbox.objects.filter(owner__email=EMAIL):
            if sandbox.backend_state:
                actions.stop_sandbox(sandbox)
        server.stop()
    for name in ("chat-ready", "chat-streaming", "chat-replied", "chat-reloaded"):
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 5_000
