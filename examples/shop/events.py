"""The events the shop publishes."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, ClassVar

from celery_domain_events import DomainEvent, upcaster


class UserCreated(DomainEvent):
    event_name: ClassVar[str] = "user.created"
    event_version: ClassVar[int] = 1

    user_id: int
    email: str


class OrderPaid(DomainEvent):
    """Version 1, which producers not yet upgraded still emit."""

    event_name: ClassVar[str] = "order.paid"
    event_version: ClassVar[int] = 1

    order_id: int
    amount: Decimal


class OrderPaidV2(DomainEvent):
    """Version 2 names the currency; handlers that take it receive v1 events upcast."""

    event_name: ClassVar[str] = "order.paid"
    event_version: ClassVar[int] = 2

    order_id: int
    amount: Decimal
    currency: str


@upcaster("order.paid", from_version=1)
def order_paid_in_euros(data: dict[str, Any]) -> dict[str, Any]:
    """Every v1 payment was in euros."""
    return {**data, "currency": "EUR"}
