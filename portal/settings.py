"""Hermit settings: one module, driven by environment variables.

DEBUG defaults to False: a deploy that forgets a variable refuses to start rather than run with
development secrets. `make run` and `make test` export DEBUG=True themselves, and pytest and mypy
load portal.settings_dev, which does the same. With DEBUG=True and nothing else set, everything
runs on one machine with no services: SQLite (WAL), a filesystem Celery broker, the in-memory
channel layer, the local sandbox backend, mail to the console. Setting a variable switches a
service on. The SQLite file and the broker folder are private to the portal's user (0600, 0700).

Production must set:
    SECRET_KEY (or SECRET_KEY_FILE), ALLOWED_HOSTS, SITE_URL (https://...),
    DATABASE_URL, REDIS_URL, HERMIT_ENCRYPTION_KEYS (or _FILE), EMAIL_URL-style EMAIL_* settings.
Every secret setting NAME may instead be read from the file named by NAME_FILE.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from datetime import timedelta
from email.utils import getaddresses
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dj_database_url
import django_stubs_ext

from portal.lib.logs import logging_config

django_stubs_ext.monkeypatch()

BASE_DIR = Path(__file__).resolve().parent.parent


def env(name: str, default: str = "") -> str:
    """Return the variable NAME, or the contents of the file named by NAME_FILE, or default."""
    file_name = os.environ.get(f"{name}_FILE")
    if file_name:
        return Path(file_name).read_text().strip()
    return os.environ.get(name, default)


def envbool(name: str, default: str) -> bool:
    """Return a boolean variable; anything but True/False (any case) is an error."""
    value = env(name, default).strip().lower()
    if value not in ("true", "false"):
        raise ValueError(f"{name} must be True or False, not {value!r}")
    return value == "true"


def envint(name: str, default: str) -> int:
    value = env(name, default)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, not {value!r}") from None


def envlist(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in env(name, default).split(",") if item.strip()]


DEBUG = envbool("DEBUG", "False")
SECRET_KEY = env("SECRET_KEY", "insecure-dev-key-only-for-local-use" if DEBUG else "")
if not SECRET_KEY:
    raise ValueError(
        "SECRET_KEY (or SECRET_KEY_FILE) must be set when DEBUG is False (the default; "
        "set DEBUG=True for development)"
    )

SITE_URL = env("SITE_URL", "http://127.0.0.1:8000").rstrip("/")
ALLOWED_HOSTS = envlist("ALLOWED_HOSTS", "127.0.0.1,localhost,testserver" if DEBUG else "")
CSRF_TRUSTED_ORIGINS = envlist("CSRF_TRUSTED_ORIGINS", SITE_URL)
# The Control UI (HTML and JS a sandbox controls) is served from its own origin, never the
# portal's: in production a host on another registrable domain than SITE_URL (e.g.
# https://hermit-ui.example.net), so it shares neither cookies nor site with the portal. The
# default is another host name and port of this machine (localhost is another site than
# 127.0.0.1); bin/run serves it.
HERMIT_CONTROL_UI_URL = env("HERMIT_CONTROL_UI_URL", "http://localhost:8002").rstrip("/")
_control_ui = urlsplit(HERMIT_CONTROL_UI_URL)
_site = urlsplit(SITE_URL)
if _control_ui.scheme not in ("http", "https") or not _control_ui.hostname:
    raise ValueError(f"HERMIT_CONTROL_UI_URL must be an http(s) URL: {HERMIT_CONTROL_UI_URL!r}")
if (_control_ui.scheme, _control_ui.netloc.lower()) == (_site.scheme, _site.netloc.lower()):
    raise ValueError("HERMIT_CONTROL_UI_URL must be another origin than SITE_URL")
# Browsers share cookies across the ports of a host: the Control UI owns its whole host name.
if _control_ui.hostname == _site.hostname:
    raise ValueError(
        "HERMIT_CONTROL_UI_URL must be on another host name than SITE_URL (cookies are shared "
        f"by every port of a host): both are {_site.hostname!r}"
    )
if (
    not DEBUG
    and (_control_ui.hostname or "").split(".")[-2:] == (_site.hostname or "").split(".")[-2:]
):
    logging.getLogger("portal.settings").warning(
        "HERMIT_CONTROL_UI_URL (%s) looks like the same site as SITE_URL (%s): put the Control "
        "UI on another registrable domain, or its pages count as same-site for the portal",
        _control_ui.hostname,
        _site.hostname,
    )
if _control_ui.hostname not in ALLOWED_HOSTS:
    ALLOWED_HOSTS.append(_control_ui.hostname)


def _reachable_by_sandboxes(path: Path) -> bool:
    """Return True if other users (the sandbox uids) can traverse every directory down to path."""
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents] if p.exists())


def _default_data_dir() -> Path:
    """./var, unless the checkout lies in a directory sandbox uids cannot enter (say a 0700
    home): then a directory of this checkout's own under /var/lib/hermit, when we may."""
    local = BASE_DIR / "var"
    if _reachable_by_sandboxes(BASE_DIR) or os.geteuid() != 0:
        return local
    return Path("/var/lib/hermit") / hashlib.sha256(str(BASE_DIR).encode()).hexdigest()[:12]


