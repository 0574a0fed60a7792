from django.apps import AppConfig


class AiGatewayConfig(AppConfig):
    """The metered model-API proxy every sandbox's model calls go through."""

    name = "ai_gateway"
    label = "ai_gateway"
    verbose_name = "AI gateway"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.contrib.auth import get_user_model
        from django.db.models.signals import post_delete, post_save

        from ai_gateway import credentials, models, upstreams
        from ai_gateway.usage import usage_line
        from billing import models as billing_models
        from sandboxes import ai_keys

        ai_keys.register(mint=credentials.rotate_credential, usage=usage_line)

        for model in (models.Upstream, models.ModelRoute, models.Price):
            for name, signal in (("save", post_save), ("delete", post_delete)):
                uid = f"ai-routing-{model.__name__}-{name}"
                signal.connect(upstreams.invalidate_routing_table, sender=model, dispatch_uid=uid)
        from sandboxes.models import Suspension

        holders = (models.SandboxCredential, models.UserProviderKey, get_user_model(),
                   billing_models.Account, billing_models.Plan, Suspension)  # fmt: skip
        for holder in holders:
            for name, signal in (("save", post_save), ("delete", post_delete)):
                uid = f"ai-keys-{holder.__name__}-{name}"
                signal.connect(credentials.forget_keys, sender=holder, dispatch_uid=uid)
