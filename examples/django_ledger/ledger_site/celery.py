"""The Celery app: ``celery -A ledger_site worker``.

Laid out as in the Celery docs' "First steps with Django". Every setting, the domain events
ones included, is a Django setting with the ``CELERY_`` namespace
(``CELERY_DOMAIN_EVENTS_SERVICE``), so ``DomainEvents(app)`` takes no keyword arguments.
It also discovers the ``handlers`` module of every installed app, as Celery discovers
``tasks``: ``ledger/handlers.py`` is listed nowhere.
"""

import os

from celery import Celery

from celery_domain_events import DomainEvents

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ledger_site.settings")

app = Celery("ledger_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
DomainEvents(app)