def _make_private(path: Path, mode: int) -> None:
    """Take group and other access away from path, if it is ours and they have any."""
    st = path.stat()
    if st.st_uid == os.geteuid() and st.st_mode & 0o077:
        path.chmod(mode)


def _private_dir(path: Path) -> Path:
    """Create the directory path (and its parents) and make it 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _make_private(path, 0o700)
    return path


def _private_sqlite(path: Path) -> None:
    """Create the SQLite file 0600 before SQLite first opens it (SQLite gives its -wal and -shm
    files the database file's mode), and make an existing one and its -wal/-shm 0600."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
        if (path.parent / name).exists():
            _make_private(path.parent / name, 0o600)


# The data dir stays enterable (sandbox data dirs live below it); what is in it is private.
HERMIT_DATA_DIR = Path(env("HERMIT_DATA_DIR", str(_default_data_dir()))).resolve()
HERMIT_DATA_DIR.mkdir(parents=True, exist_ok=True)

INSTALLED_APPS = [
    "daphne",
    "portal.apps.HermitAdminConfig",  # django.contrib.admin, signing in through allauth + TOTP
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "allauth",
    "allauth.account",
    "allauth.mfa",
    "channels",
    "django_celery_beat",
    "portal",
    "billing",
    "ai_gateway",  # above billing and sandboxes; neither imports it
    "metering",  # usage and cost; listed before sandboxes, whose post_migrate wants its perms
    "doorbell",  # messenger channels (Telegram); above sandboxes, which never import it
    "sandboxes",
]

MIDDLEWARE = [
    "portal.middleware.control_ui_origin",  # first: the Control UI origin's own URLs
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "allauth.account.middleware.AccountMiddleware",
]

ROOT_URLCONF = "portal.urls"
# The debug page hides URLs, DSNs and broker settings, and the password in any URL it shows.
DEFAULT_EXCEPTION_REPORTER = "portal.lib.debug.SafeReporter"
DEFAULT_EXCEPTION_REPORTER_FILTER = "portal.lib.debug.SafeReporterFilter"
ASGI_APPLICATION = "portal.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Database: SQLite in WAL mode by default, anything dj-database-url understands otherwise.
DATABASE_URL = env("DATABASE_URL")
if DATABASE_URL:
    # Under ASGI each request's database work runs in a fresh thread, so persistent
    # connections would pile up: connect per request instead.
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=0)}
    # Test databases are per test process, so test runs on one machine never collide.
    DATABASES["default"]["TEST"] = {"NAME": f"test_{DATABASES['default']['NAME']}_{os.getpid()}"}
else:
    _private_sqlite(HERMIT_DATA_DIR / "hermit.sqlite3")
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(HERMIT_DATA_DIR / "hermit.sqlite3"),
            "OPTIONS": {
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
            },
            # A file, not memory, so that servers started by tests share the test database.
            "TEST": {"NAME": str(HERMIT_DATA_DIR / "test.sqlite3")},
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Redis: Celery broker and channel layer when set; a filesystem broker and in-memory layer when not.
REDIS_URL = env("REDIS_URL")
CELERY_BROKER_DIR = Path(env("HERMIT_CELERY_BROKER_DIR", str(HERMIT_DATA_DIR / "celery-broker")))
if REDIS_URL:
    CELERY_BROKER_URL = REDIS_URL
    CHANNEL_LAYERS: dict[str, Any] = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # redis-py 8 defaults socket_timeout to 5 s, which kills channels_redis's blocking
            # BZPOPMIN (every idle consumer crashes after 5 s): django/channels_redis#422.
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": None}]},
        }
    }
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}
    }
else:
    CELERY_BROKER_URL = "filesystem://"
    _private_dir(CELERY_BROKER_DIR)
    for sub in ("in", "processed", "control"):
        _private_dir(CELERY_BROKER_DIR / sub)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(CELERY_BROKER_DIR / "in"),
        "data_folder_out": str(CELERY_BROKER_DIR / "in"),
        "processed_folder": str(CELERY_BROKER_DIR / "processed"),
        "control_folder": str(CELERY_BROKER_DIR / "control"),
        "store_processed": False,
    }
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    CACHES = {
        "default": {  # a file cache that root's worker and the web user both read
            "BACKEND": "portal.lib.cache.SharedFileBasedCache",
            "LOCATION": str(HERMIT_DATA_DIR / "cache"),
        }
    }

