"""The portal's authenticated path to a gateway on another host: tokens (sandboxes.hostlink) and
the host's edge (hostedge), run as a real uvicorn server in front of a protocol-v4 gateway
double, the hostile HTTP double and a real OpenClaw gateway, on this machine and inside a
network namespace standing for a second host."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import websockets
from asgiref.sync import async_to_sync
from django.core.exceptions import ImproperlyConfigured
from websockets.exceptions import InvalidHandshake, InvalidStatus

from portal.lib.redact import redact
from sandboxes import hostlink
from sandboxes.consumers.chat import device_identity_for
from sandboxes.models import Sandbox, SandboxHost
from sandboxes.openclaw.protocol import DeviceIdentity, GatewayConnection, HelloInfo
from tests.factories import make_user
from tests.fakes.gateway_double import GatewayDouble
from tests.fixtures.live import ROOT, Server, server_env
from tests.fixtures.live import test_database_url as served_database_url
from tests.net import free_port, wait_for_port
from tests.netns import HostNamespace

SECRET = "s" * 40
DOUBLE = [sys.executable, str(ROOT / "bench" / "chat_relay.py"), "--fake-gateway"]
EDGE_HOST = "edge-host"


# -- tokens ------------------------------------------------------------------------------------


@pytest.fixture
def link_secret(settings: Any) -> str:
    settings.HERMIT_HOST_LINK_SECRET = [SECRET]
    return SECRET


def test_it_verifies_a_token_for_its_host_and_sandbox(link_secret: str) -> None:
    token = hostlink.sign("host-2", 42, now=1_000_000)
    claims = hostlink.verify(token, "host-2", 42, now=1_000_010)
    assert claims.sandbox_id == 42 and claims.expires == 1_000_030
    assert hostlink.sign("host-2", 42, now=1_000_000) != token  # a nonce each


@pytest.mark.parametrize(
    ("change", "reason", "status"),
    [
        (lambda t: "", "no token", 401),
        (lambda t: t.replace("v1.", "v2.", 1), "malformed token", 401),
        (lambda t: t[:-2] + ("AA" if t[-2:] != "AA" else "BB"), "bad token", 401),
        (lambda t: t.replace(".42.", ".43.", 1), "bad token", 401),  # the id is signed
    ],
)
def test_it_refuses_a_missing_malformed_or_forged_token(
    link_secret: str, change: Callable[[str], str], reason: str, status: int
) -> None:
    token = change(hostlink.sign("host-2", 42))
    with pytest.raises(hostlink.TokenRefused) as refused:
        hostlink.verify(token, "host-2", 42)
    assert (refused.value.reason, refused.value.status) == (reason, status)


def test_it_refuses_an_expired_token_another_hosts_and_another_sandboxs(link_secret: str) -> None:
    token = hostlink.sign("host-2", 42, now=1_000_000)
    with pytest.raises(hostlink.TokenRefused, match="expired token"):
        hostlink.verify(token, "host-2", 42, now=1_000_030)
    with pytest.raises(hostlink.TokenRefused, match="bad token"):
        hostlink.verify(token, "host-3", 42, now=1_000_001)
    with pytest.raises(hostlink.TokenRefused, match="another sandbox") as refused:
        hostlink.verify(token, "host-2", 7, now=1_000_001)
    assert refused.value.status == 403


def test_it_signs_with_the_newest_secret_and_accepts_the_older_ones(settings: Any) -> None:
    old, new = "o" * 32, "n" * 32
    settings.HERMIT_HOST_LINK_SECRET = [old]
    before = hostlink.sign("host-2", 1)
    settings.HERMIT_HOST_LINK_SECRET = [new, old]
    after = hostlink.sign("host-2", 1)
    assert hostlink.verify(before, "host-2", 1).sandbox_id == 1
    settings.HERMIT_HOST_LINK_SECRET = [new]
    assert hostlink.verify(after, "host-2", 1).sandbox_id == 1
    with pytest.raises(hostlink.TokenRefused, match="bad token"):
        hostlink.verify(before, "host-2", 1)


def test_it_needs_a_long_secret_unless_debug(settings: Any) -> None:
    settings.HERMIT_HOST_LINK_SECRET = []
    settings.DEBUG = True
    assert len(hostlink.link_secrets()[0]) >= 32  # derived from SECRET_KEY
    settings.DEBUG = False
    with pytest.raises(ImproperlyConfigured, match="HERMIT_HOST_LINK_SECRET"):
        hostlink.sign("host-2", 1)
    settings.HERMIT_HOST_LINK_SECRET = ["short"]
    with pytest.raises(ImproperlyConfigured, match="32 characters"):
        hostlink.sign("host-2", 1)


def test_it_builds_the_url_of_a_sandbox_on_another_host(
    db: None, link_secret: str, settings: Any
) -> None:
    settings.HERMIT_HOST_NAME = "host-1"
    here = SandboxHost.objects.create(name="host-1", address="127.0.0.1")
    there = SandboxHost.objects.create(name="host-2", address="10.0.0.2")
    sandbox, _ = Sandbox.objects.update_or_create(
        owner=make_user("alice@example.com"), name="default", defaults={"host": there}
    )
    assert hostlink.is_remote(sandbox)
    url = hostlink.gateway_url(sandbox, "/chat", scheme="http", query="x=1")
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == (
        "http", "10.0.0.2:8003", f"/sandboxes/{sandbox.pk}/chat",
    )  # fmt: skip
    query = parse_qs(parts.query)
    assert query["x"] == ["1"]
    hostlink.verify(query["edge_token"][0], "host-2", sandbox.pk)
    assert query["edge_token"][0] not in redact(f"connecting to {url} failed")

    there.address = "10.0.0.2:9003"  # a port of its own
    there.save()
    assert hostlink.gateway_url(sandbox).startswith(f"ws://10.0.0.2:9003/sandboxes/{sandbox.pk}/?")
    sandbox.host = here
    assert not hostlink.is_remote(sandbox)
    assert not hostlink.is_remote(Sandbox(owner=sandbox.owner, host=None))


def test_it_does_not_start_without_a_secret(sandbox_dirs: dict[str, str]) -> None:
    from cryptography.fernet import Fernet

    env = server_env(
        **sandbox_dirs,
        DEBUG="False",
        SECRET_KEY="a-production-secret-key-for-this-test-only",
        HERMIT_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
        SITE_URL="https://portal.example",
        HERMIT_CONTROL_UI_URL="https://ui.example.net",
        HERMIT_HOST_LINK_SECRET="",
    )
    argv = [sys.executable, "-m", "hostedge", "--host", "127.0.0.1", "--port", str(free_port())]
    run = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "HERMIT_HOST_LINK_SECRET (or _FILE) must be set" in run.stderr + run.stdout


# -- the edge on this machine ------------------------------------------------------------------


@dataclass
class Edge:
    server: Server
    port: int
    double_port: int
    host: str

    def output(self) -> str:
        return self.server.output()


@pytest.fixture(scope="module")
def edge(start_server: Callable[..., Server]) -> Iterator[Edge]:
    """The edge on 127.0.0.1 (as host EDGE_HOST) and a protocol-v4 gateway double."""
    port, double_port = free_port(), free_port()
    double = start_server([*DOUBLE, str(double_port)], name="gateway-double")
    server = start_server(
        [sys.executable, "-m", "hostedge", "--host", "127.0.0.1", "--port", str(port)],
        name="edge",
        HERMIT_HOST_NAME=EDGE_HOST,
        HERMIT_HOST_LINK_SECRET=SECRET,
    )
    wait_for_port(double_port, proc=double.proc)
    wait_for_port(port, proc=server.proc)
    yield Edge(server, port, double_port, EDGE_HOST)
    server.stop()
    double.stop()


def _sandbox(email: str, host: SandboxHost, port: int | None, **fields: Any) -> Sandbox:
    values: dict[str, Any] = {
        "backend": "local",
        "backend_state": {"host_port": port} if port else {},  # the local backend's record
        "state": Sandbox.State.RUNNING,
        "gateway_token": "gateway-token",
        **fields,
    }
    sandbox, _ = Sandbox.objects.update_or_create(
        owner=make_user(email), name="default", defaults={"host": host, **values}
    )  # a signal may have made the user's row already
    return sandbox


@pytest.fixture
def edge_host(transactional_db: None, link_secret: str, edge: Edge) -> SandboxHost:
    return SandboxHost.objects.create(name=edge.host, address=f"127.0.0.1:{edge.port}")


async def chat_through(
    url: str, token: str, identity: DeviceIdentity
) -> tuple[HelloInfo, list[str], list[str]]:
    """Connect to ``url`` as the portal does, send a chat message and return the hello, the
    chat states that come back up to the final one, and the reply's words in the deltas."""
    conn = await GatewayConnection.open(url, token=token, identity=identity, timeout=15)
    try:
        params = {"sessionKey": "main", "message": "hello", "idempotencyKey": "edge-test-1"}
        sent = await conn.request("chat.send", params)
        assert sent["runId"] == "edge-test-1", sent
        states: list[str] = []
        words: list[str] = []
        async with asyncio.timeout(15):
            async for event in conn.events():
                if event.event == "chat":
                    states.append(event.payload["state"])
                    words += [w for w in event.payload.get("deltaText", "").split() if w[0] != "@"]
                    if event.payload["state"] == "final":
                        break
        return conn.hello, states, words
    finally:
        await conn.close()


