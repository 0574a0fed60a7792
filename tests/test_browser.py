"""The agent's browser: a headless Chromium that OpenClaw launches inside the agent's own sandbox.

Real parts throughout: a real OpenClaw gateway in bubblewrap (started through the actions, on
the pro plan, which has the browser and the internet), Debian's Chromium, the AI gateway, and the
fake model provider, which drives the agent with tool calls in OpenAI's own wire format. The
page is served from a network namespace the test makes (``tests.netns``, a second machine on
10.213.<n>.2), which an internet-enabled sandbox reaches through pasta as it would a web site.
The gateway and the namespace are shared by the module's tests (a gateway costs ~10 s and 1 GB).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from billing.models import Account, Plan, ensure_standard_plans
from sandboxes import actions, sleep
from sandboxes.backends import get_backend
from sandboxes.backends.base import ExecResult
from sandboxes.backends.local import _host_addresses
from sandboxes.consumers.chat import device_identity_for
from sandboxes.limits import limits_for
from sandboxes.models import Sandbox
from sandboxes.openclaw import config
from sandboxes.openclaw.protocol import GatewayClient
from tests.factories import make_user
from tests.fakes.model_server import FakeModelServer, Script, ToolCall
from tests.fixtures.backend import volume_of
from tests.netns import HostNamespace

pytestmark = pytest.mark.django_db(transaction=True)

BROWSING = "dora@browser.test"  # pro: internet and browser
OTHER = "alice@chat.test"  # free, the chat tests' pooled sandbox: another user, no browser
TRIGGER = "Open the page"
NO_BROWSER = "I have no browser tool."


def host_ips() -> list[str]:
    """This machine's loopback and interface addresses (without their prefix lengths)."""
    return ["127.0.0.1", *(cidr.split("/")[0] for cidr in _host_addresses())]


def http_host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


class PageSite:
    """A web site on another machine: ``python -m http.server`` in a network namespace,
    serving ``root``; its request log (stderr) tells which paths were fetched."""

    def __init__(self, ns: HostNamespace, root: Path, log: Path) -> None:
        self.ns, self.root, self.log = ns, root, log
        self.port = 8080

    @property
    def origin(self) -> str:
        return f"http://{self.ns.address}:{self.port}"

    def page(self, name: str, html: str) -> str:
        (self.root / name).write_text(html)
        return f"{self.origin}/{name}"

    def fetched(self, path: str) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if f"GET {path}" in line]


@pytest.fixture(scope="module")
def site() -> Iterator[PageSite]:
    """The page server, and ``HERMIT_BROWSER_ALLOWED_HOSTS`` naming it (a private address,
    which OpenClaw's own navigation check refuses unless told) while the module runs."""
    root = Path(tempfile.mkdtemp(prefix="hermit-browser-site-"))
    saved = settings.HERMIT_BROWSER_ALLOWED_HOSTS
    with HostNamespace(forward=()) as ns:
        served = PageSite(ns, root, root / "requests.log")
        argv = [sys.executable, "-m", "http.server", str(served.port), "--bind", ns.address]
        proc = ns.popen([*argv, "--directory", str(root)], log=served.log)
        deadline = time.monotonic() + 20
        while ns.run(["ss", "-ltn"]).stdout.find(f"{ns.address}:{served.port}") < 0:
            assert proc.poll() is None and time.monotonic() < deadline, "page server failed"
            time.sleep(0.1)
        settings.HERMIT_BROWSER_ALLOWED_HOSTS = [ns.address]
        try:
            yield served
        finally:
            settings.HERMIT_BROWSER_ALLOWED_HOSTS = saved
            shutil.rmtree(root, ignore_errors=True)


