"""The throwaway world bench/wake.py measures in: data dir, database, model, AI gateway, cleanup.

Everything lives in a fresh directory below the settings' data dir (which sandbox uids can
enter wherever the checkout is): the SQLite database, the file cache and Celery broker (no
worker reads it), the sandboxes' data and run dirs and the checkpoint images. The sandboxes get
a cgroup parent and a uid range of their own, so a portal or a test run on the same machine is
never touched. The runtime image is the one the settings name (found built, not rebuilt).
"""

from __future__ import annotations

import contextlib
import os
import runpy
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CGROUP_ROOT = Path("/sys/fs/cgroup")


def configure(run_id: str, redis_url: str = "") -> Path:
    """Point Django at a new throwaway data dir and migrate its database; return the dir.
    With ``redis_url``, Redis is the cache, broker and channel layer (as in production)."""
    from cryptography.fernet import Fernet

    for name in ("DATABASE_URL", "REDIS_URL"):
        os.environ.pop(name, None)  # SQLite, file cache and file broker in the temp dir
    if redis_url:
        os.environ["REDIS_URL"] = redis_url
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "portal.settings",
            "DEBUG": "False",
            "SECRET_KEY": secrets.token_urlsafe(40),
            "HERMIT_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
            "ALLOWED_HOSTS": "127.0.0.1",
            "SECURE_SSL_REDIRECT": "False",
            "HERMIT_AUTO_PROVISION": "False",
        }
    )
    for name in ("HERMIT_DATA_DIR", "HERMIT_RUNTIME_DIR", "HERMIT_CHECKPOINT_DIR"):
        os.environ.pop(name, None)
    defaults = runpy.run_path(str(ROOT / "portal" / "settings.py"))
    base = Path(defaults["HERMIT_DATA_DIR"]) / "bench"
    base.mkdir(exist_ok=True)
    os.chmod(base, 0o711)  # sandbox uids traverse it to their data dirs
    tmp = Path(tempfile.mkdtemp(prefix=f"wake-{run_id}-", dir=base))
    os.chmod(tmp, 0o711)
    os.environ.update(
        {
            "HERMIT_DATA_DIR": str(tmp),
            "HERMIT_RUNTIME_DIR": str(defaults["HERMIT_RUNTIME_DIR"]),
            "HERMIT_CHECKPOINT_DIR": str(tmp / "checkpoints"),
            "HERMIT_CGROUP_PARENT": f"hermit-bench-{run_id}",
            # Above every uid range a portal (200,000 + k * 100,000, k < 64) or a test run
            # (300,000 + n * 1,000) uses, so no sandbox here shares a uid with one of theirs.
            "HERMIT_UID_BASE": str(7_000_000 + (os.getpid() % 1000) * 1000),
            "HERMIT_WARM_POOL_SIZE": "0",
        }
    )
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    return tmp


@contextlib.contextmanager
def model_and_gateway() -> Iterator[Any]:
    """Run the fake model (OpenAI streaming format) and the AI gateway app in this process,
    route every model to the fake, lift the free plan's request limits (they would throttle the
    bench's many chat turns, not what it measures) and make the built runtime current.
    Yields the fake model server."""
    from django.conf import settings

    from ai_gateway.asgi import application
    from ai_gateway.models import ModelRoute, Upstream
    from billing.models import Plan, ensure_standard_plans
    from sandboxes import runtime
    from tests.fakes.model_server import FakeModelServer
    from tests.fixtures.model import ThreadedASGIServer

    runtime.build()  # finds the built image (settings.HERMIT_RUNTIME_DIR); never rebuilds it
    ensure_standard_plans()
    Plan.objects.update(requests_per_minute=0, monthly_token_quota=0, monthly_spend_limit=0)
    model = FakeModelServer().start()
    gateway = ThreadedASGIServer(application, lifespan="on").start()
    try:
        settings.HERMIT_AI_GATEWAY_PORT = gateway.port
        upstream, _ = Upstream.objects.update_or_create(
            name="fake-openai",
            defaults={
                "provider": "openai-compatible",
                "base_url": model.url + "/v1",
                "api_key": "sk-bench-operator",
                "is_operator": True,
            },
        )
        ModelRoute.objects.get_or_create(pattern="*", upstream=upstream)
        yield model
    finally:
        gateway.stop()
        model.stop()
        from ai_gateway import db

        db.close_all()


def stop_everything() -> list[str]:
    """Stop every gateway this bench started (pooled ones too) and remove their cgroups.
    Return what could not be stopped cleanly (they are killed all the same)."""
    from django.conf import settings

    from sandboxes.backends import cgroups, get_backend
    from sandboxes.models import Sandbox
    from sandboxes.openclaw.setup import minimal_spec

    problems: list[str] = []
    with contextlib.suppress(Exception):  # the database may be the thing that failed
        for sandbox in Sandbox.objects.exclude(backend_state={}):
            backend = get_backend(sandbox.backend)
            spec = minimal_spec(sandbox)
            try:
                backend.thaw(spec, sandbox.backend_state)  # a frozen gateway ignores SIGTERM
                backend.stop(spec, sandbox.backend_state, timeout=5)
            except Exception as exc:
                problems.append(f"{sandbox.slug}: {exc}")
    parent = str(settings.HERMIT_CGROUP_PARENT)
    unified = (CGROUP_ROOT / "cgroup.controllers").exists()
    tops = (
        [CGROUP_ROOT / parent]
        if unified
        else [CGROUP_ROOT / c / parent for c in cgroups.V1_CONTROLLERS]
    )
    names = {p.name for top in tops if top.is_dir() for p in top.iterdir() if p.is_dir()}
    for name in sorted(names):
        paths = (
            {"unified": str(CGROUP_ROOT / parent / name)}
            if unified
            else {
                c: str(CGROUP_ROOT / c / parent / name)
                for c in cgroups.V1_CONTROLLERS
                if (CGROUP_ROOT / c / parent / name).is_dir()
            }
        )
        if cgroups.pids(paths):
            problems.append(f"cgroup {name} still had processes: killed")
        with contextlib.suppress(cgroups.CgroupError, OSError):
            cgroups.thaw(paths)
            cgroups.kill_all(paths)
            cgroups.remove(paths)
    for top in tops:
        with contextlib.suppress(OSError):
            top.rmdir()
    return problems


def remove_data_dir(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)  # fd-based: never follows a sandbox's links
