"""Runtime images: upgrade and roll back by changing which build is current (staff, admin)."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.test import Client
from django.urls import reverse

from sandboxes import runtime
from sandboxes.models import RuntimeImage

pytestmark = pytest.mark.django_db


def _image(tmp_path: Path, version: str, **fields: object) -> RuntimeImage:
    path = tmp_path / f"openclaw-{version}"
    path.mkdir()
    return RuntimeImage.objects.create(
        openclaw_version=version, node_version="24.21.0", path=str(path),
        status=RuntimeImage.Status.READY, **fields,
    )  # fmt: skip


def test_it_names_the_command_when_nothing_is_built() -> None:
    with pytest.raises(runtime.RuntimeMissing, match=r"manage\.py build_runtime"):
        runtime.current_image()


def test_it_refuses_a_current_image_whose_files_are_gone(tmp_path: Path) -> None:
    image = _image(tmp_path, "2026.9.6", is_current=True)
    Path(image.path).rmdir()
    with pytest.raises(runtime.RuntimeMissing, match="is missing"):
        runtime.current_image()


def test_staff_upgrade_and_roll_back_from_the_admin(
    client: Client, staff: object, tmp_path: Path
) -> None:
    old = _image(tmp_path, "2026.9.6", is_current=True)
    new = _image(tmp_path, "2026.10.1")
    client.force_login(staff)  # type: ignore[arg-type]
    url = reverse("admin:sandboxes_runtimeimage_changelist")
    client.post(url, {"action": "make_current", "_selected_action": [new.pk]})
    assert runtime.current_image() == new
    assert RuntimeImage.objects.filter(is_current=True).count() == 1
    client.post(url, {"action": "make_current", "_selected_action": [old.pk]})
    assert runtime.current_image() == old


def test_it_refuses_to_make_a_failed_build_current(tmp_path: Path) -> None:
    broken = _image(tmp_path, "2026.10.1")
    RuntimeImage.objects.filter(pk=broken.pk).update(status=RuntimeImage.Status.FAILED)
    broken.refresh_from_db()
    with pytest.raises(ValueError, match="ready"):
        runtime.make_current(broken)
