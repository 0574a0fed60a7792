"""Data volumes kept as directories on this host: what the local and fake backends share.

Sandbox ``N``'s volume is ``<HERMIT_DATA_DIR>/sandboxes/N`` (the setting read at each call, so a
test's settings apply), or ``<root>/N`` for a backend given its own root. Everything in it is
the sandbox's: it is made and removed through ``safefs``, which follows no link.

Each volume has an owner: the host that last prepared it (``<root>/.owners/N``, root's, out of
every sandbox's reach). Hosts should each have their own data dir, but one shared by several
(a network mount) must not make a host that fences what moved away from it (sandboxes.fencing)
take a volume another host now uses for the same sandbox: :func:`present` with a host lists
only the volumes that host owns (or that no host claimed: made before owners were kept).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from pathlib import Path

from sandboxes.backends import safefs

OWNERS = ".owners"


def default_root() -> Path:
    """``<HERMIT_DATA_DIR>/sandboxes`` (``var/sandboxes`` without Django settings)."""
    data_dir = "var"
    try:
        from django.conf import settings

        if settings.configured or os.environ.get("DJANGO_SETTINGS_MODULE"):
            data_dir = str(getattr(settings, "HERMIT_DATA_DIR", data_dir))
    except ImportError:
        pass
    return Path(data_dir) / "sandboxes"


def path(root: Path | None, sandbox_id: int) -> Path:
    if isinstance(sandbox_id, bool) or not isinstance(sandbox_id, int) or sandbox_id < 0:
        raise ValueError(f"not a sandbox id: {sandbox_id!r}")
    return (root or default_root()) / str(sandbox_id)


def this_host() -> str:
    """This machine's host name (HERMIT_HOST_NAME), as sandboxes.hosts names it."""
    try:
        from django.conf import settings

        if settings.configured:
            return str(settings.HERMIT_HOST_NAME)
    except ImportError:
        pass
    return socket.gethostname()


def _owner_file(volume: Path) -> Path:
    return volume.parent / OWNERS / volume.name


def claim(volume: Path, host: str) -> None:
    """Record ``host`` as the owner of ``volume`` (atomically replacing the record)."""
    record = _owner_file(volume)
    record.parent.mkdir(mode=0o700, exist_ok=True)
    partial = record.with_name(f".{record.name}.new")
    partial.write_text(host)
    os.replace(partial, record)


def owner(volume: Path) -> str | None:
    """The host recorded as ``volume``'s owner, or None if none is."""
    try:
        return _owner_file(volume).read_text().strip() or None
    except FileNotFoundError:
        return None


def present(root: Path | None, host: str | None = None) -> set[int]:
    """The sandbox ids that have a volume under ``root`` (default :func:`default_root`); with
    ``host``, only those it owns or no host claimed."""
    root = root or default_root()
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return set()
    found = {
        int(entry.name)
        for entry in entries
        if entry.name.isascii() and entry.name.isdigit() and entry.is_dir(follow_symlinks=False)
    }
    if host is None:
        return found
    return {i for i in found if owner(root / str(i)) in (None, host)}


def prepare(volume: Path, subdirs: Iterable[str] = ()) -> Path:
    """Make ``volume`` (and its parents) and each of ``subdirs`` in it; return ``volume``."""
    volume.mkdir(parents=True, exist_ok=True)
    claim(volume, this_host())
    names = list(subdirs)
    if names:
        safefs.make_subdirs(volume, names)
    return volume


def remove(volume: Path) -> None:
    """Delete ``volume`` and everything in it, following no link, then its owner record; a
    missing one is no error."""
    safefs.remove_tree(volume)
    _owner_file(volume).unlink(missing_ok=True)
