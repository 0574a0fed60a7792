"""Turn a Sandbox row into a backend SandboxSpec: config file, environment, limits.

Building a spec only computes a value: it writes nothing and mints nothing, so it may be
called any number of times. The side effects a start needs come first, as explicit steps of the
start (``sandboxes.actions``): the data dir's directories are made through ``safefs``
(the backend's ``prepare_volume``) and a fresh AI-gateway credential is minted
(``sandboxes.ai_keys.mint_key``); its plaintext is passed in here. The rendered config travels
in the spec (``SandboxSpec.files``) and the backend mounts it read-only outside the data dir.
The data dir is the sandbox's volume, where its backend says it is (``SandboxBackend.volume``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.conf import settings

from sandboxes import channel_config
from sandboxes.backends import get_backend
from sandboxes.backends.base import SandboxSpec
from sandboxes.limits import Resources
from sandboxes.models import RuntimeImage, Sandbox
from sandboxes.openclaw import config


def build_spec(
    sandbox: Sandbox, limits: Resources, image: RuntimeImage, *, ai_key: str
) -> SandboxSpec:
    """Return the spec to start the sandbox with ``limits`` on ``image``, its OpenClaw config
    (no secrets in it) and ``ai_key``, the AI-gateway credential minted for this start, in its
    environment. A warm-pool gateway (sandboxes.pool) has its secrets in its config instead,
    so that they can be replaced while it runs when it is given to a user (see ``config``).
    """
    from sandboxes.pool import is_pooled

    data_dir = data_dir_of(sandbox)
    if is_pooled(sandbox):
        text = config_text(
            sandbox, gateway_token=sandbox.gateway_token, ai_key=ai_key, browser=limits.browser
        )
        env = config.sandbox_env(
            data_dir=data_dir, gateway_token=None, ai_key=None, config_file=config.CONFIG_PATH
        )
    else:
        text = json.dumps(_rendered(sandbox, browser=limits.browser), indent=2)
        env = config.sandbox_env(
            data_dir=data_dir,
            gateway_token=sandbox.gateway_token,
            ai_key=ai_key,
            config_file=config.CONFIG_PATH,
            extra=channel_config.for_sandbox(sandbox).env,
        )
    return _spec(sandbox, limits, Path(image.path), env, {config.CONFIG_PATH: text})


def restore_spec(sandbox: Sandbox, limits: Resources, image: RuntimeImage) -> SandboxSpec:
    """Return the spec to restore the sandbox from a checkpoint: its limits, runtime and the
    read-only files' places. No secret is minted and nothing is written: the restored gateway
    keeps the environment it was checkpointed with, and its files (the config, with a warm-pool
    gateway's secrets in it) are the ones still in its run dir; ``files`` only names where
    they are mounted."""
    return _spec(sandbox, limits, Path(image.path), {}, {config.CONFIG_PATH: ""})


def config_text(sandbox: Sandbox, *, gateway_token: str, ai_key: str, browser: bool) -> str:
    """Return the sandbox's OpenClaw config with its two secrets written in: what a warm-pool
    gateway runs with, and what it is given, in place, when a user takes it. ``browser``: the
    plan allows the agent's browser."""
    rendered = config.with_secrets(
        _rendered(sandbox, browser=browser), gateway_token=gateway_token, ai_key=ai_key
    )
    return json.dumps(rendered, indent=2)


def browser_options() -> config.BrowserOptions:
    """The managed browser's settings, from ``HERMIT_BROWSER_*``."""
    return config.BrowserOptions(
        executable=settings.HERMIT_BROWSER_EXECUTABLE,
        allowed_hosts=tuple(settings.HERMIT_BROWSER_ALLOWED_HOSTS),
    )


def _rendered(sandbox: Sandbox, *, browser: bool) -> dict[str, Any]:
    rendered = config.render_config(
        data_dir=data_dir_of(sandbox),
        ai_gateway_port=settings.HERMIT_AI_GATEWAY_PORT,
        models=settings.HERMIT_SANDBOX_MODELS,
        default_model=settings.HERMIT_DEFAULT_MODEL,
        allowed_origins=[settings.SITE_URL],
        dreaming_schedule=dreaming_schedule(sandbox.pk),
        browser=browser_options() if browser else None,
    )
    from sandboxes.pool import is_pooled

    if not is_pooled(sandbox):  # a warm-pool gateway has no owner, so no channel yet
        rendered.update(channel_config.for_sandbox(sandbox).config)
    return rendered


def data_dir_of(sandbox: Sandbox) -> Path:
    """The sandbox's data dir: its volume, as its backend places it (computed, not made)."""
    return get_backend(sandbox.backend).volume(sandbox.pk)


def dreaming_schedule(sandbox_id: int) -> str:
    """A daily minute between 01:00 and 05:59 UTC, spread over sandboxes by id."""
    return f"{sandbox_id % 60} {1 + (sandbox_id // 60) % 5} * * *"


def _spec(
    sandbox: Sandbox,
    limits: Resources | None,
    runtime_dir: Path,
    env: dict[str, str],
    files: dict[str, str] | None = None,
) -> SandboxSpec:
    return SandboxSpec(
        sandbox_id=sandbox.pk,
        name=sandbox.slug,
        data_dir=data_dir_of(sandbox),
        runtime_dir=runtime_dir,
        env=env,
        memory_mb=limits.memory_mb if limits else 0,
        cpu_millis=limits.cpu_millis if limits else 0,
        pids_max=limits.pids_max if limits else 0,
        internet=limits.internet if limits else False,
        browser=limits.browser if limits else False,
        ai_gateway_port=settings.HERMIT_AI_GATEWAY_PORT,
        files=files or {},
    )


def minimal_spec(sandbox: Sandbox) -> SandboxSpec:
    """A spec good enough to stop, poll or inspect a running sandbox, built without the
    database or the runtime (which may be gone)."""
    return _spec(sandbox, None, Path("/nonexistent"), {})