CELERY_TASK_DEFAULT_QUEUE = env("HERMIT_CELERY_QUEUE", "celery")
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_IGNORE_RESULT = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ALWAYS_EAGER = envbool("CELERY_TASK_ALWAYS_EAGER", "False")
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_TIMEZONE = "UTC"
# A sandbox's tasks go to its host's queue (sandboxes.hosts.route_task).
CELERY_TASK_ROUTES = ["sandboxes.hosts.route_task"]
HERMIT_RECONCILE_INTERVAL = envint("HERMIT_RECONCILE_INTERVAL", "30")
# Seconds between scans for sandboxes whose plan's backup interval has passed.
HERMIT_BACKUP_SCAN_INTERVAL = envint("HERMIT_BACKUP_SCAN_INTERVAL", "300")
# Seconds between checks of every backup repository (restic check, reading a random
# HERMIT_BACKUP_CHECK_SUBSET of the stored data: "10%", "1/10" or empty for structure only).
HERMIT_BACKUP_CHECK_INTERVAL = envint("HERMIT_BACKUP_CHECK_INTERVAL", str(7 * 24 * 3600))
HERMIT_BACKUP_CHECK_SUBSET = env("HERMIT_BACKUP_CHECK_SUBSET", "10%")
# Metering (metering.sampling): seconds per interval in which each awake sandbox's CPU and
# memory are sampled once, and days the per-interval samples are kept (daily totals stay).
HERMIT_METERING_INTERVAL = envint("HERMIT_METERING_INTERVAL", "60")
HERMIT_METERING_KEEP_DAYS = envint("HERMIT_METERING_KEEP_DAYS", "7")
# The initial beat schedule; staff edit it afterwards in the admin (django-celery-beat).
CELERY_BEAT_SCHEDULE = {
    "reconcile-sandboxes": {
        "task": "sandboxes.tasks.reconcile_sandboxes",
        "schedule": timedelta(seconds=HERMIT_RECONCILE_INTERVAL),
    },
    "sleep-idle-sandboxes": {
        "task": "sandboxes.tasks.sleep_idle_sandboxes",
        "schedule": timedelta(seconds=15),
    },
    "fill-warm-pool": {
        "task": "sandboxes.pool.fill_pool",
        "schedule": timedelta(seconds=60),
    },
    "requeue-telegram": {  # updates whose delivery task was lost with a worker
        "task": "doorbell.tasks.requeue_telegram",
        "schedule": timedelta(seconds=30),
    },
    "wake-for-jobs": {
        "task": "sandboxes.tasks.wake_for_jobs",
        "schedule": timedelta(seconds=10),
    },
    "backup-due-sandboxes": {
        "task": "sandboxes.backups.tasks.backup_due_sandboxes",
        "schedule": timedelta(seconds=HERMIT_BACKUP_SCAN_INTERVAL),
    },
    "check-backups": {
        "task": "sandboxes.backups.tasks.check_backups",
        "schedule": timedelta(seconds=HERMIT_BACKUP_CHECK_INTERVAL),
    },
    "end-billing-grace": {
        "task": "billing.tasks.end_expired_grace",
        "schedule": timedelta(minutes=10),
    },
    "reconcile-subscriptions": {  # a lost webhook cannot keep a paid plan (billing.tasks)
        "task": "billing.tasks.reconcile_subscriptions",
        "schedule": timedelta(minutes=30),
    },
    "meter-usage": {  # twice an interval: a late beat never skips one (metering.sampling)
        "task": "metering.tasks.meter_usage",
        "schedule": timedelta(seconds=HERMIT_METERING_INTERVAL / 2),
    },
    "check-hosts": {  # lost hosts, and moves off draining ones (sandboxes.tasks)
        "task": "sandboxes.tasks.check_hosts",
        "schedule": timedelta(seconds=30),
    },
    "purge-deleted-accounts": {
        "task": "sandboxes.tasks.purge_deleted_accounts",
        "schedule": timedelta(hours=1),
    },
}

