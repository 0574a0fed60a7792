"""Render the OpenClaw gateway config and environment for one sandbox.

The config is plain JSON (OpenClaw reads JSON5, a superset). Secrets never appear in it: the
gateway token and the AI gateway credential are written as ``${OPENCLAW_GATEWAY_TOKEN}`` and
``${HERMIT_AI_KEY}``, which OpenClaw substitutes from its environment at load time; the values
travel only in the environment built by ``sandbox_env``. OpenClaw refuses to start on unknown keys,
so every key here is one the pinned version (2026.9.6) accepts.

The config file is not in the data dir: the sandbox owns that directory and could plant links
there for root to follow. ``build_spec`` hands the rendered text to the backend as a read-only file
at ``CONFIG_PATH`` (``SandboxSpec.files``); the gateway reads it through ``OPENCLAW_CONFIG_PATH``
and cannot change it (OpenClaw keeps devices, approvals and cron jobs in SQLite under its state
dir, so it runs with a read-only config; ``openclaw config set`` inside the sandbox fails).

A warm-pool gateway (sandboxes.pool) is the exception: it is started before anyone owns it, and
handed to a user by giving it new secrets while it runs. A running process's environment cannot
change, so its two secrets are written into the config (``with_secrets``), and root rewrites the
file in place, outside the sandbox, at assignment: OpenClaw watches its config and hot-applies a
new ``gateway.auth.token`` and provider ``apiKey`` in about a second, without a restart. The file
stays root's, readable only by the sandbox's uid (which can read the environment of its gateway
all the same); its next cold start goes back to the environment.

The browser (``browser_config``): a plan with the browser on gets OpenClaw's managed browser, a
headless Debian Chromium that the gateway launches inside the same sandbox on the browser tool's
first use (not with the agent). Its DevTools port is on the sandbox's own loopback, in its own
network namespace, so only that sandbox's processes reach it; its profile (``user-data-dir``)
is OpenClaw's, under the state dir, so cookies and log-ins survive sleep and backups; its HTTP
disk cache goes to ``cache/``, which backups skip. Chromium's own sandbox cannot nest in the
bubblewrap one (no user namespaces there), hence ``noSandbox``: the sandbox around it is the
wall. A plan without the browser gets ``browser.enabled: false`` and the browser plugin off, so
the agent has no browser tool at all.

Inside the sandbox the gateway binds loopback. The portal reaches it through the backend's port
forward (pasta splices host-loopback connections onto the sandbox's loopback), so the gateway sees
the portal as a loopback client: with the shared token such a client is auto-approved as a device.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandboxes.backends import safefs

PROVIDER_ID = "hermit"
STATE_SUBDIR = "state"
AGENT_ID = "main"
CONFIG_PATH = "/etc/openclaw/openclaw.json"  # inside the sandbox: read-only, outside the data dir
SUBDIRS = ("home", "tmp", "logs", "cache", STATE_SUBDIR)
BROWSER_PROFILE = "openclaw"  # OpenClaw's managed profile: <state>/browser/openclaw/user-data
BROWSER_CDP_PORT = 18800  # on the sandbox's own loopback; OpenClaw's first managed CDP port


@dataclass(frozen=True)
class ModelInfo:
    """One model the AI gateway offers to the sandbox."""

    id: str
    name: str = ""
    context_window: int = 128_000
    max_tokens: int = 8_192
    input: tuple[str, ...] = ("text",)

    def as_config(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name or self.id,
            "contextWindow": self.context_window,
            "maxTokens": self.max_tokens,
            "input": list(self.input),
        }


def state_dir(data_dir: Path) -> Path:
    """Return OpenClaw's state directory (OPENCLAW_STATE_DIR) inside a sandbox's data dir."""
    return Path(data_dir) / STATE_SUBDIR


def config_path(data_dir: Path) -> Path:
    """Return OpenClaw's default config path, ``$OPENCLAW_STATE_DIR/openclaw.json``.

    Only for a gateway run outside a sandbox (benches, tests): a sandbox reads ``CONFIG_PATH``.
    """
    return state_dir(data_dir) / "openclaw.json"


def render_config(
    *,
    data_dir: Path,
    ai_gateway_port: int,
    models: Sequence[ModelInfo | str],
    default_model: str | None = None,
    gateway_port: int = 18789,
    allowed_origins: Sequence[str] = (),
    trusted_proxies: Sequence[str] = (),
    chat_completions_endpoint: bool = False,
    dreaming_schedule: str | None = None,
    browser: BrowserOptions | None = None,
) -> dict[str, Any]:
    """Return the OpenClaw config (a JSON-serialisable dict) for one sandbox.

    ``dreaming_schedule`` (a cron expression) moves OpenClaw's daily memory-dreaming job off its
    default 03:00 UTC, so that sleeping agents, each woken for its own jobs, do not all wake at
    the same minute.

    ``browser`` (see :func:`browser_config`) turns the managed browser on; without it the agent
    has no browser tool.

    ``data_dir`` is the sandbox's data directory as the gateway sees it (the local backend mounts
    it at the same path inside the sandbox). ``models`` lists the model ids the AI gateway serves;
    ``default_model`` (default: the first) becomes the agent's primary model. Raises ValueError if
    no model is given or the default is not among them.
    """
    infos = [m if isinstance(m, ModelInfo) else ModelInfo(id=m) for m in models]
    if not infos:
        raise ValueError("render_config needs at least one model")
    primary = default_model or infos[0].id
    if primary not in {m.id for m in infos}:
        raise ValueError(f"default model {primary!r} is not in the model list")
    state = state_dir(data_dir)
    gateway: dict[str, Any] = {
        "mode": "local",
        "bind": "loopback",
        "port": gateway_port,
        "auth": {"mode": "token", "token": "${OPENCLAW_GATEWAY_TOKEN}"},
        "controlUi": {"allowedOrigins": list(allowed_origins)},
    }
    if trusted_proxies:
        gateway["trustedProxies"] = list(trusted_proxies)
    if chat_completions_endpoint:
        gateway["http"] = {"endpoints": {"chatCompletions": {"enabled": True}}}
    rendered: dict[str, Any] = {
        "gateway": gateway,
        "models": {
            "providers": {
                PROVIDER_ID: {
                    "baseUrl": f"http://127.0.0.1:{ai_gateway_port}/ai/v1",
                    "api": "openai-completions",
                    "apiKey": "${HERMIT_AI_KEY}",
                    "models": [m.as_config() for m in infos],
                }
            }
        },
        "agents": {
            "defaults": {
                "model": {"primary": f"{PROVIDER_ID}/{primary}"},
                "workspace": str(state / "workspace"),
                "skipBootstrap": True,
                "heartbeat": {"every": "0m"},
            }
        },
        "logging": {"file": str(Path(data_dir) / "logs" / "openclaw.log")},
    }
    entries: dict[str, Any] = {}
    if dreaming_schedule:
        entries["memory-core"] = {"config": {"dreaming": {"frequency": dreaming_schedule}}}
    rendered["browser"] = browser_config(data_dir, browser)
    if browser is None:
        entries["browser"] = {"enabled": False}  # no browser tool, CLI or control service
    if entries:
        rendered["plugins"] = {"entries": entries}
    return rendered


@dataclass(frozen=True)
class BrowserOptions:
    """The managed browser's settings that are not the same for every sandbox.

    ``executable`` is the Chromium binary itself (Debian's ``/usr/bin/chromium`` is a shell
    wrapper that sources ``/etc/chromium.d``, which the sandbox does not mount).
    ``allowed_hosts`` are host names (or addresses) on private networks that OpenClaw's own
    navigation check lets the browser open; by default it refuses every private address.
    """

    executable: str
    allowed_hosts: tuple[str, ...] = ()


def browser_config(data_dir: Path, options: BrowserOptions | None) -> dict[str, Any]:
    """Return OpenClaw's ``browser`` block: the managed, headless Chromium of ``options``, or
    ``{"enabled": False}`` for None."""
    if options is None:
        return {"enabled": False}
    block: dict[str, Any] = {
        "enabled": True,
        "headless": True,
        "noSandbox": True,  # no user namespaces in the sandbox: bubblewrap is the sandbox
        "attachOnly": False,
        "executablePath": options.executable,
        "defaultProfile": BROWSER_PROFILE,
        # Declared, so OpenClaw never writes a chosen port into the (read-only) config.
        "profiles": {BROWSER_PROFILE: {"cdpPort": BROWSER_CDP_PORT}},
        "extraArgs": [
            f"--disk-cache-dir={Path(data_dir) / 'cache' / 'chromium'}",
            "--disable-crash-reporter",
            "--disable-breakpad",
        ],
    }
    if options.allowed_hosts:
        block["ssrfPolicy"] = {"allowedHostnames": list(options.allowed_hosts)}
    return block


def with_secrets(rendered: dict[str, Any], *, gateway_token: str, ai_key: str) -> dict[str, Any]:
    """Return a copy of ``rendered`` (from :func:`render_config`) with the gateway token and the
    AI gateway credential written in, in place of the environment references."""
    if not gateway_token or not ai_key:
        raise ValueError("with_secrets needs a gateway token and an AI gateway credential")
    copied: dict[str, Any] = json.loads(json.dumps(rendered))
    copied["gateway"]["auth"]["token"] = gateway_token
    copied["models"]["providers"][PROVIDER_ID]["apiKey"] = ai_key
    return copied


def sandbox_env(
    *,
    data_dir: Path,
    gateway_token: str | None,
    ai_key: str | None,
    config_file: str | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """Return the gateway's environment: paths inside the data dir, the two secrets, quiet flags.

    ``gateway_token`` and ``ai_key`` are None for a gateway whose config holds them
    (:func:`with_secrets`): its environment then has no secret at all.

    Every writable path is inside ``data_dir`` (the sandbox's only persistent writable
    directory), so nothing the gateway writes escapes it except lock files under the sandbox's
    private /tmp. ``config_file`` (a sandbox passes ``CONFIG_PATH``) becomes
    ``OPENCLAW_CONFIG_PATH``; without it OpenClaw reads ``config_path(data_dir)``.
    """
    data_dir = Path(data_dir)
    env = {
        "HOME": str(data_dir / "home"),
        "OPENCLAW_STATE_DIR": str(state_dir(data_dir)),
        "TMPDIR": str(data_dir / "tmp"),
        "NODE_COMPILE_CACHE": str(data_dir / "cache" / "node-compile-cache"),
        "OPENCLAW_DISABLE_BONJOUR": "1",
        "OPENCLAW_NO_AUTO_UPDATE": "1",
        "OPENCLAW_OFFLINE": "1",
        "NO_COLOR": "1",
        "LANG": "C.UTF-8",
        "TZ": "UTC",
    }
    if gateway_token is not None:
        env["OPENCLAW_GATEWAY_TOKEN"] = gateway_token
    if ai_key is not None:
        env["HERMIT_AI_KEY"] = ai_key
    if config_file:
        env["OPENCLAW_CONFIG_PATH"] = config_file
    env.update(extra or {})
    return env


def prepare_data_dir(data_dir: Path) -> None:
    """Create the directories ``sandbox_env`` points at (the gateway does not create them all).

    Runs as root on a directory the sandbox controls, so through ``safefs``: a link the sandbox
    left in place of one of them is removed, never followed.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    safefs.make_subdirs(data_dir, SUBDIRS)
