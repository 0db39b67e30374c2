"""Settings of the ledger service.

What to look at: the ``CELERY_`` settings (read by ``ledger_site/celery.py`` with
``namespace="CELERY"``), the domain events ones among them, ``DOMAIN_EVENTS_CELERY_APP``, the
outbox app in ``INSTALLED_APPS``, the middleware, and ``ATOMIC_REQUESTS``. Whatever differs
between deployments comes from the environment (the tests give each run its own database and
exchange this way).
"""

import json
import os
from pathlib import Path
from urllib.parse import urlparse

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("LEDGER_SECRET_KEY", "insecure-example-key-do-not-deploy")
DEBUG = os.environ.get("LEDGER_DEBUG") == "1"
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "celery_domain_events.contrib.django",  # the outbox: model, migration, admin, relay command
    "ledger",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last: plain emit() in a view is transmitted once the view returned, dropped if it raised.
    "celery_domain_events.contrib.django.DomainEventsMiddleware",
]

ROOT_URLCONF = "ledger_site.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
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

# PostgreSQL, from one URL: the outbox relay needs SELECT ... FOR UPDATE SKIP LOCKED.
_db = urlparse(os.environ.get("LEDGER_DB_URL", "postgresql://postgres@127.0.0.1:5432/ledger"))
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _db.path.lstrip("/"),
        "USER": _db.username or "",
        "PASSWORD": _db.password or "",
        "HOST": _db.hostname or "",
        "PORT": str(_db.port or ""),
        # Each request is one transaction: emit_on_commit() publishes after its COMMIT.
        "ATOMIC_REQUESTS": True,
    }
}

USE_TZ = True
TIME_ZONE = "UTC"
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Celery: every CELERY_* setting below is app.conf.<name in lower case, without CELERY_>.
CELERY_BROKER_URL = os.environ.get("LEDGER_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# Domain events: read by DomainEvents(app) as domain_events_service, _exchange, ...
CELERY_DOMAIN_EVENTS_SERVICE = os.environ.get("LEDGER_SERVICE", "ledger")  # queue prefix
CELERY_DOMAIN_EVENTS_EXCHANGE = os.environ.get("LEDGER_EVENTS_EXCHANGE", "domain_events")
CELERY_DOMAIN_EVENTS_UNROUTED_QUEUE = os.environ.get(
    "LEDGER_UNROUTED_QUEUE", "domain_events.unrouted"
)

# Which Celery app emit_on_commit(), outbox.add() and the middleware publish with.
DOMAIN_EVENTS_CELERY_APP = "ledger_site.celery.app"

# Any other setting, as a JSON object (for a deployment, or a test): '{"DEBUG": true}'.
globals().update(json.loads(os.environ.get("LEDGER_EXTRA_SETTINGS", "{}")))