class DualStackServer(ThreadingHTTPServer):
    """Listens on every IPv4 and IPv6 address of this machine."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class HostService:
    """A stand-in for the host's own services (the portal, Redis): an HTTP server on every
    address of this machine, which counts who reached it."""

    def __init__(self) -> None:
        hits: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(b"<title>host secret</title>host secret")

            def log_message(self, *args: Any) -> None:
                pass

        self.hits = hits
        self.server = DualStackServer(("::", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def urls(self) -> list[str]:
        return [f"http://{http_host(ip)}:{self.port}/" for ip in host_ips()]


@pytest.fixture(scope="module")
def host_service() -> Iterator[HostService]:
    service = HostService()
    yield service
    service.server.shutdown()
    service.server.server_close()


def tool_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content or "")


def browser_call(body: Any, arguments: dict[str, Any]) -> ToolCall | None:
    """The call a model makes to use the browser tool, as the request offers it: directly (its
    schema is among ``tools``), or through Tool Search's ``tool_call`` when the system prompt's
    tool directory lists it (OpenClaw's default: schemas are deferred). None: no browser tool."""
    names = [t.get("function", {}).get("name") for t in body.get("tools") or []]
    if "browser" in names:
        return ToolCall("browser", arguments)
    system = [m for m in body.get("messages") or [] if m.get("role") in ("system", "developer")]
    if "tool_call" in names and "- browser (browser):" in json.dumps(system):
        return ToolCall("tool_call", {"id": "browser", "args": arguments})
    return None


def browse_and_report(url: str, pattern: str) -> Callable[[Any], Script | None]:
    """The fake model's part: asked to open the page, it calls the browser tool (``open`` with
    the URL); once a tool result shows what matches ``pattern`` it replies with that. ``open``
    returns as soon as the tab exists (its title may still be empty), so when the first result
    lacks it, the model asks for the tabs (``tabs``, with their titles) once. Other calls
    (OpenClaw's own background ones) get the default script."""

    def respond(body: Any) -> Script | None:
        messages = body.get("messages") or []
        asked = [i for i, m in enumerate(messages) if TRIGGER in json.dumps(m.get("content"))]
        if not asked:
            return None
        results = [m for m in messages[asked[-1] :] if m.get("role") == "tool"]
        if results:
            text = tool_text(results[-1])
            found = re.search(pattern, text)
            if found:
                return Script(reply=found.group(0))
            if len(results) > 1:
                return Script(reply=f"no match in: {text[:3000]}")
        action = {"action": "tabs"} if results else {"action": "open", "url": url}
        call = browser_call(body, action)
        if call is None:
            return Script(reply=NO_BROWSER)
        return Script(tool_calls=(call,), chunks=4)

    return respond


async def chat_once(url: str, token: str, identity: Any, message: str) -> str:
    """Send one chat message to a gateway; return the final reply's text."""
    async with GatewayClient(url, token=token, identity=identity, connect_timeout=60) as client:
        sent = await client.chat_send(message)
        async for event in client.events():
            payload = event.payload
            if event.event != "chat" or payload.get("runId") != sent.get("runId"):
                continue
            if payload.get("state") == "final":
                content = (payload.get("message") or {}).get("content") or [{}]
                return str(content[0].get("text", ""))
            if payload.get("state") in ("error", "aborted"):
                raise AssertionError(f"chat ended {payload.get('state')}: {payload}")
    raise AssertionError("the event stream ended before the reply")


def chat(sandbox: Sandbox, message: str, timeout: float = 180) -> str:
    host, port = actions.gateway_endpoint(sandbox)
    identity = device_identity_for(sandbox)
    sent = chat_once(f"ws://{host}:{port}", sandbox.gateway_token, identity, message)
    try:
        return asyncio.run(asyncio.wait_for(sent, timeout))
    except (TimeoutError, AssertionError) as exc:
        backend = get_backend(sandbox.backend)
        log = backend.logs(actions.spec_for(sandbox), sandbox.backend_state, lines=80)
        raise AssertionError(f"no reply ({exc!r}); the gateway's log ends:\n{log}") from exc


def run_in(sandbox: Sandbox, argv: list[str], timeout: float = 60) -> ExecResult:
    """Run ``argv`` inside the sandbox, as its user (what the agent's shell tool can do)."""
    backend = get_backend(sandbox.backend)
    return backend.exec(actions.spec_for(sandbox), sandbox.backend_state, argv, timeout=timeout)


def cdp_answer(sandbox: Sandbox, address: str, port: int) -> str:
    """What ``http://address:port/json/version`` (Chromium's DevTools endpoint) answers from
    inside the sandbox: the JSON, or the error's name."""
    script = (
        "import sys, urllib.request\n"
        "try:\n"
        f"    print(urllib.request.urlopen('http://{address}:{port}/json/version', timeout=3)"
        ".read().decode())\n"
        "except Exception as e:\n"
        "    print('ERR', type(e).__name__, getattr(e, 'reason', e))\n"
    )
    return run_in(sandbox, ["python3", "-c", script]).stdout.strip()


def chromium_processes(sandbox: Sandbox) -> list[str]:
    backend = get_backend(sandbox.backend)
    processes = backend.processes(actions.spec_for(sandbox), sandbox.backend_state)
    exe = settings.HERMIT_BROWSER_EXECUTABLE
    return [p.command for p in processes if p.command.split(" ", 1)[0] == exe]


# -- tests -----------------------------------------------------------------------------------


def test_it_opens_a_page_and_returns_its_title(
    site: PageSite, sandbox_for: Callable[..., Sandbox], model_server: FakeModelServer
) -> None:
    sandbox = sandbox_for(BROWSING, plan="pro")
    assert chromium_processes(sandbox) == [], "the browser starts on first use, not with the agent"
    title = f"Hermit page {secrets.token_hex(6)}"
    url = site.page("title.html", f"<!doctype html><title>{title}</title><p>Hello, agent.</p>")
    model_server.respond_with(browse_and_report(url, r"Hermit page [0-9a-f]{12}"))

    reply = chat(sandbox, f"{TRIGGER} {url} and tell me its title")

    assert reply.strip() == title
    assert site.fetched("/title.html"), "the page was fetched from the site"
    calls = [
        c
        for r in model_server.requests
        for m in r.json.get("messages", [])
        for c in m.get("tool_calls") or []
    ]
    assert any("browser" in json.dumps(c) for c in calls), "the model's call went back"
    main = [c for c in chromium_processes(sandbox) if "--type=" not in c]
    assert len(main) == 1, main
    assert "--no-sandbox" in main[0] and "--headless" in main[0]
    assert f"--remote-debugging-port={config.BROWSER_CDP_PORT}" in main[0]
    profile = config.state_dir(volume_of(sandbox)) / "browser" / config.BROWSER_PROFILE
    assert f"--user-data-dir={profile}/user-data" in main[0], main
    assert (profile / "user-data" / "Default").is_dir(), "its profile is in the data dir"


def test_its_browser_is_reachable_from_its_own_sandbox_only(
    site: PageSite, sandbox_for: Callable[..., Sandbox], model_server: FakeModelServer
) -> None:
    mine = sandbox_for(BROWSING, plan="pro")
    if not chromium_processes(mine):  # run alone: start it through the agent first
        url = site.page("start.html", "<title>Hermit page 000000000000</title>")
        model_server.respond_with(browse_and_report(url, r"Hermit page [0-9a-f]{12}"))
        chat(mine, f"{TRIGGER} {url}")
    port = config.BROWSER_CDP_PORT
    inside = cdp_answer(mine, "127.0.0.1", port)
    assert '"Browser"' in inside and "Chrome" in inside, inside

    other = sandbox_for(OTHER)
    assert other.owner_id != mine.owner_id
    addresses = host_ips()
    answers = [cdp_answer(other, http_host(address), port) for address in addresses]
    assert all(a.startswith("ERR") for a in answers), list(zip(addresses, answers, strict=True))
    for address in addresses:  # nor from the host: the port is on the sandbox's own loopback
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=2).close()


