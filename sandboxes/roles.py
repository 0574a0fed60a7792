"""Staff roles as Django groups: "support" and "operator".

- **support** sees everything (every ``view_*`` permission), may start, stop, restart, sleep,
  wake and back up sandboxes and suspend users, and nothing more: it cannot delete or restore
  anything, change a record, or see a secret (no ``sandboxes.view_secrets``: the admin leaves
  encrypted fields out of its pages, see portal.admin_site).
- **operator** may do everything except change plans' prices (``billing.change_plan_price``)
  and hand out permissions (changing groups or permissions, which would let it give itself the
  price one; the user admin keeps superuser status, groups and permissions for superusers).

:func:`sync_staff_groups` creates both groups and sets their permissions from the permissions
that exist; a data migration calls it first, and it runs again after every ``migrate``
(post_migrate, wired in apps.ready), so permissions added later reach the groups.
"""

from __future__ import annotations

from typing import Any

SUPPORT = "support"
OPERATOR = "operator"

SUPPORT_EXTRA = (
    ("sandboxes", "operate_sandbox"),
    ("sandboxes", "backup_sandbox"),
    ("sandboxes", "suspend_user"),
)
OPERATOR_WITHHELD = (
    ("billing", "change_plan_price"),
    ("auth", "add_group"),
    ("auth", "change_group"),
    ("auth", "delete_group"),
    ("auth", "add_permission"),
    ("auth", "change_permission"),
    ("auth", "delete_permission"),
)


def _key(permission: Any) -> tuple[str, str]:
    return (permission.content_type.app_label, permission.codename)


def sync_staff_groups(group_model: Any, permission_model: Any) -> None:
    """Create the support and operator groups and set their permissions (idempotent).

    Takes the Group and Permission models, so a migration can pass its historical ones."""
    everything = list(permission_model.objects.select_related("content_type"))
    support = [p for p in everything if p.codename.startswith("view_") or _key(p) in SUPPORT_EXTRA]
    support = [p for p in support if _key(p) != ("sandboxes", "view_secrets")]
    operator = [p for p in everything if _key(p) not in OPERATOR_WITHHELD]
    for name, permissions in ((SUPPORT, support), (OPERATOR, operator)):
        group, _ = group_model.objects.get_or_create(name=name)
        group.permissions.set(permissions)


def sync_after_migrate(app_config: Any = None, **kwargs: Any) -> None:
    """post_migrate receiver: once the last app's permissions exist (post_migrate is sent once
    per app, in INSTALLED_APPS order), bring the groups up to date with the permissions."""
    from django.apps import apps
    from django.contrib.auth.models import Group, Permission

    if app_config is not list(apps.get_app_configs())[-1]:
        return
    sync_staff_groups(Group, Permission)
