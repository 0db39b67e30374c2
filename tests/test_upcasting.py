"""Upcasters in process: declaring them, the chain a handler needs, what reaches the handler."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from celery import Celery

from celery_domain_events import (
    ConfigurationError,
    DomainEvent,
    DomainEvents,
    GenericEvent,
    RegistrationError,
    domain_event_handler,
    emit,
    transmit,
    upcaster,
)
from celery_domain_events.events import EventRegistry
from celery_domain_events.registry import HandlerRegistry
from celery_domain_events.testing import capture_events
from celery_domain_events.upcasting import UpcasterRegistry, check_handlers

# order.placed, as its producer evolved it: v1 had a float amount, v2 added a currency, v3 keeps
# cents as an int. (Names carry an "up." prefix: other tests declare events too.)


class PlacedV1(DomainEvent):
    event_name: ClassVar[str] = "up.order.placed"
    event_version: ClassVar[int] = 1
    order_id: int
    amount: float


class PlacedV2(DomainEvent):
    event_name: ClassVar[str] = "up.order.placed"
    event_version: ClassVar[int] = 2
    order_id: int
    amount: float
    currency: str


class PlacedV3(DomainEvent):
    event_name: ClassVar[str] = "up.order.placed"
    event_version: ClassVar[int] = 3
    order_id: int
    cents: int
    currency: str


class PlacedV4(DomainEvent):  # a producer ahead of the consumers
    event_name: ClassVar[str] = "up.order.placed"
    event_version: ClassVar[int] = 4
    order_id: int
    cents: int
    currency: str
    channel: str


@upcaster("up.order.placed", from_version=1)
def add_currency(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "currency": "EUR"}


@upcaster
def to_cents(event: PlacedV2) -> PlacedV3:
    return PlacedV3(
        order_id=event.order_id, cents=round(event.amount * 100), currency=event.currency
    )


RECEIVED: list[Any] = []


@domain_event_handler("up.order.placed", name="up_v3", retry=None)
def up_v3(event: PlacedV3) -> None:
    RECEIVED.append(event)


@domain_event_handler("up.order.placed", name="up_v1_or_v3", retry=None)
def up_v1_or_v3(event: PlacedV1 | PlacedV3) -> None:
    RECEIVED.append(event)


@domain_event_handler("up.order.placed", name="up_untyped", retry=None)
def up_untyped(event: DomainEvent | GenericEvent) -> None:
    RECEIVED.append(event)


def app_with(*handlers: Any) -> Celery:
    app = Celery("upcasting", broker="memory://", set_as_current=False)
    DomainEvents(app, service="up", handlers=list(handlers), discover_handlers=False)
    return app


def publish_each_version(app: Celery) -> Any:
    RECEIVED.clear()
    with capture_events(app, fail_fast=False) as events:
        emit(PlacedV1(order_id=1, amount=19.9))
        emit(PlacedV2(order_id=2, amount=5.0, currency="USD"))
        emit(PlacedV3(order_id=3, cents=700, currency="GBP"))
        transmit(app)
        events.join()
    return events


def test_a_handler_taking_v3_receives_v1_and_v2_upcast_and_keeps_their_ids() -> None:
    app = app_with(up_v3)
    events = publish_each_version(app)
    assert events.dead_letters == []
    assert [type(e) for e in RECEIVED] == [PlacedV3] * 3
    assert [(e.order_id, e.cents, e.currency) for e in RECEIVED] == [
        (1, 1990, "EUR"),
        (2, 500, "USD"),
        (3, 700, "GBP"),
    ]
    assert [e.event_id for e in RECEIVED] == [e.event_id for e in events.published]


def test_versions_a_handler_declares_arrive_as_they_are_the_others_upcast() -> None:
    app = app_with(up_v1_or_v3)
    publish_each_version(app)
    assert [type(e) for e in RECEIVED] == [PlacedV1, PlacedV3, PlacedV3]


def test_an_untyped_handler_receives_each_version_as_published() -> None:
    app = app_with(up_untyped)
    publish_each_version(app)
    assert [type(e) for e in RECEIVED] == [PlacedV1, PlacedV2, PlacedV3]


def test_a_version_newer_than_the_handler_takes_is_poison_with_the_reason() -> None:
    app = app_with(up_v3)
    RECEIVED.clear()
    with capture_events(app, fail_fast=False) as events:
        emit(PlacedV4(order_id=4, cents=1, currency="EUR", channel="web"))
        transmit(app)
        events.join()
    assert RECEIVED == []
    [letter] = events.dead_letters
    assert letter.reason == "poison"
    assert "'up.order.placed' v4 is newer than this handler takes (v3)" in letter.failure("message")
    assert "never downcast" in letter.failure("message")


def test_a_failing_upcaster_makes_the_event_poison_with_its_error() -> None:
    app = app_with(up_v3)
    RECEIVED.clear()
    with capture_events(app, fail_fast=False) as events:
        # A producer without the model (emit("up.order.placed", ...) checks it here).
        emit(
            GenericEvent(
                event_name="up.order.placed",
                event_version=2,
                data={"order_id": 5, "amount": "not a number", "currency": "EUR"},
            )
        )
        transmit(app)
        events.join()
    assert RECEIVED == []
    [letter] = events.dead_letters
    assert letter.reason == "poison"
    assert "upcaster tests.test_upcasting.to_cents failed" in letter.failure("message")
    assert "amount: Input should be a valid number" in letter.failure("message")
    assert "not a number" not in str(letter.headers)  # never the event's data


def test_declaring_upcasters_checks_them_where_they_are_written() -> None:
    registry = UpcasterRegistry()
    with pytest.raises(ConfigurationError, match="positive int"):
        upcaster("up.order.placed", 0, registry=registry)
    with pytest.raises(ConfigurationError, match="from one version of an event to the next"):

        @upcaster
        def skips(event: PlacedV1) -> PlacedV3:
            raise AssertionError

    with pytest.raises(ConfigurationError, match="two DomainEvent classes"):

        @upcaster
        def untyped(event: dict[str, Any]) -> dict[str, Any]:
            return event

    with pytest.raises(RegistrationError, match="is upcast by both"):

        @upcaster("up.order.placed", from_version=1)
        def again(data: dict[str, Any]) -> dict[str, Any]:
            return data


def test_a_gap_in_a_chain_a_handler_needs_fails_at_start_up() -> None:
    events = EventRegistry()
    for model in (PlacedV1, PlacedV2, PlacedV3):
        events.register(model)
    handlers = HandlerRegistry()
    upcasters = UpcasterRegistry()
    upcaster("up.order.placed", 1, registry=upcasters)(lambda data: data)

    @domain_event_handler("up.order.placed", name="needs_v3", registry=handlers)
    def needs_v3(event: PlacedV3) -> None: ...

    with pytest.raises(ConfigurationError) as info:
        check_handlers(handlers.all(), events, upcasters)
    message = str(info.value)
    assert "handler needs_v3 takes 'up.order.placed' v3, but v1 events cannot reach it" in message
    assert "no upcaster from v2 to v3 (@upcaster('up.order.placed', from_version=2))" in message
    upcaster("up.order.placed", 2, registry=upcasters)(lambda data: data)
    check_handlers(handlers.all(), events, upcasters)  # complete now


def test_a_worker_refuses_to_start_with_a_gap(tmp_path: Any) -> None:
    app = Celery("gap", broker="memory://", set_as_current=False)
    upcasters = UpcasterRegistry()  # none: v1 and v2 cannot reach up_v3
    DomainEvents(app, service="gap", handlers=[up_v3], upcasters=upcasters)
    with pytest.raises(ConfigurationError, match="v1 events cannot reach it"):
        DomainEvents.of(app).check_upcasters()


def test_no_failure_record_repeats_the_data_that_failed_validation() -> None:
    app = app_with(up_v3)
    with capture_events(app, fail_fast=False) as events:
        emit(
            GenericEvent(
                event_name="up.order.placed",
                event_version=3,
                data={"order_id": 6, "cents": "s3cret-value", "currency": "EUR"},
            )
        )
        transmit(app)
        events.join()
    [letter] = events.dead_letters
    assert "cents: Input should be a valid integer" in letter.failure("message")
    assert "s3cret-value" not in str(letter.headers)  # message and traceback alike


def test_decodable_versions_say_what_a_worker_would_decode() -> None:
    from celery_domain_events.upcasting import decodable_versions

    ext = DomainEvents.of(app_with(up_v3, up_v1_or_v3, up_untyped))
    by_name = {spec.name: spec.event_versions() for spec in ext.handlers}
    name = "up.order.placed"
    assert decodable_versions(by_name["up_v3"], name, ext.events, ext.upcasters) == {1, 2, 3}
    assert decodable_versions(by_name["up_v1_or_v3"], name, ext.events, ext.upcasters) == {1, 2, 3}
    assert decodable_versions(by_name["up_untyped"], name, ext.events, ext.upcasters) == {
        1,
        2,
        3,
        4,
    }
    assert decodable_versions(by_name["up_untyped"], "up.other", ext.events, ext.upcasters) is None
    assert decodable_versions(by_name["up_v3"], name, ext.events, UpcasterRegistry()) == {3}


def test_capture_events_refuses_a_gap_as_a_worker_would() -> None:
    app = Celery("gap-capture", broker="memory://", set_as_current=False)
    DomainEvents(app, service="gap", handlers=[up_v3], upcasters=UpcasterRegistry())
    with pytest.raises(ConfigurationError, match="v1 events cannot reach it"), capture_events(app):
        pass


def test_an_upcast_result_that_fails_the_model_names_the_upcasters() -> None:
    from celery_domain_events.exceptions import EventValidationError
    from celery_domain_events.wire import envelope

    upcasters = UpcasterRegistry()
    upcaster("up.order.placed", 1, registry=upcasters)(lambda data: data)  # forgets currency
    upcaster("up.order.placed", 2, registry=upcasters)(lambda data: {"order_id": 1})
    body = envelope.encode(PlacedV1(order_id=1, amount=1.0), "up")
    with pytest.raises(EventValidationError) as info:
        envelope.to_event(
            envelope.decode(body),
            versions={"up.order.placed": frozenset({3})},
            upcasters=upcasters,
        )
    assert "v1 upcast to v3 by tests.test_upcasting.test_an_upcast_result" in str(info.value)
    assert "cents: Field required" in str(info.value)


def test_an_invalid_envelope_error_does_not_carry_its_values() -> None:
    import json
    import traceback

    from celery_domain_events.exceptions import EventDecodeError
    from celery_domain_events.wire import envelope

    body = json.dumps(
        {"specversion": "1.0", "id": {"card": "s3cret-value"}, "source": "x", "type": "a.b"}
    ).encode()
    with pytest.raises(EventDecodeError) as info:
        envelope.decode(body)
    assert "id: Input should be a valid string" in str(info.value)
    assert "s3cret-value" not in "".join(traceback.format_exception(info.value))
