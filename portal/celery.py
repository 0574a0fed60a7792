"""The Celery application, configured from Django settings (CELERY_* names).

Workers and beat log through settings.LOGGING (the text or JSON format, secrets redacted)
rather than through the handlers Celery would put on the root logger.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import setup_logging

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

app = Celery("portal")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@setup_logging.connect
def _log_through_settings(**kwargs: Any) -> None:
    """Configure logging from settings.LOGGING (a receiver here stops Celery's own setup)."""
    from logging.config import dictConfig

    from django.conf import settings

    dictConfig(settings.LOGGING)
