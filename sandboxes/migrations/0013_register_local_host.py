"""Register this machine as the default sandbox host and put every existing sandbox on it."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import migrations


def register_local_host(apps: Any, schema_editor: Any) -> None:
    host_model = apps.get_model("sandboxes", "SandboxHost")
    sandbox_model = apps.get_model("sandboxes", "Sandbox")
    host, _ = host_model.objects.get_or_create(
        name=settings.HERMIT_HOST_NAME,
        defaults={
            "address": settings.HERMIT_HOST_ADDRESS,
            "capacity_sandboxes": settings.HERMIT_HOST_MAX_SANDBOXES,
        },
    )
    sandbox_model.objects.filter(host__isnull=True).update(host=host)


class Migration(migrations.Migration):
    dependencies = [("sandboxes", "0012_sandbox_hosts")]

    operations = [migrations.RunPython(register_local_host, migrations.RunPython.noop)]
