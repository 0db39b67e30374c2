"""Emit a few events and transmit them, as a web request would after its commit."""

from __future__ import annotations

from decimal import Decimal

from celery_domain_events import emit, transmit

from .app import app
from .events import OrderPaid, UserCreated


def main() -> None:
    emit(UserCreated(user_id=1, email="ada@example.com"))
    emit(OrderPaid(order_id=42, amount=Decimal("19.90")))
    emit("user.disabled", {"user_id": 7})  # untyped: handlers get a GenericEvent
    sent = transmit(app)
    for event in sent:
        print(f"published {event.event_name} id={event.event_id}")


if __name__ == "__main__":
    main()
