"""The worker's dead letters: publish one, confirmed, before its delivery is acked.

A transient handler has no dead-letter queue: its final failures are logged instead
(:func:`drop`), and the delivery is acked.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from celery_domain_events.wire.dead_letter import HEADER_PREFIX
from celery_domain_events.wire.message import OutboundMessage
from celery_domain_events.wire.topology import DLQ_SUFFIX, Auxiliary

if TYPE_CHECKING:
    from celery_domain_events.extension import DomainEvents

__all__ = ["drop", "send"]

log = logging.getLogger(__name__)


def send(ext: DomainEvents, message: OutboundMessage) -> None:
    """Publish a dead letter and wait for its confirm (declaring the DLQ if needed).

    Raises:
        PublishError: the broker did not confirm within ``domain_events_publish_timeout``.
    """
    spec = ext.handler_for_queue(message.routing_key.removesuffix(DLQ_SUFFIX))
    # A DLQ that exists with other arguments still takes dead letters: never fail on it.
    declare = [Auxiliary(ext.topology.dead_letter_queue(spec))] if spec is not None else []
    ext.publish([message], declare=declare)
    log.warning(
        "Dead-lettered event %s to %s: %s %s",
        message.properties.get("message_id", "?"),
        message.routing_key,
        message.headers.get(HEADER_PREFIX + "reason"),
        message.headers.get(HEADER_PREFIX + "exception"),
    )


#: The failure record's fields :func:`drop` logs (never the body: it holds the event's data).
_SUMMARY = ("reason", "handler", "queue", "attempts", "exception", "message", "routing-key")


def drop(message: OutboundMessage) -> None:
    """Log the failure record of a transient handler's dead letter at ERROR; publish nothing."""
    record = {k: message.headers.get(HEADER_PREFIX + k) for k in _SUMMARY}
    log.error(
        "Dropped event %s (%s) of transient handler %s after %s attempt(s), no DLQ: %s %s: %s",
        message.properties.get("message_id", "?"),
        message.properties.get("type", "?"),
        record["handler"],
        record["attempts"],
        record["reason"],
        record["exception"],
        record["message"],
        extra={"failure": record, "event_id": message.properties.get("message_id")},
    )