# Accounts (django-allauth): email login, mandatory verification, TOTP, rate limits.
AUTHENTICATION_BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",
    "allauth.account.auth_backends.AuthenticationBackend",
]
ACCOUNT_LOGIN_METHODS = {"email"}
ACCOUNT_SIGNUP_FIELDS = ["email*", "password1*", "password2*"]
ACCOUNT_EMAIL_VERIFICATION = env("ACCOUNT_EMAIL_VERIFICATION", "mandatory")
ACCOUNT_UNIQUE_EMAIL = True
ACCOUNT_EMAIL_SUBJECT_PREFIX = "[Hermit] "
ACCOUNT_LOGIN_ON_EMAIL_CONFIRMATION = True
ACCOUNT_CONFIRM_EMAIL_ON_GET = False
ACCOUNT_RATE_LIMITS = {
    "login_failed": env("LOGIN_RATE_LIMIT", "5/5m/ip,5/5m/key"),
    "login": "30/m/ip",
    "signup": "20/m/ip",
    "confirm_email": "1/3m/key",
    "reset_password": "20/m/ip,5/m/key",
}
# Tells an inactive user signing in why (a pending deletion's dates): sandboxes.signin.
ACCOUNT_ADAPTER = "sandboxes.signin.AccountAdapter"
MFA_SUPPORTED_TYPES = ["totp", "recovery_codes"]
MFA_TOTP_ISSUER = "Hermit"
LOGIN_REDIRECT_URL = "dashboard"
LOGIN_URL = "account_login"
ACCOUNT_LOGOUT_REDIRECT_URL = "account_login"

EMAIL_HOST = env("EMAIL_HOST")
if EMAIL_HOST:
    EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    EMAIL_PORT = envint("EMAIL_PORT", "587")
    EMAIL_HOST_USER = env("EMAIL_HOST_USER")
    EMAIL_HOST_PASSWORD = env("EMAIL_HOST_PASSWORD")
    EMAIL_USE_TLS = envbool("EMAIL_USE_TLS", "True")
else:
    EMAIL_BACKEND = "django.core.mail.backends.console.EmailBackend"
DEFAULT_FROM_EMAIL = env("DEFAULT_FROM_EMAIL", "Hermit <noreply@localhost>")

# Secrets at rest: comma-separated Fernet keys, newest first (old keys still decrypt).
HERMIT_ENCRYPTION_KEYS = envlist("HERMIT_ENCRYPTION_KEYS")
if not HERMIT_ENCRYPTION_KEYS:
    if not DEBUG:
        raise ValueError("HERMIT_ENCRYPTION_KEYS (or _FILE) must be set when DEBUG is False")
    HERMIT_ENCRYPTION_KEYS = []  # derived from SECRET_KEY in portal.lib.crypto for development

# Sandboxes
SANDBOX_BACKEND = env("SANDBOX_BACKEND", "local")
if SANDBOX_BACKEND == "fake" and not DEBUG:
    # The in-memory backend runs `exec` as a plain host process: tests only, never production.
    raise ValueError("SANDBOX_BACKEND=fake is for tests only and needs DEBUG=True")
HERMIT_OPENCLAW_VERSION = env("HERMIT_OPENCLAW_VERSION", "2026.9.6")
HERMIT_NODE_VERSION = env("HERMIT_NODE_VERSION", "24.21.0")
HERMIT_BWRAP = env("HERMIT_BWRAP", "bwrap")
HERMIT_PASTA = env("HERMIT_PASTA", "pasta")
HERMIT_RUNTIME_DIR = Path(env("HERMIT_RUNTIME_DIR", str(HERMIT_DATA_DIR / "runtime"))).resolve()
# Two installations on one machine must not share sandbox uids or cgroups: both defaults are
# derived from the data directory.
_INSTANCE = hashlib.sha256(str(HERMIT_DATA_DIR).encode()).hexdigest()[:8]
HERMIT_CGROUP_PARENT = env("HERMIT_CGROUP_PARENT", f"hermit-{_INSTANCE}")
HERMIT_UID_BASE = envint("HERMIT_UID_BASE", str(200_000 + int(_INSTANCE, 16) % 64 * 100_000))
# pasta (each sandbox's network) runs as HERMIT_NET_UID_BASE + the sandbox's id: another range
# nobody uses, so no sandbox's uid owns a network namespace. Default: HERMIT_UID_BASE + 10^9.
if env("HERMIT_NET_UID_BASE"):
    HERMIT_NET_UID_BASE = envint("HERMIT_NET_UID_BASE", "0")
