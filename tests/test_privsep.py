"""The privilege split, end to end: the portal started the way ``make run`` starts it (bin/run):
daphne (portal and Control UI origins) and the AI gateway's uvicorn as the unprivileged web
user that bin/web-user prepares, the Celery worker as root. From /proc, no web process has
uid 0 (real, effective, saved or filesystem); and through those processes a new user's agent
is woken (its first start), chats (a reply of the fake model through a real OpenClaw gateway
in a real sandbox and the unprivileged AI gateway), sleeps, is woken from its sleep by the
next chat, and opens its Control UI (page and WebSocket relay), every sandbox operation done
by the root worker.

One sandbox, booted once by the worker (its model calls must reach this test's AI gateway, so
it cannot be the pool's shared agent); a wake from a hibernation restores it in about a second.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

from sandboxes import actions, tasks
from sandboxes.models import Sandbox
from tests.factories import make_user
from tests.fakes.model_server import FakeModelServer
from tests.fixtures.backend import volume_of
from tests.fixtures.chat import session_cookie
from tests.fixtures.live import ROOT, Server, as_user
from tests.net import free_port, wait_for_port

WEB_USER = os.environ.get("HERMIT_WEB_USER", "hermit")
EMAIL = "privsep@chat.test"
Frame = dict[str, Any]


@dataclass
class Portal:
    url: str  # the portal's origin, on daphne
    ui: str  # the Control UI's origin, on the same daphne
    daphne: Server
    ai_gateway: Server
    worker: Server


@pytest.fixture(scope="module")
def portal(
    start_server: Callable[..., Server],
    sandbox_dirs: dict[str, str],
    celery_queue: str,
    sandbox_pool: Any,
) -> Iterator[Portal]:
    """daphne and uvicorn as the web user, a root worker, as bin/run starts them."""
    from django.conf import settings

    env = {
        "DATABASE_URL": os.environ.get("DATABASE_URL", ""),
        "REDIS_URL": os.environ.get("REDIS_URL", ""),
    }
    subprocess.run(
        [str(ROOT / "bin" / "web-user"), WEB_USER, sandbox_dirs["HERMIT_DATA_DIR"]],
        check=True,
        env={**os.environ, **env},
    )
    ai_gateway = start_server("uvicorn", name="ai-gateway-web", user=WEB_USER)
    portal_port, ui_port = free_port(), free_port()
    url, ui = f"http://127.0.0.1:{portal_port}", f"http://localhost:{ui_port}"
    env = {
        "HERMIT_AI_GATEWAY_PORT": str(ai_gateway.port),
        "HERMIT_CELERY_QUEUE": celery_queue,
        "HERMIT_CONTROL_UI_URL": ui,
        "SITE_URL": settings.SITE_URL,  # the origin the gateway's Control UI allows
        "CSRF_TRUSTED_ORIGINS": f"{settings.SITE_URL},{url}",
        "HERMIT_AUTO_PROVISION": "False",
    }
    # The worker first: it boots while daphne does (the first chat queues it a wake).
    worker = start_server("celery", name="worker-root", **env)
    argv = ["-m", "portal.daphne_uvloop", "-e", f"tcp:port={portal_port}:interface=127.0.0.1"]
    argv += ["-e", f"tcp:port={ui_port}:interface=127.0.0.1", "portal.asgi:application"]
    daphne = start_server([sys.executable, *argv], name="daphne-web", user=WEB_USER, **env)
    wait_for_port(portal_port, proc=daphne.proc)
    wait_for_port(ui_port, proc=daphne.proc)
    yield Portal(url, ui, daphne, ai_gateway, worker)
    # now, not at the session's end: this worker must not take later tests' tasks; all at
    # once, as each takes a second or more to shut down
    servers = (worker, daphne, ai_gateway)
    for server in servers:
        if server.proc.poll() is None:
            server.proc.terminate()
    for server in servers:
        server.stop()


def ids(pid: int) -> dict[str, list[int]]:
    """The Uid and Gid lines of /proc/PID/status: real, effective, saved, filesystem."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {
        key: [int(v) for v in line.split(":", 1)[1].split()]
        for line in lines
        for key in ("Uid", "Gid")
        if line.startswith(f"{key}:")
    }


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def processes_of(root_pid: int) -> list[int]:
    """``root_pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def test_no_web_process_runs_as_root_and_the_worker_does(portal: Portal) -> None:
    import pwd

    web_uid = pwd.getpwnam(WEB_USER).pw_uid
    assert web_uid != 0
    for server, name in ((portal.daphne, "daphne"), (portal.ai_gateway, "uvicorn")):
        pids = processes_of(server.proc.pid)
        assert name in cmdline(server.proc.pid), cmdline(server.proc.pid)
        for pid in pids:
            found = ids(pid)
            assert found["Uid"] == [web_uid] * 4, (name, pid, found)
            assert 0 not in found["Gid"], (name, pid, found)
            status = Path(f"/proc/{pid}/status").read_text()
            assert re.search(r"^CapEff:\s+0+$", status, re.M), (name, pid)
            assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), (name, pid)
    assert ids(portal.worker.proc.pid)["Uid"] == [0, 0, 0, 0]  # sandboxes need root


def as_web_user(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*as_user(WEB_USER), *argv], capture_output=True, cwd=ROOT)


def test_the_web_user_can_serve_an_export_the_root_worker_wrote(
    portal: Portal, sandbox_dirs: dict[str, str], settings: Any
) -> None:
    """Local export archives are written by root's worker and served by the portal."""
    from django.core.files.base import ContentFile

    from sandboxes.backups.storage import export_storage

    settings.HERMIT_DATA_DIR = sandbox_dirs["HERMIT_DATA_DIR"]
    storage = export_storage()
    name = storage.save("privsep-check/export.tar.gz", ContentFile(b"archive bytes"))
    path = Path(storage.path(name))
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
        assert path.stat().st_uid == 0
        served = as_web_user("cat", str(path))
        assert served.returncode == 0 and served.stdout == b"archive bytes", served.stderr
        assert as_web_user("touch", str(path.parent / "planted")).returncode != 0
    finally:
        storage.delete(name)


