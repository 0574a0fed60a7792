"""Root never follows a link that a sandbox planted in its own data dir.

The agent can run any command as its sandbox user, so it can plant symlinks (to files, to
directories, dangling, relative ``..`` ones) anywhere in its data dir and then get restarted
(crash its gateway, sleep and wake). Before every start root prepares that dir: it makes the
gateway's directories, hands the tree to the sandbox uid, and (before this was fixed) wrote the
OpenClaw config there. ``stats()`` walks it to measure its size. Each test plants links through
the backend's ``exec`` (exactly what the agent can do), restarts the sandbox through the real
actions, and checks that root-owned host files outside the data dir kept their bytes, mode and
owner, and that nothing appeared at a dangling link's target.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandboxes import actions
from sandboxes.backends import get_backend, safefs
from sandboxes.backends.base import ExecResult
from sandboxes.models import Sandbox
from tests.fixtures.backend import volume_of

pytestmark = pytest.mark.django_db(transaction=True)
EMAIL = "mallory@containment.test"
PASSWD = b"root:x:0:0:root:/root:/bin/bash\n"
BIG = 32 * 1024 * 1024


@pytest.fixture
def victim(settings: Any) -> Iterator[Path]:
    """Root-owned host files next to the sandboxes' data dirs: ``passwd``, ``sub/big``, ``hard``."""
    root = Path(settings.HERMIT_DATA_DIR) / "sandboxes" / f"victim-{secrets.token_hex(4)}"
    (root / "sub").mkdir(parents=True)
    (root / "passwd").write_bytes(PASSWD)
    os.chmod(root / "passwd", 0o644)
    (root / "sub" / "big").write_bytes(b"\1" * BIG)
    (root / "hard").write_bytes(b"root's own\n")
    os.chmod(root / "hard", 0o600)
    yield root
    shutil.rmtree(root)


