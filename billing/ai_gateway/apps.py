from django.apps import AppConfig


class AiGatewayConfig(AppConfig):
    """The metered model-API proxy every sandbox's model calls go through."""

    name = "billing.ai_gateway"
    label = "ai_gateway"
    verbose_name = "AI gateway"
    default_auto_field = "django.db.models.BigAutoField"
