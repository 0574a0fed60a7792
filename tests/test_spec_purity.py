"""Building a sandbox's spec only computes a value; the start's side effects are its own steps.

The data dir's directories and the AI-gateway credential are made by
``actions.prepare_cold_boot``; ``actions.start_spec`` (``setup.build_spec``) may then be called
any number of times without writing a file, a row, or minting a key. The owner's limits reach
the spec as a value (``sandboxes.limits``), from the provider billing registers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from ai_gateway.credentials import authenticate, hash_key
from ai_gateway.models import SandboxCredential
from billing.models import Account, Plan
from sandboxes import actions, sleep
from sandboxes.backends import get_backend
from sandboxes.limits import SandboxLimits, limits_for
from sandboxes.models import RuntimeImage, Sandbox
from sandboxes.openclaw import config
from tests.factories import make_user
from tests.fixtures.backend import volume_of

pytestmark = pytest.mark.django_db

WRITES = ("INSERT", "UPDATE", "DELETE")


@pytest.fixture
def image(tmp_path: Path) -> RuntimeImage:
    (tmp_path / "runtime").mkdir()
    return RuntimeImage.objects.create(
        openclaw_version="test",
        node_version="test",
        path=str(tmp_path / "runtime"),
        status=RuntimeImage.Status.READY,
    )


def files_under(path: Path) -> list[Path]:
    return sorted(path.rglob("*")) if path.exists() else []


def test_building_a_spec_twice_writes_nothing_and_mints_nothing(image: RuntimeImage) -> None:
    user = make_user("pure@example.com")
    sandbox = Sandbox.objects.get(owner=user)
    limits = limits_for(user)
    assert not volume_of(sandbox).exists()
    with CaptureQueriesContext(connection) as queries:
        first = actions.start_spec(sandbox, limits, image, "hmk_given")
        second = actions.start_spec(sandbox, limits, image, "hmk_given")
    writes = [q["sql"] for q in queries.captured_queries if q["sql"].lstrip().startswith(WRITES)]
    assert writes == []
    assert not volume_of(sandbox).exists()  # no directory made, no file written
    assert not SandboxCredential.objects.filter(sandbox=sandbox).exists()  # no key minted
    assert first == second
    assert first.data_dir == get_backend(sandbox.backend).volume(sandbox.pk)  # the backend's
    assert first.env["HERMIT_AI_KEY"] == "hmk_given"
    assert first.env["OPENCLAW_GATEWAY_TOKEN"] == sandbox.gateway_token
    rendered = first.files[config.CONFIG_PATH]
    assert "hmk_given" not in rendered and sandbox.gateway_token not in rendered


def test_the_start_step_makes_the_data_dir_and_mints_a_new_key_each_time(
    image: RuntimeImage,
) -> None:
    sandbox = Sandbox.objects.get(owner=make_user("step@example.com"))
    key = actions.prepare_cold_boot(sandbox)
    assert {p.name for p in volume_of(sandbox).iterdir()} >= set(config.SUBDIRS)
    credential = SandboxCredential.objects.get(sandbox=sandbox)
    assert credential.key_hash == hash_key(key)
    again = actions.prepare_cold_boot(sandbox)
    assert again != key
    assert authenticate(again) is not None and authenticate(key) is None  # the old one is dead
    made = files_under(volume_of(sandbox))
    spec = actions.start_spec(sandbox, limits_for(sandbox.owner), image, again)
    assert spec.env["HERMIT_AI_KEY"] == again
    assert SandboxCredential.objects.get(sandbox=sandbox).key_hash == hash_key(again)
    assert files_under(volume_of(sandbox)) == made  # the build added nothing


def test_the_spec_carries_the_owners_plan_limits_as_a_value(image: RuntimeImage) -> None:
    user = make_user("pro-limits@example.com")
    pro = Plan.objects.get(slug="pro")
    Account.objects.filter(user=user).update(plan=pro)
    limits = limits_for(user)
    assert limits == SandboxLimits(
        plan_name="Pro",
        memory_mb=pro.memory_mb + pro.browser_memory_mb,  # the browser's share included
        cpu_millis=pro.cpu_millis,
        pids_max=pro.pids_max,
        internet=pro.internet,
        sleep_after=None,
        backup_interval=pro.backup_interval,
        backup_keep_last=pro.backup_keep_last,
        backup_keep_daily=pro.backup_keep_daily,
        backup_keep_weekly=pro.backup_keep_weekly,
        browser=True,
        browser_memory_mb=pro.browser_memory_mb,
    )
    assert limits.resources() == pro.limits()
    spec = actions.start_spec(Sandbox.objects.get(owner=user), limits, image, "hmk_x")
    resources = (spec.memory_mb, spec.cpu_millis, spec.pids_max, spec.internet, spec.browser)
    assert resources == pro.limits()
    assert json.loads(spec.files[config.CONFIG_PATH])["browser"]["enabled"] is True


def test_a_plan_change_tells_sandboxes_their_owners_limits_changed(
    django_capture_on_commit_callbacks: Any,
) -> None:
    user = make_user("moved@example.com")
    account = Account.objects.get(user=user)
    with django_capture_on_commit_callbacks() as callbacks:
        account.plan = Plan.objects.get(slug="pro")
        account.save()
    assert len(callbacks) == Sandbox.objects.filter(owner=user).count() == 1
    with django_capture_on_commit_callbacks() as callbacks:
        account.save()  # the same plan: nothing to apply
    assert callbacks == []


def calls_up_from_sandboxes(run: Any) -> list[tuple[str, str]]:
    """Run ``run()`` and return each (caller, callee) where code in sandboxes called a function
    of billing or the AI gateway, both as ``module.function``, in order."""
    seen: list[tuple[str, str]] = []

    def app(frame: Any) -> str:
        return str(frame.f_globals.get("__name__", "")).split(".")[0]

    def profile(frame: Any, event: str, arg: Any) -> None:
        caller = frame.f_back
        if event != "call" or caller is None or app(caller) != "sandboxes":
            return
        if app(frame) in ("billing", "ai_gateway"):
            seen.append(
                (
                    f"{caller.f_globals['__name__']}.{caller.f_code.co_name}",
                    f"{frame.f_globals['__name__']}.{frame.f_code.co_name}",
                )
            )

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return seen


def test_a_wake_goes_down_the_layers_and_up_only_through_registered_hooks(
    fake_backend: Any,
) -> None:
    """A chat's wake (``tasks_host.wake`` → ``actions.wake_sandbox`` → the backend) reaches
    billing and the AI gateway only through the functions they registered with sandboxes: the
    owner's limits (``sandboxes.limits``) and a fresh credential (``sandboxes.ai_keys``)."""
    from sandboxes import tasks_host

    user = make_user("wake-layers@example.com")
    sandbox = Sandbox.objects.get(owner=user)
    actions.provision_sandbox(sandbox)
    sandbox.refresh_from_db()
    actions.stop_sandbox(sandbox)
    assert sandbox.state == Sandbox.State.STOPPED

    edges = calls_up_from_sandboxes(lambda: tasks_host.wake(sandbox.pk, user.pk, "t-cold"))
    sandbox.refresh_from_db()
    assert sandbox.state == Sandbox.State.RUNNING, sandbox.error_message
    assert edges == [
        ("sandboxes.limits.limits_for", "billing.limits.sandbox_limits"),
        ("sandboxes.ai_keys.mint_key", "ai_gateway.credentials.rotate_credential"),
    ]
    assert SandboxCredential.objects.filter(sandbox=sandbox).exists()

    assert sleep.doze(sandbox)  # a thaw calls nothing above sandboxes
    edges = calls_up_from_sandboxes(lambda: tasks_host.wake(sandbox.pk, user.pk, "t-thaw"))
    sandbox.refresh_from_db()
    assert sandbox.state == Sandbox.State.RUNNING and edges == []


def test_the_warm_pool_runs_with_the_limits_a_new_account_gets() -> None:
    from billing.limits import limits_of
    from billing.models import default_plan
    from sandboxes.pool import pool_user

    owner = pool_user()
    Account.objects.filter(user=owner).update(plan=Plan.objects.get(slug="pro"))
    assert limits_for(owner) == limits_of(default_plan())
    assert limits_for(owner).plan_name == "Free"
