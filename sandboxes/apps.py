from django.apps import AppConfig
from django.db.models.signals import post_migrate


class SandboxesConfig(AppConfig):
    name = "sandboxes"

    def ready(self) -> None:
        # tasks_host: its tasks (Celery's autodiscovery imports only tasks.py)
        from sandboxes import signals, tasks_host  # noqa: F401
        from sandboxes.roles import sync_after_migrate

        post_migrate.connect(sync_after_migrate, dispatch_uid="hermit-staff-groups")
