"""A Celery app with a domain event handler and no ``DomainEvents``: a wiring mistake.

tests/test_programmer_errors.py starts a real worker of it.
"""

from __future__ import annotations

import os

from celery import Celery

from celery_domain_events import GenericEvent, domain_event_handler

app = Celery("no_extension", broker=os.environ["TEST_BROKER_URL"])
app.conf.task_default_queue = os.environ["TEST_TASK_QUEUE"]


@domain_event_handler("probe.forgotten", retry=None)
def forgotten(event: GenericEvent) -> None:
    """Never runs: no worker of this app consumes its queue."""
