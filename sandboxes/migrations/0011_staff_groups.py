"""The "support" and "operator" staff groups (sandboxes.roles), with their permissions."""

from typing import Any

from django.contrib.auth.management import create_permissions
from django.db import migrations


def create_groups(apps: Any, schema_editor: Any) -> None:
    from sandboxes.roles import sync_staff_groups

    # Permissions are created after migrations run; make them now so the groups get them.
    for app_config in apps.get_app_configs():
        app_config.models_module = True
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = None
    sync_staff_groups(apps.get_model("auth", "Group"), apps.get_model("auth", "Permission"))


def remove_groups(apps: Any, schema_editor: Any) -> None:
    apps.get_model("auth", "Group").objects.filter(name__in=["support", "operator"]).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("billing", "0008_tiers_stripe_plan_changes"),
        ("sandboxes", "0010_suspensions_deletions_pinned_runtime"),
    ]

    operations = [migrations.RunPython(create_groups, remove_groups)]
