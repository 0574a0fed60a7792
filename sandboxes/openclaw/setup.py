"""Turn a Sandbox row into a backend SandboxSpec: config file, environment, limits.

Runs as root, before every start, on a data dir the sandbox controls. It writes nothing there:
the rendered config travels in the spec (``SandboxSpec.files``) and the backend mounts it
read-only outside the data dir; the data dir's directories are made through ``safefs``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.conf import settings

from billing.models import Plan
from sandboxes.backends.base import SandboxSpec
from sandboxes.models import RuntimeImage, Sandbox
from sandboxes.openclaw import config


def build_spec(sandbox: Sandbox, plan: Plan, image: RuntimeImage) -> SandboxSpec:
    """Return the spec to start the sandbox, with its OpenClaw config (no secrets in it).

    Makes the data dir's directories. Mints a fresh AI-gateway credential for this start: only
    its hash is stored, and the plaintext lives only in the gateway's environment. A warm-pool
    gateway (sandboxes.pool) has its secrets in its config instead, so that they can be
    replaced while it runs when it is given to a user (see ``config``).
    """
    from billing.ai_gateway.credentials import rotate_credential
    from sandboxes.pool import is_pooled

    data_dir = sandbox.data_dir
    config.prepare_data_dir(data_dir)
    ai_key = rotate_credential(sandbox)
    if is_pooled(sandbox):
        text = config_text(sandbox, gateway_token=sandbox.gateway_token, ai_key=ai_key)
        env = config.sandbox_env(
            data_dir=data_dir, gateway_token=None, ai_key=None, config_file=config.CONFIG_PATH
        )
    else:
        text = json.dumps(_rendered(sandbox), indent=2)
        env = config.sandbox_env(
            data_dir=data_dir,
            gateway_token=sandbox.gateway_token,
            ai_key=ai_key,
            config_file=config.CONFIG_PATH,
        )
    return _spec(sandbox, plan, Path(image.path), env, {config.CONFIG_PATH: text})


def restore_spec(sandbox: Sandbox, plan: Plan, image: RuntimeImage) -> SandboxSpec:
    """Return the spec to restore the sandbox from a checkpoint: its limits, runtime and the
    read-only files' places. No secret is minted and nothing is written: the restored gateway
    keeps the environment it was checkpointed with, and its files (the config, with a warm-pool
    gateway's secrets in it) are the ones still in its run dir; ``files`` only names where
    they are mounted."""
    return _spec(sandbox, plan, Path(image.path), {}, {config.CONFIG_PATH: ""})


def config_text(sandbox: Sandbox, *, gateway_token: str, ai_key: str) -> str:
    """Return the sandbox's OpenClaw config with its two secrets written in: what a warm-pool
    gateway runs with, and what it is given, in place, when a user takes it."""
    rendered = config.with_secrets(_rendered(sandbox), gateway_token=gateway_token, ai_key=ai_key)
    return json.dumps(rendered, indent=2)


def _rendered(sandbox: Sandbox) -> dict[str, Any]:
    return config.render_config(
        data_dir=sandbox.data_dir,
        ai_gateway_port=settings.HERMIT_AI_GATEWAY_PORT,
        models=settings.HERMIT_SANDBOX_MODELS,
        default_model=settings.HERMIT_DEFAULT_MODEL,
        allowed_origins=[settings.SITE_URL],
        dreaming_schedule=dreaming_schedule(sandbox.pk),
    )


def dreaming_schedule(sandbox_id: int) -> str:
    """A daily minute between 01:00 and 05:59 UTC, spread over sandboxes by id."""
    return f"{sandbox_id % 60} {1 + (sandbox_id // 60) % 5} * * *"


def _spec(
    sandbox: Sandbox,
    plan: Plan | None,
    runtime_dir: Path,
    env: dict[str, str],
    files: dict[str, str] | None = None,
) -> SandboxSpec:
    return SandboxSpec(
        sandbox_id=sandbox.pk,
        name=sandbox.slug,
        data_dir=sandbox.data_dir,
        runtime_dir=runtime_dir,
        env=env,
        memory_mb=plan.memory_mb if plan else 0,
        cpu_millis=plan.cpu_millis if plan else 0,
        pids_max=plan.pids_max if plan else 0,
        internet=plan.internet if plan else False,
        ai_gateway_port=settings.HERMIT_AI_GATEWAY_PORT,
        files=files or {},
    )


def minimal_spec(sandbox: Sandbox) -> SandboxSpec:
    """A spec good enough to stop, poll or inspect a running sandbox, built without the
    database or the runtime (which may be gone)."""
    return _spec(sandbox, None, Path("/nonexistent"), {})
