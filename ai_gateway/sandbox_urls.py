"""The whole URLconf of the sandbox-facing listener: the AI gateway under /ai/, and the
Telegram egress relay for agents' replies under /telegram/ (doorbell.relay), nothing else."""

from __future__ import annotations

from django.urls import include, path

urlpatterns = [
    path("ai/", include("ai_gateway.urls")),
    path("telegram/", include("doorbell.relay_urls")),
]