# Networks (CIDRs, comma-separated) a sandbox with internet must never reach, e.g. your LAN/VPC.
HERMIT_SANDBOX_BLOCKED_NETS = envlist("HERMIT_SANDBOX_BLOCKED_NETS")
# The agents' browser (plans with it on): the Chromium binary run inside each sandbox, and the
# private-network hosts OpenClaw's navigation check lets it open (by default none).
HERMIT_BROWSER_EXECUTABLE = env("HERMIT_BROWSER_EXECUTABLE", "/usr/lib/chromium/chromium")
HERMIT_BROWSER_ALLOWED_HOSTS = envlist("HERMIT_BROWSER_ALLOWED_HOSTS")
HERMIT_START_TIMEOUT = envint("HERMIT_START_TIMEOUT", "60")
HERMIT_READY_TIMEOUT = envint("HERMIT_READY_TIMEOUT", "30")
# A gateway that crashes HERMIT_CRASH_LIMIT times in a row, each within HERMIT_CRASH_WINDOW
# seconds of its start, stays failed: automatic restarts wait HERMIT_CRASH_BACKOFF seconds,
# doubling with each further crash up to HERMIT_CRASH_BACKOFF_MAX; an explicit start by the
# owner or staff is allowed once per HERMIT_CRASH_BACKOFF seconds after the last crash.
HERMIT_CRASH_LIMIT = envint("HERMIT_CRASH_LIMIT", "3")
HERMIT_CRASH_WINDOW = envint("HERMIT_CRASH_WINDOW", "600")
HERMIT_CRASH_BACKOFF = envint("HERMIT_CRASH_BACKOFF", "60")
HERMIT_CRASH_BACKOFF_MAX = envint("HERMIT_CRASH_BACKOFF_MAX", "1800")
# Sleep in stages (sandboxes.sleep). A sandbox whose plan sleeps dozes (frozen in place, RAM
# kept, thawed in milliseconds) after HERMIT_DOZE_AFTER idle seconds (never later than the plan's
# sleep-after), and hibernates (CRIU checkpoint to disk, RAM freed, restored in about a second;
# a cold stop where that fails) after the plan's sleep-after. Past HERMIT_MAX_DOZING dozing
# sandboxes, or below HERMIT_DOZE_MIN_AVAILABLE_MB of available RAM, the longest-idle dozing ones
# hibernate first.
HERMIT_DOZE_AFTER = envint("HERMIT_DOZE_AFTER", "60")
HERMIT_MAX_DOZING = envint("HERMIT_MAX_DOZING", "8")
HERMIT_DOZE_MIN_AVAILABLE_MB = envint("HERMIT_DOZE_MIN_AVAILABLE_MB", "2048")
# Checkpoint images (about 1 GB each): where, how much disk in all, and how old at most. Past
# either, the oldest are dropped; those sandboxes boot cold next time.
HERMIT_CHECKPOINT_DIR = env("HERMIT_CHECKPOINT_DIR", str(Path(HERMIT_DATA_DIR) / "checkpoints"))
HERMIT_CHECKPOINT_BUDGET_MB = envint("HERMIT_CHECKPOINT_BUDGET_MB", "51200")
# CRIU 4.2 or later (bin/system-deps installs Debian's into /opt/hermit); a checkpoint restore
# may take this long before it is given up (the agent then boots cold).
HERMIT_CRIU = env("HERMIT_CRIU", "/opt/hermit/criu/criu")
HERMIT_RESTORE_TIMEOUT = envint("HERMIT_RESTORE_TIMEOUT", "120")
HERMIT_CHECKPOINT_MAX_AGE = envint("HERMIT_CHECKPOINT_MAX_AGE", str(7 * 24 * 3600))
# Beat wakes a sleeping sandbox this many seconds before its agent's own next scheduled job:
# enough for a cold start, or for OpenClaw's once-a-minute re-check of its schedule after a
# checkpoint restore (the restored gateway's timers run late by the time it slept).
HERMIT_JOB_WAKE_LEAD = envint("HERMIT_JOB_WAKE_LEAD", "90")
# Pre-started, unassigned gateways kept for new sign-ups (sandboxes.pool).
HERMIT_WARM_POOL_SIZE = envint("HERMIT_WARM_POOL_SIZE", "1")
# Cold boots are CPU-bound: at most this many at once per host; the rest wait in line, their
# place shown. A start is judged too slow by the CPU time its gateway got, not wall time alone.
HERMIT_MAX_CONCURRENT_BOOTS = envint("HERMIT_MAX_CONCURRENT_BOOTS", str(os.cpu_count() or 1))
HERMIT_START_CPU_SECONDS = envint("HERMIT_START_CPU_SECONDS", "60")
# This host's name: its SandboxHost row, its Celery queue host.<name> and its boot slots
# (default: the machine's hostname). Each sandbox host sets its own, with its own data dir.
HERMIT_HOST_NAME = env("HERMIT_HOST_NAME") or socket.gethostname()
# Sandbox hosts (sandboxes.hosts). HERMIT_HOST_WORKER=False makes a worker that takes only the
# default queue and does not heartbeat (one that cannot run sandboxes). HERMIT_HOST_ADDRESS is
# where the portal reaches this host's gateways; HERMIT_HOST_RAM_MB overrides its MemTotal;
# HERMIT_HOST_MAX_SANDBOXES caps the sandboxes placed on it (0: no cap); a host with less than
# HERMIT_HOST_MIN_FREE_MB available takes no new sandbox. A worker heartbeats every
# HERMIT_HOST_HEARTBEAT_INTERVAL seconds; a host silent for HERMIT_HOST_LOST_AFTER is lost.
HERMIT_HOST_WORKER = envbool("HERMIT_HOST_WORKER", "True")
HERMIT_HOST_ADDRESS = env("HERMIT_HOST_ADDRESS", "127.0.0.1")
HERMIT_HOST_RAM_MB = envint("HERMIT_HOST_RAM_MB", "0")
HERMIT_HOST_MAX_SANDBOXES = envint("HERMIT_HOST_MAX_SANDBOXES", "200")
HERMIT_HOST_MIN_FREE_MB = envint("HERMIT_HOST_MIN_FREE_MB", "1024")
HERMIT_HOST_HEARTBEAT_INTERVAL = envint("HERMIT_HOST_HEARTBEAT_INTERVAL", "15")
HERMIT_HOST_LOST_AFTER = envint("HERMIT_HOST_LOST_AFTER", "90")
# The portal reaches a gateway on another host through that host's edge (hostedge: uvicorn on
# HERMIT_HOST_ADDRESS:HERMIT_HOST_EDGE_PORT), with tokens that live HERMIT_HOST_LINK_TTL
# seconds, signed by HERMIT_HOST_LINK_SECRET: a secret of 32 characters or more shared by the
# portal and every host (comma-separated, newest first, to rotate; derived from SECRET_KEY when
# DEBUG and unset). A single machine needs none (sandboxes.hostlink).
HERMIT_HOST_LINK_SECRET = envlist("HERMIT_HOST_LINK_SECRET")
HERMIT_HOST_LINK_TTL = envint("HERMIT_HOST_LINK_TTL", "30")
HERMIT_HOST_EDGE_PORT = envint("HERMIT_HOST_EDGE_PORT", "8003")
# TLS on that link, unless the portal and the hosts share a private network: each edge serves
# HERMIT_HOST_EDGE_TLS_CERT and _KEY (PEM files) and the portal, with HERMIT_HOST_EDGE_TLS=True,
# connects with wss:// and https://, trusting the system's CAs (or those in SSL_CERT_FILE).
HERMIT_HOST_EDGE_TLS = envbool("HERMIT_HOST_EDGE_TLS", "False")
HERMIT_HOST_EDGE_TLS_CERT = env("HERMIT_HOST_EDGE_TLS_CERT")
HERMIT_HOST_EDGE_TLS_KEY = env("HERMIT_HOST_EDGE_TLS_KEY")
if bool(HERMIT_HOST_EDGE_TLS_CERT) != bool(HERMIT_HOST_EDGE_TLS_KEY):
    raise ValueError("HERMIT_HOST_EDGE_TLS_CERT and HERMIT_HOST_EDGE_TLS_KEY go together")
