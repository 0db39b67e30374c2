"""Handlers of three teams, each with its own durable queue."""

from __future__ import annotations

import logging

from celery_domain_events import DomainEvent, GenericEvent, domain_event_handler

from .events import OrderPaidV2, UserCreated

log = logging.getLogger(__name__)


@domain_event_handler("user.created")
def send_welcome_email(event: UserCreated) -> None:
    log.warning(
        "HANDLED send_welcome_email: welcome mail to %s (user %d)", event.email, event.user_id
    )


@domain_event_handler("order.*")
def book_revenue(event: OrderPaidV2) -> None:  # v1 events arrive upcast (see events.py)
    log.warning(
        "HANDLED book_revenue: order %d paid %s %s", event.order_id, event.amount, event.currency
    )


@domain_event_handler("user.#", "order.#")
def audit_trail(event: DomainEvent | GenericEvent) -> None:
    log.warning(
        "HANDLED audit_trail: %s v%d id=%s", event.event_name, event.event_version, event.event_id
    )
