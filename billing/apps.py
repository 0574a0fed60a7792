from django.apps import AppConfig


class BillingConfig(AppConfig):
    name = "billing"

    def ready(self) -> None:
        from billing import signals  # noqa: F401
        from billing.limits import sandbox_limits
        from sandboxes.limits import register_provider

        register_provider(sandbox_limits)