# A deleted account's agent data, backups and secrets are removed this many days after the
# deletion (by its owner or staff); until then staff can cancel it. 0 removes them at once.
HERMIT_DELETE_GRACE_DAYS = envint("HERMIT_DELETE_GRACE_DAYS", "14")
# A failed start is tried this many more times before the user is told.
HERMIT_START_RETRIES = envint("HERMIT_START_RETRIES", "1")
# gateway.log (the sandbox's stdout/stderr) is moved to gateway.log.1 at a start once it is
# larger than this; one old copy is kept.
HERMIT_GATEWAY_LOG_MAX_BYTES = envint("HERMIT_GATEWAY_LOG_MAX_BYTES", str(10 * 1024 * 1024))
HERMIT_AI_GATEWAY_PORT = envint("HERMIT_AI_GATEWAY_PORT", "8001")
# Telegram (doorbell): the Bot API root the portal and the egress relay call, and how old a
# pending update is (seconds) before beat queues its delivery again.
HERMIT_TELEGRAM_API_ROOT = env("HERMIT_TELEGRAM_API_ROOT", "https://api.telegram.org")
HERMIT_TELEGRAM_REQUEUE_AFTER = envint("HERMIT_TELEGRAM_REQUEUE_AFTER", "60")
HERMIT_DEFAULT_MODEL = env("HERMIT_DEFAULT_MODEL", "gpt-4o-mini")
# The model ids sandboxes are offered (the AI gateway maps each to an upstream).
HERMIT_SANDBOX_MODELS = envlist("HERMIT_SANDBOX_MODELS", HERMIT_DEFAULT_MODEL)
# The operator's provider keys for the AI gateway (staff can also add upstreams in the admin).
HERMIT_OPENAI_API_KEY = env("HERMIT_OPENAI_API_KEY")
HERMIT_OPENAI_BASE_URL = env("HERMIT_OPENAI_BASE_URL", "https://api.openai.com/v1")
HERMIT_ANTHROPIC_API_KEY = env("HERMIT_ANTHROPIC_API_KEY")
HERMIT_ANTHROPIC_BASE_URL = env("HERMIT_ANTHROPIC_BASE_URL", "https://api.anthropic.com")
# AI gateway limits: calls one user may have under way at once (0 = no cap); how long a call's
# quota reservation lives if its process dies; how long the gateway keeps reading (and billing)
# an upstream answer after the client went away; the output assumed for a call that sets no
# max_tokens, when reserving quota.
HERMIT_AI_MAX_CONCURRENT_CALLS = envint("HERMIT_AI_MAX_CONCURRENT_CALLS", "8")
HERMIT_AI_LEASE_SECONDS = envint("HERMIT_AI_LEASE_SECONDS", "900")
HERMIT_AI_DRAIN_SECONDS = envint("HERMIT_AI_DRAIN_SECONDS", "300")
# No call lives longer than this; it must be shorter than the lease, so that a live call's quota
# reservation never expires under it.
HERMIT_AI_MAX_CALL_SECONDS = envint("HERMIT_AI_MAX_CALL_SECONDS", "840")
if HERMIT_AI_MAX_CALL_SECONDS >= HERMIT_AI_LEASE_SECONDS:
    raise ValueError("HERMIT_AI_MAX_CALL_SECONDS must be less than HERMIT_AI_LEASE_SECONDS")