def refusal(url: str) -> tuple[int, str]:
    """The HTTP status and body with which the edge refuses a WebSocket handshake to ``url``."""

    async def attempt() -> tuple[int, str]:
        try:
            ws = await websockets.connect(url, open_timeout=10)
        except InvalidStatus as exc:
            return exc.response.status_code, exc.response.body.decode().strip()
        await ws.close()
        raise AssertionError(f"{url} was accepted")

    return async_to_sync(attempt)()


def test_it_relays_a_protocol_exchange_to_the_gateway(edge: Edge, edge_host: SandboxHost) -> None:
    sandbox = _sandbox("alice@example.com", edge_host, edge.double_port)
    url = hostlink.gateway_url(sandbox)
    hello, states, words = async_to_sync(chat_through)(url, "token", DeviceIdentity.generate())
    assert hello.protocol == 4 and hello.server_version == "fake"
    # The double paces its deltas as OpenClaw does (at most one per 75 ms): some deltas, each
    # word of the reply once and in order, then the final.
    assert states[-1] == "final" and set(states[:-1]) == {"delta"}, states
    assert words == [f"w{i}" for i in range(10)]
    token = parse_qs(urlsplit(url).query)["edge_token"][0]
    assert token not in edge.output()


def test_it_refuses_missing_bad_expired_used_and_foreign_tokens(
    edge: Edge, edge_host: SandboxHost
) -> None:
    alice = _sandbox("alice@example.com", edge_host, edge.double_port)
    bob = _sandbox("bob@example.com", edge_host, edge.double_port)
    base = f"ws://127.0.0.1:{edge.port}/sandboxes/{alice.pk}/"
    assert refusal(base) == (401, "no token")
    token = hostlink.sign(edge.host, alice.pk)
    assert refusal(f"{base}?edge_token={token[:-3]}xyz") == (401, "bad token")
    assert refusal(f"{base}?edge_token={token}&edge_token={token}") == (401, "malformed token")
    stale = hostlink.sign(edge.host, alice.pk, now=time.time() - 60)
    assert refusal(f"{base}?edge_token={stale}") == (401, "expired token")
    other_host = hostlink.sign("host-elsewhere", alice.pk)
    assert refusal(f"{base}?edge_token={other_host}") == (401, "bad token")
    for_bob = hostlink.sign(edge.host, bob.pk)
    assert refusal(f"{base}?edge_token={for_bob}") == (403, "token for another sandbox")
    assert refusal(f"ws://127.0.0.1:{edge.port}/elsewhere?edge_token={for_bob}") == (
        404, "not found",
    )  # fmt: skip

    url = hostlink.gateway_url(alice)  # accepted once, refused the second time
    async_to_sync(chat_through)(url, "token", DeviceIdentity.generate())
    assert refusal(url) == (401, "token already used")
    assert "token already used" in edge.output() and token not in edge.output()


