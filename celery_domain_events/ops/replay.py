"""Replaying a dead letter: back to its own handler's queue only, through the retry exchange."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import TYPE_CHECKING

from kombu import Connection

from celery_domain_events.amqp.confirm import publish_confirmed
from celery_domain_events.wire.dead_letter import DeadLetter
from celery_domain_events.wire.topology import RETRY_SUFFIX

if TYPE_CHECKING:
    from celery_domain_events.extension import DomainEvents

__all__ = ["replay"]

log = logging.getLogger(__name__)


def replay(ext: DomainEvents, conn: Connection, letter: DeadLetter) -> None:
    """Publish ``letter`` back to its handler queue (confirmed) through the retry exchange."""
    publish_confirmed(
        lambda: nullcontext(conn),
        [letter.replay_message(ext.settings.exchange + RETRY_SUFFIX)],
        timeout=ext.settings.publish_timeout,
    )
    log.info("Replayed event %s to %s", letter.event_id, letter.handler_queue)
