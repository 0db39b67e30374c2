"""The events the ledger handles and publishes.

``OrderPaid`` is the shop's event (``examples/shop/events.py``), declared here again: services
share the event's name, version and fields, never code. A tolerant reader, the ledger declares
only the fields it uses.
"""

from decimal import Decimal
from typing import ClassVar

from celery_domain_events import DomainEvent


class OrderPaid(DomainEvent):
    """Published by the shop; handled by ``ledger.handlers.book_payment``."""

    event_name: ClassVar[str] = "order.paid"
    event_version: ClassVar[int] = 1

    order_id: int
    amount: Decimal


class LedgerEntryBooked(DomainEvent):
    """Written to the outbox with the entry, in one transaction; the relay publishes it."""

    event_name: ClassVar[str] = "ledger.entry_booked"
    event_version: ClassVar[int] = 1

    entry_id: int
    order_id: int
    amount: Decimal


class InvoiceIssued(DomainEvent):
    """Published by the invoice view once its request's transaction committed."""

    event_name: ClassVar[str] = "invoice.issued"
    event_version: ClassVar[int] = 1

    invoice_id: int
    customer: str
    amount: Decimal
