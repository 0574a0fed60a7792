"""Turn a Sandbox row into a backend SandboxSpec: config file, environment, limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings

from billing.models import Plan
from sandboxes.backends.base import SandboxSpec
from sandboxes.models import RuntimeImage, Sandbox


def build_spec(sandbox: Sandbox, plan: Plan, image: RuntimeImage) -> SandboxSpec:
    """Write the sandbox's OpenClaw config (no secrets in it) and return the spec to start it."""
    env: dict[str, str] = {"OPENCLAW_GATEWAY_TOKEN": sandbox.gateway_token}
    return SandboxSpec(
        sandbox_id=sandbox.pk,
        name=sandbox.slug,
        data_dir=sandbox.data_dir,
        runtime_dir=Path(image.path),
        env=env,
        memory_mb=plan.memory_mb,
        cpu_millis=plan.cpu_millis,
        pids_max=plan.pids_max,
        internet=plan.internet,
        ai_gateway_port=settings.HERMIT_AI_GATEWAY_PORT,
    )


def minimal_spec(sandbox: Sandbox) -> SandboxSpec:
    """A spec good enough to stop, poll or inspect a sandbox whose runtime is gone."""
    extra: dict[str, Any] = {}
    return SandboxSpec(
        sandbox_id=sandbox.pk, name=sandbox.slug, data_dir=sandbox.data_dir,
        runtime_dir=Path("/nonexistent"), env={}, memory_mb=0, cpu_millis=0, extra=extra,
    )
