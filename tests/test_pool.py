"""The warm pool end to end, on real gateways: filled in the background by a Celery worker, a
confirmed sign-up gets the pooled gateway in about a second (re-keyed in place: the pool's
token and AI credential stop working, the user's work, the first chat answers), the pool refills,
a pooled gateway goes to one sign-up only, and without one provisioning starts cold as before.

Pool size 1 throughout: each pooled gateway is a real cold boot (~10 s of both cores). Who gets
a pooled gateway when sign-ups race for it is the portal's claim on the database (a locked row,
``skip_locked``), so that race runs on the in-memory backend, where a gateway costs nothing; the
hand-over itself (the re-key, the user's token and credential working, the pool's dead) is
proven on real gateways by the first and last tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from allauth.account.models import EmailAddress
from allauth.account.signals import email_confirmed
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings as django_settings
from django.db import connection, transaction
from django.utils import timezone

from sandboxes import actions, pool, runtime, tasks
from sandboxes.backends import get_backend
from sandboxes.backends.fake import FakeBackend
from sandboxes.backends.local import FILES_NAME
from sandboxes.events import group_name
from sandboxes.models import Sandbox
from sandboxes.openclaw.protocol import DeviceIdentity, GatewayConnection, GatewayError
from tests.factories import make_user
from tests.fixtures.backend import volume_of
from tests.fixtures.backups import history, tell
from tests.fixtures.live import Server

pytestmark = pytest.mark.django_db(transaction=True)
State = Sandbox.State
CONFIG_FILE = "etc__openclaw__openclaw.json"  # CONFIG_PATH's name in the run dir


@pytest.fixture
def warm_pool(sandbox_pool: Any, transactional_db: None, settings: Any) -> Iterator[Any]:
    """Pool size 1, sign-ups provision; every gateway the test started is stopped after it."""
    settings.HERMIT_WARM_POOL_SIZE = 1
    settings.HERMIT_AUTO_PROVISION = True
    sandbox_pool.restore_shared()
    yield sandbox_pool
    running = [s for s in Sandbox.objects.all() if s.backend_state]
    with ThreadPoolExecutor(max_workers=max(1, len(running))) as threads:
        for done in [
            threads.submit(get_backend(s.backend).stop, actions.spec_for(s), s.backend_state)
            for s in running
        ]:
            done.result()


def _pooled(timeout: float, *, other_than: int | None = None) -> Sandbox:
    """Wait for a running pooled gateway (not ``other_than``) and return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        owner = pool.pool_user_id()
        found = Sandbox.objects.filter(owner_id=owner, state=State.RUNNING)
        if other_than is not None:
            found = found.exclude(pk=other_than)
        if owner is not None and (first := found.first()) is not None:
            return first
        time.sleep(0.2)
    raise AssertionError(f"no pooled gateway came up: {list(Sandbox.objects.values())}")


def _running(user: Any, timeout: float) -> Sandbox:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sandbox = Sandbox.objects.filter(owner=user).first()
        if sandbox is not None and sandbox.state in (State.RUNNING, State.FAILED):
            return sandbox
        time.sleep(0.02)
    raise AssertionError(f"{user}'s sandbox is not running: {list(Sandbox.objects.values())}")


def _config(sandbox: Sandbox) -> dict[str, Any]:
    """The gateway's config as root wrote it (the run dir is root's)."""
    path = Path(sandbox.backend_state["run_dir"]) / FILES_NAME / CONFIG_FILE
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def _ai_key(sandbox: Sandbox) -> str:
    return str(_config(sandbox)["models"]["providers"]["hermit"]["apiKey"])


def _connects(sandbox: Sandbox, token: str) -> bool | str:
    """Return True if the sandbox's gateway accepts ``token``, else the refusal."""
    host, port = actions.gateway_endpoint(sandbox)

    async def attempt() -> None:
        conn = await GatewayConnection.open(
            f"ws://{host}:{port}", token=token, identity=DeviceIdentity.generate(), timeout=10
        )
        await conn.close()

    try:
        asyncio.run(attempt())
    except GatewayError as exc:
        return f"{exc.code}: {exc}"
    return True


def _ai_status(key: str) -> int:
    """The AI gateway's answer to a model listing with ``key``: 200, or 401 for a dead key."""
    port = django_settings.HERMIT_AI_GATEWAY_PORT
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/ai/v1/models", headers={"Authorization": f"Bearer {key}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _files_containing(root: Path, secrets: list[str]) -> list[str]:
    found = []
    needles = [s.encode() for s in secrets]
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: {n[:6]!r}..." for n in needles if n in data]
    return found


