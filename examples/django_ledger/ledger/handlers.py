"""The ledger's domain event handlers.

This module is listed nowhere: ``DomainEvents(app)`` discovers the ``handlers`` module of every
installed app when a worker starts, as Celery discovers ``tasks``. Each handler gets its own
durable queue, ``<service>.<handler>``: ``ledger.book_payment``.
"""

import logging

from django.db import transaction

from celery_domain_events import domain_event_handler
from celery_domain_events.contrib.django import outbox

from .events import LedgerEntryBooked, OrderPaid
from .models import LedgerEntry

log = logging.getLogger(__name__)


@domain_event_handler("order.paid")
def book_payment(event: OrderPaid) -> None:
    """Book a paid order once, and announce it through the outbox in the same transaction.

    Delivery is at least once, so the handler is idempotent: ``order_id`` is unique and a
    redelivered (or republished) event books nothing. The outbox row commits or rolls back
    with the entry: ``ledger.entry_booked`` is published (by ``manage.py domain_events_relay``)
    exactly when the entry exists.
    """
    with transaction.atomic():
        entry, created = LedgerEntry.objects.get_or_create(
            order_id=event.order_id,
            defaults={"amount": event.amount, "event_id": str(event.event_id)},
        )
        if not created:
            log.info("order %d is already booked (entry %d)", event.order_id, entry.pk)
            return
        outbox.add(
            LedgerEntryBooked(entry_id=entry.pk, order_id=entry.order_id, amount=entry.amount)
        )
    log.info("booked order %d: %s (entry %d)", event.order_id, event.amount, entry.pk)