HERMIT_AI_DEFAULT_MAX_OUTPUT = envint("HERMIT_AI_DEFAULT_MAX_OUTPUT", "4096")
# How long the AI gateway process may reuse what a key opens (sandbox, owner, plan, own keys)
# before reading it again; changes saved in another process reach it within this time. 0 = never.
HERMIT_AI_KEY_CACHE_SECONDS = envint("HERMIT_AI_KEY_CACHE_SECONDS", "5")
# On the operator's keys: the anthropic-beta values passed upstream, and the provider-side tool
# types (globs, e.g. web_search_*) allowed; anything else is refused with a 400.
HERMIT_AI_ANTHROPIC_BETAS = envlist(
    "HERMIT_AI_ANTHROPIC_BETAS",
    "prompt-caching-2024-07-31,token-efficient-tools-2025-02-19,"
    "fine-grained-tool-streaming-2025-05-14,interleaved-thinking-2025-05-14",
)
HERMIT_AI_SERVER_TOOLS = envlist("HERMIT_AI_SERVER_TOOLS")
HERMIT_AUTO_PROVISION = envbool("HERMIT_AUTO_PROVISION", "True")

# Backups (restic, one encrypted repository per sandbox; see sandboxes/backups/).
# Where local repositories live; empty = <HERMIT_DATA_DIR>/backups, resolved when used (root's,
# 0700). Ignored when HERMIT_BACKUP_S3_BUCKET is set.
HERMIT_BACKUP_DIR = env("HERMIT_BACKUP_DIR")
if HERMIT_BACKUP_DIR and not os.path.isabs(HERMIT_BACKUP_DIR):
    raise ValueError(
        f"HERMIT_BACKUP_DIR must be an absolute path (such as /var/lib/hermit/backups), "
        f"not {HERMIT_BACKUP_DIR!r}"
    )
