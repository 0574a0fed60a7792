"""The owner's backup URLs, mounted under /sandbox/ (see sandboxes.views_backups)."""

from __future__ import annotations

from django.urls import path

from sandboxes import views_backups

urlpatterns = [
    path("backups/now/", views_backups.backup_now, name="backup-now"),
    path("backups/card/", views_backups.backups_card, name="backups-card"),
    path("backups.json", views_backups.backups_json, name="backups-json"),
    path(
        "backups/<int:snapshot_id>/restore/",
        views_backups.restore_confirm,
        name="backup-restore",
    ),
    path("exports/new/", views_backups.export_request, name="export-request"),
    path(
        "exports/<int:export_id>/download/",
        views_backups.export_download,
        name="export-download",
    ),
]
