"""Runtime images: which built Node + OpenClaw directory sandboxes start from.

Upgrading is a new build made current; rolling back is making an older build current again.
Sandboxes move to the current image on their next start.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from django.conf import settings
from django.db import transaction

from sandboxes.models import RuntimeImage


class RuntimeMissing(Exception):
    """No runtime image is built; the message says how to build one."""


def runtime_root() -> Path:
    return Path(settings.HERMIT_RUNTIME_DIR)


def current_image() -> RuntimeImage:
    """Return the current ready image. Raise RuntimeMissing if none is built or it is gone."""
    image = RuntimeImage.objects.filter(is_current=True, status=RuntimeImage.Status.READY).first()
    if image is None:
        raise RuntimeMissing(
            "The OpenClaw runtime is not built yet. Run `python manage.py build_runtime`."
        )
    if not Path(image.path).is_dir():
        raise RuntimeMissing(
            f"The runtime directory {image.path} is missing. Run `python manage.py build_runtime`."
        )
    return image


@transaction.atomic
def make_current(image: RuntimeImage) -> None:
    """Make ``image`` the one sandboxes start from next (upgrade or rollback)."""
    if image.status != RuntimeImage.Status.READY:
        raise ValueError("Only a ready runtime image can be made current.")
    RuntimeImage.objects.filter(is_current=True).exclude(pk=image.pk).update(is_current=False)
    RuntimeImage.objects.filter(pk=image.pk).update(is_current=True)
    image.is_current = True


def build(
    openclaw_version: str | None = None,
    node_version: str | None = None,
    progress: Callable[[int, str], None] | None = None,
) -> RuntimeImage:
    """Build (or find already built) the runtime for these versions and make it current."""
    from sandboxes.openclaw.runtime import build_runtime

    oc = openclaw_version or settings.HERMIT_OPENCLAW_VERSION
    node = node_version or settings.HERMIT_NODE_VERSION
    path = build_runtime(runtime_root(), oc, node, progress=progress)
    image, _ = RuntimeImage.objects.update_or_create(
        path=str(path),
        defaults={
            "openclaw_version": oc,
            "node_version": node,
            "status": RuntimeImage.Status.READY,
        },
    )
    make_current(image)
    return image
