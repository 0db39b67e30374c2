"""What an outbox row holds, shared by the SQLAlchemy and the Django outbox (one table layout).

A row is the exact message :func:`~celery_domain_events.publishing.send.publish_events` would
send: the CloudEvents body (trace context included), exchange, routing key and AMQP properties.
A relay of either kind can publish the rows of the other.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timedelta, timezone
from typing import Any

from celery_domain_events.events import AnyEvent
from celery_domain_events.exceptions import PublishError
from celery_domain_events.extension import DomainEvents
from celery_domain_events.publishing import spans
from celery_domain_events.publishing.send import outbound_messages
from celery_domain_events.wire import binary, envelope
from celery_domain_events.wire.message import OutboundMessage

__all__ = [
    "DEFAULT_TABLE_NAME",
    "messages_of",
    "now",
    "relay_span",
    "rows_of",
    "split_confirmed",
]

log = logging.getLogger("celery_domain_events.contrib.outbox")

#: Name of the outbox table unless you choose another.
DEFAULT_TABLE_NAME = "domain_events_outbox"


class _Clock:
    """Wall-clock timestamps, strictly increasing within the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = datetime.min.replace(tzinfo=timezone.utc)

    def now(self) -> datetime:
        # Rows of one transaction would otherwise tie at clock resolution and lose emit order.
        with self._lock:
            self._last = max(datetime.now(timezone.utc), self._last + timedelta(microseconds=1))
            return self._last


_clock = _Clock()


def now() -> datetime:
    """A row's ``created_at``: now, and later than every earlier row of this process."""
    return _clock.now()


def rows_of(ext: DomainEvents, events: list[AnyEvent]) -> list[dict[str, Any]]:
    """Return the outbox rows of ``events``: what publishing them now would send."""
    settings = ext.settings
    with spans.create(settings.exchange, settings.service, events) as traceparent:
        messages = outbound_messages(ext, events, traceparent)
    return [
        {
            "id": str(event.event_id),
            "created_at": now(),
            "exchange": message.exchange,
            "routing_key": message.routing_key,
            "body": message.body,
            "properties": message.properties,
            "headers": message.headers,
            "attempts": 0,
        }
        for event, message in zip(events, messages, strict=True)
    ]


def split_confirmed(ids: list[str], exc: PublishError) -> tuple[list[str], list[str]]:
    """Split the row ids of a batch that failed into (confirmed, unconfirmed), and log it.

    The relay deletes the confirmed rows and keeps the others for the next attempt.
    """
    unconfirmed = {str(row_id) for row_id in exc.events}
    confirmed = [row_id for row_id in ids if row_id not in unconfirmed]
    log.warning(
        "Outbox relay: %d event(s) published, %d kept for the next attempt: %s",
        len(confirmed),
        len(unconfirmed),
        exc,
    )
    return confirmed, sorted(unconfirmed)


def relay_span(ext: DomainEvents, rows: Sequence[Any]) -> AbstractContextManager[Any]:
    """The span a relay publishes ``rows`` in, linked to each row's creation context."""
    return spans.relay(ext.settings.exchange, rows)


def messages_of(ext: DomainEvents, rows: Iterable[Any]) -> list[OutboundMessage]:
    """Return the messages that publish outbox ``rows`` (objects with the row's attributes).

    Each message's ``source`` is its row id, so ``PublishError.events`` holds the ids of the
    rows that were not confirmed.
    """
    mandatory = ext.settings.unrouted_queue is None
    return [
        OutboundMessage(
            body=bytes(row.body),
            exchange=row.exchange,
            routing_key=row.routing_key,
            # A row's headers say its mode: binary-mode rows have ce- headers, data as body.
            content_type=binary.DATA_CONTENT_TYPE
            if binary.SPECVERSION_HEADER in row.headers
            else envelope.CONTENT_TYPE,
            properties=dict(row.properties),
            headers=dict(row.headers),
            mandatory=mandatory,
            source=str(row.id),
        )
        for row in rows
    ]
