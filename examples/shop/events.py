"""The events the shop publishes."""

from __future__ import annotations

from decimal import Decimal
from typing import ClassVar

from celery_domain_events import DomainEvent


class UserCreated(DomainEvent):
    event_name: ClassVar[str] = "user.created"
    event_version: ClassVar[int] = 1

    user_id: int
    email: str


class OrderPaid(DomainEvent):
    event_name: ClassVar[str] = "order.paid"
    event_version: ClassVar[int] = 1

    order_id: int
    amount: Decimal