def fingerprint(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """(mode, uid, gid, sha256 of the bytes) of every entry under ``root``, links not followed."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in ["", *dirnames, *filenames]:
            path = Path(dirpath, name)
            st = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
            found[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, digest)
    return found


def du(path: Path) -> int:
    out = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True)
    return int(out.stdout.split()[0])


def as_sandbox(sandbox: Sandbox, script: str) -> ExecResult:
    """Run a shell script inside the sandbox, as its user, in its data dir."""
    backend = get_backend(sandbox.backend)
    return backend.exec(actions.spec_for(sandbox), sandbox.backend_state, ["sh", "-c", script])


def restart(sandbox: Sandbox) -> None:
    """Stop and start the sandbox as the product does (a failed start is checked later)."""
    for _ in actions.restart_sandbox(sandbox):
        pass
    sandbox.refresh_from_db()


# Each plant is a shell script run in the data dir; $V is the victim dir (absolute), $R its
# name (for relative links).
PLANTS = {
    # The config temp file root wrote before every start, pointed at a host file; a dangling
    # link where root used to create files; file and directory links deep in the tree the
    # chown walk and the size walk go through.
    "file-links": """
        ln -s "$V/passwd" state/openclaw.tmp
        ln -sf "$V/created-file" state/openclaw.json
        ln -s "$V/passwd" tmp/evil
        mkdir -p state/workspace/deep
        ln -s "$V/sub" state/workspace/deep/host-dir
        ln -s "$V/created-dir" state/workspace/deep/gone
        ln -s "$V/passwd" state/workspace/deep/host-file
    """,
    # A relative ``..`` link out of the data dir, dangling inside the sandbox (it cannot see
    # the victim) but not for root on the host.
    "relative-dangling": """
        ln -s "../../$R/created-by-root" state/openclaw.tmp
    """,
    # Directories root prepares, swapped for links: absolute, relative and dangling.
    "dir-links": """
        mv state state.real && ln -s "$V" state
        mv home home.real && ln -s "../$R" home
        mv logs logs.real && ln -s "$V/sub" logs
        mv cache cache.real && ln -s "$V/created-dir" cache
    """,
}


@pytest.mark.parametrize("kind", sorted(PLANTS))
def test_it_leaves_host_files_alone_when_a_sandbox_plants_links(
    sandbox_for: Callable[..., Sandbox], sandbox_pool: Any, victim: Path, kind: str
) -> None:
    sandbox = sandbox_for(EMAIL)
    data = volume_of(sandbox)
    backend = get_backend(sandbox.backend)
    before = fingerprint(victim)
    planted = as_sandbox(sandbox, f'V="{victim}"; R="{victim.name}"; set -e; {PLANTS[kind]}')
    assert planted.exit_code == 0, planted.stderr
    # A copied or restored tree could hold a hard link to a host file (a sandbox cannot make
    # one: see test_it_cannot_hard_link_a_host_file); the chown walk must not give it away.
    os.link(victim / "hard", data / "hard")
    try:
        restart(sandbox)
        assert fingerprint(victim) == before
        for name in ("created-file", "created-dir", "created-by-root", "openclaw.json"):
            assert not (victim / name).exists(), name
        assert sandbox.state == Sandbox.State.RUNNING, sandbox.error_message
        sandbox_pool.snapshot(EMAIL)
        # du does not follow links either; the gap is directories' own blocks and the freshly
        # started gateway's live writes, so du is read on both sides of the walk.
        low = du(data)
        size = backend.stats(actions.spec_for(sandbox), sandbox.backend_state).disk_bytes
        high = du(data)
        assert min(low, high) - BIG // 4 < size < max(low, high) + BIG // 4, (
            "the size walk followed a link to the host"
        )
        for sub in ("state", "home", "logs", "cache", "tmp"):
            assert (data / sub).is_dir() and not (data / sub).is_symlink(), sub
        assert (data / "hard").stat().st_uid == 0
    finally:
        (data / "hard").unlink()
        if backend.poll(actions.spec_for(sandbox), sandbox.backend_state).running:
            as_sandbox(sandbox, "rm -rf *.real state/openclaw.* tmp/evil state/workspace/deep")


def test_it_cannot_hard_link_a_host_file(sandbox_for: Callable[..., Sandbox]) -> None:
    sandbox = sandbox_for(EMAIL)
    result = as_sandbox(sandbox, "ln /usr/bin/passwd hard-link; ln /etc/passwd hard-link")
    assert result.exit_code != 0
    assert result.stderr.count("Invalid cross-device link") == 2, result.stderr
    assert not (volume_of(sandbox) / "hard-link").exists()


def test_it_walks_a_planted_tree_without_following_or_opening_anything(tmp_path: Path) -> None:
    """The same rules, on the helpers themselves, with links and a FIFO a walk must not open."""
    outside, tree = tmp_path / "outside", tmp_path / "tree"
    (outside / "dir").mkdir(parents=True)
    (outside / "dir" / "big").write_bytes(b"\1" * BIG)
    (tree / "deep").mkdir(parents=True)
    (tree / "deep" / "own").write_bytes(b"\2" * 8192)
    os.mkfifo(tree / "deep" / "fifo")  # opening it for reading would block forever
    (tree / "deep" / "dir-link").symlink_to(outside / "dir")
    (tree / "deep" / "up-link").symlink_to("../../outside/dir")
    (tree / "home").symlink_to(outside / "dir")
    (tree / "logs").symlink_to(outside / "made-by-root")
    before = fingerprint(outside)

    safefs.make_subdirs(tree, ["home", "logs", "tmp"])
    safefs.chown_tree(tree, 4242, 4242, root_mode=0o700)
    size = safefs.disk_usage(tree)

    assert fingerprint(outside) == before
    assert not (outside / "made-by-root").exists()
    for name in ("home", "logs", "tmp"):
        assert (tree / name).is_dir() and not (tree / name).is_symlink()
    owners = {(p.lstat().st_uid, p.lstat().st_gid) for p in [tree, *tree.rglob("*")]}
    assert owners == {(4242, 4242)}
    assert (tree.stat().st_mode & 0o777) == 0o700
    assert 8192 <= size < BIG // 2
