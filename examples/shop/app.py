"""The shop's Celery app: `celery -A examples.shop.app worker`."""

from __future__ import annotations

import os

from celery import Celery

from celery_domain_events import DomainEvents

app = Celery(
    "shop",
    broker=os.environ.get("DOMAIN_EVENTS_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    include=["examples.shop.handlers"],
)
app.conf.update(
    broker_heartbeat=None,
    worker_hijack_root_logger=True,
    task_track_started=True,
    worker_send_task_events=True,
    domain_events_exchange=os.environ.get("DOMAIN_EVENTS_EXCHANGE", "domain_events"),
)
DomainEvents(app, service=os.environ.get("DOMAIN_EVENTS_SERVICE", "shop"))