# -- chat through the unprivileged daphne ------------------------------------------------------


def open_chat(portal: Portal, cookie: str) -> ClientConnection:
    ws = portal.url.replace("http", "ws", 1) + "/ws/chat/"
    headers = {"Cookie": cookie}
    return connect(ws, origin=Origin(portal.url), additional_headers=headers, open_timeout=10)


def receive_until(
    ws: ClientConnection, done: Callable[[Frame], bool], timeout: float
) -> list[Frame]:
    frames: list[Frame] = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no matching frame in {timeout}s; got {frames[-10:]}")
        frame = json.loads(ws.recv(timeout=remaining))
        frames.append(frame)
        if done(frame):
            return frames


def chat_once(portal: Portal, cookie: str, text: str, timeout: float) -> list[Frame]:
    """Open the chat, wait until ready, send ``text``; return every frame up to the reply."""
    with open_chat(portal, cookie) as ws:
        frames = receive_until(ws, lambda f: f["type"] == "history", timeout)
        failed = [f for f in frames if f.get("state") == "failed"]
        assert not failed, failed
        ws.send(json.dumps({"type": "send", "id": uuid.uuid4().hex, "text": text}))
        frames += receive_until(ws, lambda f: f["type"] in ("final", "error"), 90)
        return frames


def wait_for_state(sandbox: Sandbox, state: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sandbox.refresh_from_db()
        if sandbox.state == state:
            return
        time.sleep(0.5)
    raise AssertionError(f"sandbox {sandbox.state}, not {state}, after {timeout}s")


@pytest.mark.django_db(transaction=True)
def test_chat_wake_and_control_ui_work_through_the_unprivileged_portal(
    portal: Portal, sandbox_pool: Any, model_server: FakeModelServer
) -> None:
    sandbox_pool.restore_shared()  # plans, the built runtime and the model routes
    user = make_user(EMAIL)
    sandbox = Sandbox.objects.get(owner=user)
    cookie = session_cookie(user)
    try:
        # its first start: the chat queues a wake, the root worker boots it; progress shown
        model_server.script(reply="Hello from the sandbox.", chunks=3)
        frames = chat_once(portal, cookie, "hello?", timeout=240)
        assert frames[-1] == {"type": "final", "runId": frames[-1]["runId"],
                              "text": "Hello from the sandbox."}  # fmt: skip
        waking = [f for f in frames if f.get("state") == "waking"]
        assert waking and any(f["progress"] and f["progress"] > 0 for f in waking), waking
        sandbox.refresh_from_db()
        assert sandbox.state == Sandbox.State.RUNNING
        # what the agent keeps is the worker's and the sandbox's, never the web user's
        assert as_web_user("ls", str(volume_of(sandbox))).returncode != 0

        # asleep (by the worker), then woken by the next chat, with the conversation kept
        tasks.sleep_sandbox.delay(sandbox.pk)
        wait_for_state(sandbox, Sandbox.State.SLEEPING, 90)
        slept = sandbox.events.order_by("-id").values_list("id", flat=True).first()
        model_server.script(reply="Awake again.", chunks=2)
        frames = chat_once(portal, cookie, "are you back?", timeout=180)
        assert any(f.get("state") == "waking" for f in frames), frames[:5]
        history = next(f for f in frames if f["type"] == "history")["messages"]
        assert any(
            m["role"] == "assistant" and m["text"] == "Hello from the sandbox." for m in history
        ), history
        assert frames[-1]["type"] == "final" and frames[-1]["text"] == "Awake again."
        sandbox.refresh_from_db()
        assert sandbox.state == Sandbox.State.RUNNING
        since = sandbox.events.filter(id__gt=slept)
        woke = since.filter(state=Sandbox.State.STARTING, actor="user", actor_user=user).first()
        assert woke is not None, list(since.values("message", "actor", "state"))
        assert since.filter(id__gt=woke.pk, state=Sandbox.State.RUNNING).exists()

        # the Control UI: the portal hands a ticket, its own origin proxies the gateway's page
        # and relays its WebSocket
        control_ui(portal, cookie, sandbox)
    finally:
        sandbox.refresh_from_db()
        if sandbox.state in (Sandbox.State.RUNNING, Sandbox.State.DOZING, Sandbox.State.FAILED):
            actions.stop_sandbox(sandbox)


def control_ui(portal: Portal, cookie: str, sandbox: Sandbox) -> None:
    with httpx.Client(timeout=60) as portal_http:
        page = portal_http.get(f"{portal.url}/sandbox/control-ui/", headers={"Cookie": cookie})
        assert page.status_code == 200, page.text[:300]
        found = re.search(r'name="ticket" value="([^"]+)"', page.text)
        assert found, page.text[:500]
    with httpx.Client(timeout=60) as ui:
        entered = ui.post(
            f"{portal.ui}/_hermit/enter",
            data={"ticket": found.group(1)},
            headers={"Origin": portal.url},
        )
        assert entered.status_code == 303, entered.text[:300]
        assert sandbox.gateway_token not in "".join(ui.cookies.values())
        index = ui.get(f"{portal.ui}/", headers={"Sec-Fetch-Site": "none"})
        assert index.status_code == 200, index.text[:300]
        assert "<html" in index.text.lower()
        ui_cookie = "; ".join(f"{k}={v}" for k, v in ui.cookies.items())
    ws_url = portal.ui.replace("http", "ws", 1) + "/"
    with connect(ws_url, origin=Origin(portal.ui), additional_headers={"Cookie": ui_cookie}) as ws:
        first = json.loads(ws.recv(timeout=20))
    assert first.get("event") == "connect.challenge", first