def test_it_refuses_sandboxes_not_on_its_host_or_not_running(
    edge: Edge, edge_host: SandboxHost
) -> None:
    elsewhere = SandboxHost.objects.create(name="host-elsewhere", address="127.0.0.1:9")
    moved = _sandbox("alice@example.com", elsewhere, edge.double_port)
    token = hostlink.sign(edge.host, moved.pk)  # signed for this edge: still not its sandbox
    assert refusal(f"ws://127.0.0.1:{edge.port}/sandboxes/{moved.pk}/?edge_token={token}") == (
        404, "no such sandbox on this host",
    )  # fmt: skip
    stopped = _sandbox("bob@example.com", edge_host, None, state=Sandbox.State.STOPPED)
    assert refusal(hostlink.gateway_url(stopped)) == (503, "the agent is not running")
    gone = _sandbox("carol@example.com", edge_host, free_port())  # nothing listens there
    assert refusal(hostlink.gateway_url(gone)) == (502, "the agent did not answer")


def test_it_relays_the_control_uis_http_and_refuses_it_without_a_token(
    edge: Edge, edge_host: SandboxHost
) -> None:
    with GatewayDouble() as gateway:
        sandbox = _sandbox("alice@example.com", edge_host, gateway.port)
        url = hostlink.gateway_url(sandbox, "/hostile.js", scheme="http", query="v=2")
        response = httpx.get(url, headers={"Authorization": "Bearer gateway-token"})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/javascript"
        assert b"serviceWorker" in response.content
        assert gateway.last["path"] == "/hostile.js?v=2"  # the edge's token is not passed on
        assert gateway.last["headers"]["authorization"] == "Bearer gateway-token"
        posted = httpx.post(
            hostlink.gateway_url(sandbox, "/api", scheme="http"), content=b'{"a": 1}'
        )
        assert posted.status_code == 200 and gateway.last["body"] == b'{"a": 1}'
        assert gateway.last["method"] == "POST"
        seen = len(gateway.requests)
        refused = httpx.get(f"http://127.0.0.1:{edge.port}/sandboxes/{sandbox.pk}/hostile.js")
        assert (refused.status_code, refused.text.strip()) == (401, "no token")
        assert len(gateway.requests) == seen