def test_a_page_cannot_reach_the_hosts_services(
    site: PageSite,
    host_service: HostService,
    sandbox_for: Callable[..., Sandbox],
    model_server: FakeModelServer,
) -> None:
    sandbox = sandbox_for(BROWSING, plan="pro")
    targets = host_service.urls()
    # The agent opens a page whose images point at every address of the host.
    title = f"Hermit page {secrets.token_hex(6)}"
    images = "".join(f'<img src="{u}probe.png">' for u in targets)
    url = site.page("probe.html", f"<!doctype html><title>{title}</title>{images}")
    model_server.respond_with(browse_and_report(url, r"Hermit page [0-9a-f]{12}"))
    assert chat(sandbox, f"{TRIGGER} {url}").strip() == title
    assert site.fetched("/probe.html")

    # The sandbox's Chromium navigates straight to each host address (a top-level load, which
    # no page-level policy stops) and to the site (the control, which loads): the host's
    # service answers none of them.
    profile = "/tmp/probe-profile"
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}"]
    flags += ["--timeout=8000", "--dump-dom"]
    exe = settings.HERMIT_BROWSER_EXECUTABLE
    control = run_in(sandbox, [exe, *flags, url], timeout=90)
    assert f"<title>{title}</title>" in control.stdout, control.stderr[-2000:]
    for target in targets:
        direct = run_in(sandbox, [exe, *flags, target], timeout=90)
        assert "host secret" not in direct.stdout, target
    assert host_service.hits == [], "a host service was reached"
    with urllib.request.urlopen(targets[0], timeout=5) as answer:  # it does answer the host
        assert b"host secret" in answer.read()
    assert host_service.hits == ["/"]