class _DashboardListener:
    """Listens to a sandbox's progress group, as a dashboard opened on it does."""

    def __init__(self, sandbox_id: int) -> None:
        self.layer = get_channel_layer()
        self.channel = async_to_sync(self.layer.new_channel)()
        async_to_sync(self.layer.group_add)(group_name(sandbox_id), self.channel)

    def states(self, wait: float = 2.0) -> list[str]:
        async def drain() -> list[str]:
            seen = []
            with contextlib.suppress(TimeoutError):
                while True:
                    message = await asyncio.wait_for(self.layer.receive(self.channel), wait)
                    seen.append(message["state"])
            return seen

        return async_to_sync(drain)()


def test_a_confirmed_sign_up_gets_the_warm_gateway_in_a_second(
    warm_pool: Any, start_server: Callable[..., Server], fake_model: Any
) -> None:
    worker = start_server(
        "celery",
        name="pool-worker",
        HERMIT_WARM_POOL_SIZE="1",
        HERMIT_AI_GATEWAY_PORT=str(django_settings.HERMIT_AI_GATEWAY_PORT),
    )
    try:
        pool.fill_pool.delay()  # what beat does
        pooled = _pooled(180)
        pool_token, pool_key = pooled.gateway_token, _ai_key(pooled)
        assert _connects(pooled, pool_token) is True
        assert _ai_status(pool_key) == 200
        assert (
            "OPENCLAW_GATEWAY_TOKEN"
            not in Path(f"/proc/{pooled.backend_state['main'][0]}/environ").read_text()
        )  # a pooled gateway's secrets are in its config only

        user = make_user("newcomer@agents.test")
        address = EmailAddress.objects.get(user=user)
        page = _DashboardListener(Sandbox.objects.get(owner=user).pk)  # a page opened now
        confirmed = time.monotonic()
        with transaction.atomic():  # the provisioning task is queued when this commits
            email_confirmed.send(sender=EmailAddress, request=None, email_address=address)
        sandbox = _running(user, 30)
        elapsed = time.monotonic() - confirmed
        print(f"\nsign-up confirmed -> running on the pooled gateway: {elapsed:.2f} s")
        assert sandbox.state == State.RUNNING, sandbox.error_message + worker.output()[-3000:]
        assert sandbox.pk == pooled.pk and sandbox.name == "default"
        assert elapsed < 4, f"{elapsed:.2f} s"
        assert Sandbox.objects.filter(owner=user).count() == 1
        kinds = list(sandbox.events.order_by("created_at", "id").values_list("kind", flat=True))
        assert kinds[:2] == ["created", "queued"] and kinds[-1] == "state", kinds
        last = sandbox.events.first()
        assert last is not None and last.state == State.RUNNING
        assert State.RUNNING in page.states(), "the open dashboard did not see it run"

        # The pool's secrets are dead, the user's work: no trace of the pool is left.
        assert "token mismatch" in str(_connects(sandbox, pool_token))
        assert _connects(sandbox, sandbox.gateway_token) is True
        assert _ai_key(sandbox) not in (pool_key, "${HERMIT_AI_KEY}")
        assert _config(sandbox)["gateway"]["auth"]["token"] == sandbox.gateway_token
        deadline = time.monotonic() + django_settings.HERMIT_AI_KEY_CACHE_SECONDS + 5
        while _ai_status(pool_key) != 401:  # the AI gateway may cache a key a few seconds
            assert time.monotonic() < deadline, "the pool's AI credential still works"
            time.sleep(0.5)
        assert _ai_status(_ai_key(sandbox)) == 200
        assert _files_containing(volume_of(sandbox), [pool_token, pool_key]) == []
        assert history(sandbox) == []  # no session of anyone before the user's own

        # The user's first chat goes through their own credential to the model.
        fake_model.script(reply="Welcome aboard.")
        tell(sandbox, "Hello, new agent")
        assert history(sandbox) == ["Hello, new agent", "Welcome aboard."]

        # The worker refills the pool in the background.
        refilled = _pooled(180, other_than=sandbox.pk)
        assert refilled.owner_id == pool.pool_user_id() and refilled.gateway_token != pool_token
    finally:
        worker.stop()  # it would take the tasks later tests queue


