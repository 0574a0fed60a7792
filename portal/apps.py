"""The portal app, and the admin's app config, which installs Hermit's admin site."""

from django.apps import AppConfig
from django.contrib.admin import apps as admin_apps


class PortalConfig(AppConfig):
    name = "portal"
    default = True


class HermitAdminConfig(admin_apps.AdminConfig):
    """django.contrib.admin with portal.admin_site.HermitAdminSite as ``admin.site``."""

    default = False
    default_site = "portal.admin_site.HermitAdminSite"
