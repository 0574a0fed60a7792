"""The whole URLconf of the sandbox-facing listener: the AI gateway under /ai/ and nothing else."""

from __future__ import annotations

from django.urls import include, path

urlpatterns = [path("ai/", include("ai_gateway.urls"))]
