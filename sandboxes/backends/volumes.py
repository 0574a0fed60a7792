"""Data volumes kept as directories on this host: what the local and fake backends share.

Sandbox ``N``'s volume is ``<HERMIT_DATA_DIR>/sandboxes/N`` (the setting read at each call, so a
test's settings apply), or ``<root>/N`` for a backend given its own root. Everything in it is
the sandbox's: it is made and removed through ``safefs``, which follows no link.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from sandboxes.backends import safefs


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


def present(root: Path | None) -> set[int]:
    """The sandbox ids that have a volume under ``root`` (default :func:`default_root`)."""
    try:
        entries = list(os.scandir(root or default_root()))
    except FileNotFoundError:
        return set()
    return {
        int(entry.name)
        for entry in entries
        if entry.name.isascii() and entry.name.isdigit() and entry.is_dir(follow_symlinks=False)
    }


def prepare(volume: Path, subdirs: Iterable[str] = ()) -> Path:
    """Make ``volume`` (and its parents) and each of ``subdirs`` in it; return ``volume``."""
    volume.mkdir(parents=True, exist_ok=True)
    names = list(subdirs)
    if names:
        safefs.make_subdirs(volume, names)
    return volume


def remove(volume: Path) -> None:
    """Delete ``volume`` and everything in it, following no link; a missing one is no error."""
    safefs.remove_tree(volume)