# Setting a bucket switches repositories and exports to S3 (or R2, MinIO: set the endpoint, such
# as http://127.0.0.1:9000 or https://<account>.r2.cloudflarestorage.com; empty = AWS).
HERMIT_BACKUP_S3_BUCKET = env("HERMIT_BACKUP_S3_BUCKET")
HERMIT_BACKUP_S3_ENDPOINT = env("HERMIT_BACKUP_S3_ENDPOINT")
HERMIT_BACKUP_S3_REGION = env("HERMIT_BACKUP_S3_REGION", "us-east-1")
# Key prefix in the bucket: repositories under <prefix>/sbx-..., exports under <prefix>/exports.
HERMIT_BACKUP_S3_PREFIX = env("HERMIT_BACKUP_S3_PREFIX", "hermit")
# The bucket's credentials (secrets: also from NAME_FILE); given to restic only by environment.
HERMIT_BACKUP_S3_ACCESS_KEY_ID = env("HERMIT_BACKUP_S3_ACCESS_KEY_ID")
HERMIT_BACKUP_S3_SECRET_ACCESS_KEY = env("HERMIT_BACKUP_S3_SECRET_ACCESS_KEY")
# The operator's own costs, in USD, for the staff cost table and each user's cost (metering).
# Defaults: a Hetzner Cloud CX53 (16 vCPU, 32 GB RAM, 320 GB NVMe) at EUR 0.036 an hour
# (hetzner.com/cloud, April 2026), taken as USD 0.039, half charged to its 16 vCPUs and half to
# its 32 GB: 0.039 / 2 / 16 = 0.0012 per vCPU-hour and 0.039 / 2 / 32 = 0.0006 per GB-hour.
# Storage: Cloudflare R2's published USD 0.015 per GB-month, where backups live.
HERMIT_COST_VCPU_HOUR = env("HERMIT_COST_VCPU_HOUR", "0.0012")
HERMIT_COST_RAM_GB_HOUR = env("HERMIT_COST_RAM_GB_HOUR", "0.0006")
HERMIT_COST_STORAGE_GB_MONTH = env("HERMIT_COST_STORAGE_GB_MONTH", "0.015")
# Stripe (billing.stripe_client). Without STRIPE_SECRET_KEY the pricing page says billing is not
# set up and staff change plans in the admin. Both keys are secrets (also read from NAME_FILE).
# STRIPE_API_BASE points the SDK elsewhere (tests: a local fake of Stripe's API). A failed
# payment keeps the paid plan HERMIT_BILLING_GRACE_DAYS days, then the account drops to free.
STRIPE_SECRET_KEY = env("STRIPE_SECRET_KEY")
STRIPE_WEBHOOK_SECRET = env("STRIPE_WEBHOOK_SECRET")
STRIPE_API_BASE = env("STRIPE_API_BASE", "https://api.stripe.com").rstrip("/")
HERMIT_BILLING_GRACE_DAYS = envint("HERMIT_BILLING_GRACE_DAYS", "7")
# Seconds a backup or restore holds a sandbox's backup lease before renewing it; a worker
# killed mid-backup frees the sandbox for the next run after this.
HERMIT_BACKUP_LEASE_SECONDS = envint("HERMIT_BACKUP_LEASE_SECONDS", "120")
# Seconds one restic run (a backup, restore, check or export) may take before it is stopped.
HERMIT_BACKUP_TIMEOUT = envint("HERMIT_BACKUP_TIMEOUT", "3600")
# Seconds a running agent may stay paused while a backup reads what changed; a backup whose
# paused pass takes longer (a stalled storage, say) resumes the agent and fails.
try:
    HERMIT_BACKUP_MAX_PAUSE_SECONDS = float(env("HERMIT_BACKUP_MAX_PAUSE_SECONDS", "10"))
except ValueError:
    raise ValueError("HERMIT_BACKUP_MAX_PAUSE_SECONDS must be a number of seconds") from None
# Seconds after which a queued restore or export is refused rather than run (a worker killed
# mid-restore has it redelivered an hour later: it must not then revert the agent).
HERMIT_BACKUP_REQUEST_MAX_AGE = envint("HERMIT_BACKUP_REQUEST_MAX_AGE", "900")
# Seconds a "Download my agent" link (a presigned URL, or the portal's own link) stays valid.
HERMIT_EXPORT_TTL = envint("HERMIT_EXPORT_TTL", "3600")

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = HERMIT_DATA_DIR / "staticfiles"
STATIC_ROOT.mkdir(exist_ok=True)
WHITENOISE_USE_FINDERS = DEBUG
WHITENOISE_AUTOREFRESH = DEBUG
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}

if not DEBUG:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = envbool("SECURE_SSL_REDIRECT", "True")
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    if SITE_URL.startswith("https://"):
        # __Host-: Secure, Path=/, no Domain, so no other host (nor http) can set or shadow them
        SESSION_COOKIE_NAME = "__Host-sessionid"
        CSRF_COOKIE_NAME = "__Host-csrftoken"
    SECURE_HSTS_SECONDS = envint("SECURE_HSTS_SECONDS", "31536000")
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SECURE_CONTENT_TYPE_NOSNIFF = True

# Logs (portal.lib.logs): LOG_FORMAT=json writes one JSON line per event; every handler redacts
# secrets. Errors are mailed to ADMINS ("Name <address>, ..."), only when DEBUG is False.
ADMINS = getaddresses([env("ADMINS")]) if env("ADMINS") else []
SERVER_EMAIL = env("SERVER_EMAIL", DEFAULT_FROM_EMAIL)  # the sender of error mails and alerts
EMAIL_SUBJECT_PREFIX = "[Hermit] "
LOGGING = logging_config(env("LOG_FORMAT", "text"), env("LOG_LEVEL", "INFO"))
# Prometheus metrics at /metrics (portal.metrics), for a scraper sending
# "Authorization: Bearer <HERMIT_METRICS_TOKEN>" (a secret; unset = no /metrics). Windowed
# series (durations, failures, model calls) describe the last HERMIT_METRICS_WINDOW seconds.
HERMIT_METRICS_TOKEN = env("HERMIT_METRICS_TOKEN")
HERMIT_METRICS_WINDOW = envint("HERMIT_METRICS_WINDOW", "300")
