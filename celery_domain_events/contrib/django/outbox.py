"""The Django outbox: events written in your ``atomic()`` block, relayed to RabbitMQ later.

::

    # settings.py
    INSTALLED_APPS = [..., "celery_domain_events.contrib.django"]  # then: manage.py migrate

    from celery_domain_events.contrib.django import outbox

    with transaction.atomic():
        order = Order.objects.create(total=42)
        outbox.add(OrderPaid(order_id=order.pk))  # committed or rolled back with the order

    # a process of its own (or the SQLAlchemy relay: the table is the same)
    python manage.py domain_events_relay

The table is the one :class:`celery_domain_events.contrib.outbox.Outbox` uses, so either relay
publishes the rows of either writer. A relay locks up to ``limit`` of the oldest rows
(``SELECT ... FOR UPDATE SKIP LOCKED``), publishes them with publisher confirms, and deletes
them in the same transaction: any number of relays can run side by side. Delivery is at least
once: a relay that dies after the confirms and before its ``COMMIT`` leaves the rows for the
next one, which publishes them again with the same event ids. Nothing is deleted before the
broker confirmed it. Use PostgreSQL (or another database with ``SKIP LOCKED``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from celery import Celery
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections, transaction
from django.db.models import F

from celery_domain_events import metrics
from celery_domain_events.contrib._outbox_rows import (
    messages_of,
    relay_span,
    rows_of,
    split_confirmed,
)
from celery_domain_events.contrib.django.celery_app import resolve_app
from celery_domain_events.contrib.django.models import OutboxMessage
from celery_domain_events.events import AnyEvent
from celery_domain_events.exceptions import PublishError
from celery_domain_events.extension import DomainEvents
from celery_domain_events.publishing.send import as_event

__all__ = ["add", "relay_forever", "relay_once", "store"]

log = logging.getLogger(__name__)

#: Called between the broker's confirms and the DELETE of a relay (crash tests set it).
_after_publish: Callable[[], None] | None = None


def _ext(app: Celery | None) -> DomainEvents:
    ext = DomainEvents.of(resolve_app(app))
    _ = ext.settings  # read now: a misspelled setting fails here, not at the first row
    return ext


def add(
    event: AnyEvent | str,
    data: Mapping[str, Any] | None = None,
    *,
    version: int = 1,
    using: str | None = None,
    app: Celery | None = None,
) -> AnyEvent:
    """Write an event to the outbox in the current transaction of database ``using``.

    Args:
        event: a ``DomainEvent`` instance, or an event name for an untyped event.
        data: the payload of an untyped event.
        version: the version of an untyped event.
        using: the database alias (default: ``"default"``).
        app: the Celery app whose settings apply (default: setting
            ``DOMAIN_EVENTS_CELERY_APP``, else ``celery.current_app``).

    Returns:
        The event (a ``GenericEvent`` for untyped ones).
    """
    event = as_event(event, data, version=version)
    store(_ext(app), [event], using=using)
    return event


def store(ext: DomainEvents, events: list[AnyEvent], *, using: str | None = None) -> None:
    """Write ``events`` to the outbox of database ``using`` (in its current transaction)."""
    rows = [OutboxMessage(**row) for row in rows_of(ext, events)]
    OutboxMessage.objects.using(using or DEFAULT_DB_ALIAS).bulk_create(rows)


def relay_once(*, limit: int = 500, using: str | None = None, app: Celery | None = None) -> int:
    """Publish up to ``limit`` of the oldest unlocked rows, then delete them.

    Returns:
        How many events were published (0 when the outbox is empty or fully locked).

    Raises:
        PublishError: the broker did not confirm some rows; their ids are in
            ``error.events``, their ``attempts`` went up and they stay in the outbox. Rows that
            were confirmed are deleted.
    """
    ext = _ext(app)
    db = using or DEFAULT_DB_ALIAS
    rows_of_db = OutboxMessage.objects.using(db)
    # SQLite locks the whole database and has no SKIP LOCKED; PostgreSQL and MySQL do.
    skip_locked = connections[db].features.has_select_for_update_skip_locked
    with transaction.atomic(using=db):
        rows = list(
            rows_of_db.select_for_update(skip_locked=skip_locked).order_by("created_at", "id")[
                :limit
            ]
        )
        if not rows:
            return 0
        ids = [row.id for row in rows]
        messages = messages_of(ext, rows)
        try:
            with relay_span(ext, rows), metrics.publishing(ext.settings, messages):
                ext.publish(messages, declare=ext.topology.publisher_entities())
        except PublishError as exc:
            confirmed, unconfirmed = split_confirmed(ids, exc)
            rows_of_db.filter(id__in=confirmed).delete()
            rows_of_db.filter(id__in=unconfirmed).update(attempts=F("attempts") + 1)
            error = exc
        else:
            if _after_publish is not None:
                _after_publish()
            rows_of_db.filter(id__in=ids).delete()
            return len(rows)
    raise error  # once the transaction committed: the confirmed rows are gone for good


def relay_forever(
    *,
    interval: float = 1.0,
    limit: int = 500,
    using: str | None = None,
    app: Celery | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Relay until ``stop`` is set, waiting ``interval`` seconds whenever caught up.

    Broker and database outages are logged and retried after ``interval``.

    Returns:
        How many events were relayed in total.
    """
    stop = stop or threading.Event()
    total = 0
    while not stop.is_set():
        try:
            count = relay_once(limit=limit, using=using, app=app)
        except (PublishError, DatabaseError) as exc:
            log.warning("Outbox relay failed, retrying in %.1f s: %s", interval, exc)
            count = 0
        if count:
            total += count
            log.info("Relayed %d event(s) from the outbox", count)
        if count < limit:  # caught up (or failed): do not spin
            stop.wait(interval)
    return total
