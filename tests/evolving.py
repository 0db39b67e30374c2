"""An event that evolved from v1 to v3, with upcasters, and a consumer that takes v3 only.

tests/worker_app.py imports it, so a real worker runs ``evolve_v3``; tests/test_evolution.py
publishes the old and new versions from the test process, as producers that lag or lead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

from celery_domain_events import DomainEvent, domain_event_handler, upcaster


class EvolveV1(DomainEvent):
    event_name: ClassVar[str] = "probe.evolve"
    event_version: ClassVar[int] = 1
    order_id: int
    amount: float


class EvolveV2(DomainEvent):
    event_name: ClassVar[str] = "probe.evolve"
    event_version: ClassVar[int] = 2
    order_id: int
    amount: float
    currency: str


class EvolveV3(DomainEvent):
    event_name: ClassVar[str] = "probe.evolve"
    event_version: ClassVar[int] = 3
    order_id: int
    cents: int
    currency: str


class EvolveV4(DomainEvent):
    """A producer ahead of the consumer: no consumer takes it yet."""

    event_name: ClassVar[str] = "probe.evolve"
    event_version: ClassVar[int] = 4
    order_id: int
    cents: int
    currency: str
    channel: str


@upcaster("probe.evolve", from_version=1)
def evolve_add_currency(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "currency": "EUR"}


@upcaster
def evolve_to_cents(event: EvolveV2) -> EvolveV3:
    return EvolveV3(
        order_id=event.order_id, cents=round(event.amount * 100), currency=event.currency
    )


@domain_event_handler("probe.evolve", retry=None)
def evolve_v3(event: EvolveV3) -> None:
    """Record what arrived: its class, id and data."""
    record = {"type": type(event).__name__, "id": event.event_id, **event.event_data()}
    path = Path(os.environ["TEST_MARKER_DIR"], f"evolve_v3-{event.event_id}")
    path.write_text(json.dumps(record))