def test_it_relays_to_a_real_openclaw_gateway(
    edge: Edge, sandbox_for: Callable[..., Sandbox], link_secret: str
) -> None:
    # The pool's shared agent (no gateway start of its own): the test only reads its history
    # through the edge, and puts its row back on no host.
    sandbox = sandbox_for("alice@chat.test")
    host = SandboxHost.objects.create(name=edge.host, address=f"127.0.0.1:{edge.port}")
    Sandbox.objects.filter(pk=sandbox.pk).update(host=host)
    try:
        sandbox.refresh_from_db()
        url = hostlink.gateway_url(sandbox)
        identity = device_identity_for(sandbox)

        async def history() -> tuple[HelloInfo, dict[str, Any]]:
            conn = await GatewayConnection.open(
                url, token=sandbox.gateway_token, identity=identity, timeout=15
            )
            try:
                return conn.hello, await conn.request("chat.history", {"sessionKey": "main"})
            finally:
                await conn.close()

        hello, payload = async_to_sync(history)()
        assert hello.protocol == 4 and hello.server_version not in ("", "fake")
        assert isinstance(payload.get("messages"), list)
    finally:  # the pool keeps the row: it must not point at this test's host
        Sandbox.objects.filter(pk=sandbox.pk).update(host=None)


def _self_signed(directory: Path, address: str) -> tuple[Path, Path]:
    """A certificate for ``address`` (its own CA, so a client can trust it alone) and its key."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hermit test edge")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "edge.pem", directory / "edge.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_it_serves_the_link_over_tls(
    edge: Edge,
    start_server: Callable[..., Server],
    transactional_db: None,
    link_secret: str,
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    cert, key = _self_signed(tmp_path, "127.0.0.1")
    port = free_port()
    server = start_server(
        [sys.executable, "-m", "hostedge", "--host", "127.0.0.1", "--port", str(port)],
        name="edge-tls",
        HERMIT_HOST_NAME="edge-tls",
        HERMIT_HOST_LINK_SECRET=SECRET,
        HERMIT_HOST_EDGE_TLS_CERT=str(cert),
        HERMIT_HOST_EDGE_TLS_KEY=str(key),
    )
    try:
        wait_for_port(port, proc=server.proc)
        host = SandboxHost.objects.create(name="edge-tls", address=f"127.0.0.1:{port}")
        sandbox = _sandbox("alice@example.com", host, edge.double_port)
        settings.HERMIT_HOST_EDGE_TLS = True
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the client's default context trusts it
        url = hostlink.gateway_url(sandbox)
        assert url.startswith(f"wss://127.0.0.1:{port}/")
        hello, states, _words = async_to_sync(chat_through)(url, "token", DeviceIdentity.generate())
        assert hello.server_version == "fake" and states[-1] == "final"

        plain = hostlink.gateway_url(sandbox).replace("wss://", "ws://", 1)

        async def without_tls() -> None:
            await websockets.connect(plain, open_timeout=5)

        with pytest.raises((InvalidHandshake, OSError, EOFError)):  # no plain-text handshake
            async_to_sync(without_tls)()
    finally:
        server.stop()


# -- the edge on a second host (a network namespace) -------------------------------------------


def _wait_inside(ns: HostNamespace, port: int, timeout: float = 30) -> None:
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), 1)"
    deadline = time.monotonic() + timeout
    while ns.run([sys.executable, "-c", probe]).returncode != 0:
        assert time.monotonic() < deadline, f"nothing listens on port {port} in {ns.name}"
        time.sleep(0.3)


def _wait_at(address: str, port: int, proc: Any, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            socket.create_connection((address, port), 1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.3)


def test_it_relays_from_this_machine_to_a_gateway_on_another_host(
    transactional_db: None,
    link_secret: str,
    host_namespace: HostNamespace,
    sandbox_dirs: dict[str, str],
    tmp_path: Path,
) -> None:
    ns = host_namespace
    name = f"netns-host-{ns.number}"
    gateway_port, edge_port = 18789, 8003  # the second host's own: nothing else is there
    ns.popen([*DOUBLE, str(gateway_port)], cwd=ROOT, log=tmp_path / "double.log")
    env = server_env(
        **sandbox_dirs,
        DATABASE_URL=ns.database_url(served_database_url()),
        REDIS_URL=ns.redis_url(server_env()["REDIS_URL"]),
        HERMIT_HOST_NAME=name,
        HERMIT_HOST_ADDRESS=ns.address,
        HERMIT_HOST_LINK_SECRET=SECRET,
    )
    log = tmp_path / "edge.log"
    edge = ns.popen([sys.executable, "-m", "hostedge"], env=env, cwd=ROOT, log=log)
    _wait_inside(ns, gateway_port)
    _wait_at(ns.address, edge_port, edge, log)

    host = SandboxHost.objects.create(name=name, address=ns.address)
    sandbox = _sandbox("alice@example.com", host, gateway_port)
    url = hostlink.gateway_url(sandbox)
    assert url.startswith(f"ws://{ns.address}:{edge_port}/sandboxes/{sandbox.pk}/?edge_token=")
    hello, states, _words = async_to_sync(chat_through)(url, "token", DeviceIdentity.generate())
    assert hello.server_version == "fake" and states[-1] == "final"

    # The gateway itself is not on the network: only the edge is, and only with a token.
    with socket.socket() as sock:
        sock.settimeout(2)
        assert sock.connect_ex((ns.address, gateway_port)) != 0
    assert refusal(f"ws://{ns.address}:{edge_port}/sandboxes/{sandbox.pk}/") == (401, "no token")