@pytest.fixture
def fake_pool(transactional_db: None, fake_backend: FakeBackend, settings: Any) -> FakeBackend:
    """Pool size 1 on the in-memory backend: sign-ups' sandboxes and pooled gateways alike are
    the fake's, on a current runtime image of their own."""
    settings.HERMIT_WARM_POOL_SIZE = 1
    settings.HERMIT_AUTO_PROVISION = True
    return fake_backend


def _fake_user(email: str) -> Any:
    user = make_user(email)
    Sandbox.objects.filter(owner=user).update(backend="fake")
    return user


def test_a_pooled_gateway_goes_to_one_sign_up_only(fake_pool: FakeBackend, settings: Any) -> None:
    assert pool.fill_pool() == 1  # in this process: one start
    pooled = _pooled(5)
    assert pooled.backend == "fake"
    assert pool.fill_pool() == 0  # full: nothing more starts

    # With the pool switched off, a running pooled gateway is not handed out.
    settings.HERMIT_WARM_POOL_SIZE = 0
    nobody = Sandbox.objects.get(owner=_fake_user("off@agents.test"))
    assert pool.adopt(nobody) is False
    settings.HERMIT_WARM_POOL_SIZE = 1

    # Two sign-ups, each provisioned twice at once, race for the one pooled gateway.
    first, second = _fake_user("first@agents.test"), _fake_user("second@agents.test")
    rows = [Sandbox.objects.get(owner=u) for u in (first, second) for _ in range(2)]
    start = threading.Barrier(len(rows))

    def adopt(sandbox: Sandbox) -> bool:
        try:
            start.wait()
            return pool.adopt(sandbox)
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=len(rows)) as threads:
        results = list(threads.map(adopt, rows))
    winner = Sandbox.objects.get(pk=pooled.pk)
    assert winner.state == State.RUNNING and winner.owner in (first, second)
    won = [first, second].index(winner.owner)
    assert results[2 * won : 2 * won + 2] == [True, True], results  # one adoption, one no-op
    assert results[2 * (1 - won) : 2 * (1 - won) + 2] == [False, False], results
    assert Sandbox.objects.filter(owner=winner.owner).count() == 1
    assert not Sandbox.objects.filter(owner_id=pool.pool_user_id()).exists()
    # The winner's agent is up on the pooled row (the fake cannot re-key a gateway in place,
    # so its hand-over takes the cold path; the re-key is the other tests' subject).
    assert fake_pool.poll(actions.spec_for(winner), winner.backend_state).running

    # The loser's pool is empty: its provisioning starts cold, as before the pool.
    loser = Sandbox.objects.get(owner=[first, second][1 - won])
    assert loser.state == State.PROVISIONING and loser.pk not in (pooled.pk, nobody.pk)
    tasks.provision_sandbox(loser.pk)
    loser.refresh_from_db()
    assert loser.state == State.RUNNING, loser.error_message
    assert loser.events.filter(message="Starting the agent gateway").exists()  # a cold boot
    assert Sandbox.objects.get(pk=nobody.pk).state == State.PROVISIONING


def test_a_pooled_gateway_that_cannot_be_rekeyed_is_started_cold_for_its_user(
    warm_pool: Any,
) -> None:
    """Never handed over with the pool's secrets: here its gateway is gone (a crash reconcile
    has not seen yet), so the re-key fails and the user's sandbox boots cold, the usual way."""
    broken = Sandbox.objects.create(
        owner=pool.pool_user(),
        name="pool-broken",
        gateway_token="pool-token-of-a-gateway-that-is-gone",
        state=State.RUNNING,
        runtime=runtime.current_image(),
        started_at=timezone.now(),
    )
    user = make_user("unlucky@agents.test")
    assert pool.adopt(Sandbox.objects.get(owner=user)) is True
    sandbox = Sandbox.objects.get(owner=user)
    assert sandbox.pk == broken.pk and sandbox.state == State.RUNNING, sandbox.error_message
    assert sandbox.gateway_token != broken.gateway_token
    assert sandbox.events.filter(message="Starting the agent gateway").exists()  # cold
    environ = Path(f"/proc/{sandbox.backend_state['main'][0]}/environ").read_bytes()
    assert f"OPENCLAW_GATEWAY_TOKEN={sandbox.gateway_token}".encode() in environ
    assert _connects(sandbox, sandbox.gateway_token) is True