def test_an_agent_put_to_sleep_with_its_browser_open_wakes_with_its_profile(
    site: PageSite, sandbox_for: Callable[..., Sandbox], model_server: FakeModelServer
) -> None:
    # Chromium holds deleted files (its shared memory), which a checkpoint refuses to save: the
    # sandbox is stopped instead of hibernated, which loses nothing, since the profile is in
    # the data dir; the browser starts again on the next use.
    sandbox = sandbox_for(BROWSING, plan="pro")
    url = site.page("before.html", "<title>Hermit page 111111111111</title>")
    model_server.respond_with(browse_and_report(url, r"Hermit page [0-9a-f]{12}"))
    if not chromium_processes(sandbox):
        chat(sandbox, f"{TRIGGER} {url}")
    profile = config.state_dir(volume_of(sandbox)) / "browser" / config.BROWSER_PROFILE
    default = profile / "user-data" / "Default"  # the profile's own directory
    assert default.is_dir()
    made = default.stat().st_ino

    assert sleep.hibernate(sandbox) == "stopped"
    sandbox.refresh_from_db()
    assert sandbox.state == Sandbox.State.SLEEPING
    event = sandbox.events.filter(kind="sleep").order_by("-pk").first()
    assert event is not None and event.message.startswith("Stopped instead of hibernating")

    for _ in actions.wake_sandbox(sandbox):
        pass
    sandbox.refresh_from_db()
    assert chromium_processes(sandbox) == [], "the browser waits for its next use"
    title = f"Hermit page {secrets.token_hex(6)}"
    url = site.page("after.html", f"<title>{title}</title>")
    model_server.respond_with(browse_and_report(url, r"Hermit page [0-9a-f]{12}"))
    assert chat(sandbox, f"{TRIGGER} {url}").strip() == title
    assert default.stat().st_ino == made, "the same profile, kept across the sleep"


def test_a_plan_without_the_browser_gives_the_agent_no_browser(
    sandbox_for: Callable[..., Sandbox], model_server: FakeModelServer
) -> None:
    sandbox = sandbox_for(OTHER)  # the free plan: no browser
    assert limits_for(sandbox.owner).browser is False
    run = run_in(sandbox, ["cat", config.CONFIG_PATH])
    rendered = json.loads(run.stdout)
    assert rendered["browser"] == {"enabled": False}
    assert rendered["plugins"]["entries"]["browser"] == {"enabled": False}
    model_server.respond_with(browse_and_report("http://example.invalid/", "Hermit"))

    reply = chat(sandbox, f"{TRIGGER} http://example.invalid/")

    assert reply == NO_BROWSER
    asked = [r.json for r in model_server.requests if TRIGGER in json.dumps(r.json)]
    assert asked, "the agent asked the model"
    assert all(browser_call(body, {}) is None for body in asked)
    assert all('"browser"' not in json.dumps(body.get("tools")) for body in asked)
    assert chromium_processes(sandbox) == []


def test_the_plan_sets_the_browser_and_its_memory_share() -> None:
    ensure_standard_plans()
    user = make_user("carol@browser.test")
    pro = Plan.objects.get(slug="pro")
    Account.objects.filter(user=user).update(plan=pro)
    limits = limits_for(user)
    assert limits.browser is True and limits.browser_memory_mb == pro.browser_memory_mb
    assert limits.memory_mb == pro.memory_mb + pro.browser_memory_mb
    assert limits.resources() == pro.limits()

    free = Plan.objects.get(slug="free")
    Account.objects.filter(user=user).update(plan=free)
    limits = limits_for(user)
    assert (limits.browser, limits.browser_memory_mb, limits.memory_mb) == (
        False,
        0,
        free.memory_mb,
    )
    free.browser = True
    free.save(update_fields=["browser"])
    assert limits_for(user).memory_mb == free.memory_mb + free.browser_memory_mb
    assert limits_for(user).resources() != limits.resources(), "a change needs a restart"
