"""The in-process harness (celery_domain_events.testing), and one scenario in both modes."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, ClassVar, Protocol

import pytest
from celery import Celery
from kombu import Connection
from kombu.transport import memory

from celery_domain_events import (
    DomainEvent,
    DomainEvents,
    GenericEvent,
    Handler,
    RejectEvent,
    RetryPolicy,
    domain_event_handler,
    emit,
    transmit,
)
from celery_domain_events.amqp.queues import process
from celery_domain_events.amqp.transport import AmqpTransport
from celery_domain_events.testing import CaptureTransport, EventCapture, capture_events
from celery_domain_events.wire.dead_letter import DeadLetter

from .conftest import RECORDER, Recorder, wait_for

pytest_plugins = ["celery_domain_events.testing.pytest_plugin"]


class TtOrderPlaced(DomainEvent):
    event_name: ClassVar[str] = "tt.order.placed"
    event_version: ClassVar[int] = 1

    order_id: int
    total: int = 0


class TtInvoiceSent(DomainEvent):
    event_name: ClassVar[str] = "tt.invoice.sent"
    event_version: ClassVar[int] = 1

    order_id: int


@domain_event_handler("tt.order.placed", name="tt_invoice", retry=None)
def tt_invoice(event: TtOrderPlaced) -> None:
    RECORDER.record("tt_invoice", event)
    emit(TtInvoiceSent(order_id=event.order_id))


@domain_event_handler("tt.#", name="tt_audit", retry=None)
def tt_audit(event: DomainEvent | GenericEvent) -> None:
    RECORDER.record("tt_audit", event)


# Bound exactly as tests/handlers.py's wildcard handlers, under names of this module.
@domain_event_handler("user.#", name="tt_user_hash", retry=None)
def tt_user_hash(event: GenericEvent) -> None:
    RECORDER.record("tt_user_hash", event)


@domain_event_handler("user.*", name="tt_user_star", retry=None)
def tt_user_star(event: GenericEvent) -> None:
    RECORDER.record("tt_user_star", event)


@domain_event_handler("#.created", name="tt_hash_created", retry=None)
def tt_hash_created(event: GenericEvent) -> None:
    RECORDER.record("tt_hash_created", event)


# Backoff of 10 s, then 20 s, without jitter: in process the retries must not wait for it.
@domain_event_handler(
    "tt.flaky", name="tt_flaky", retry=RetryPolicy(max_retries=3, backoff=10, jitter=False)
)
def tt_flaky(event: GenericEvent) -> None:
    attempt = len(RECORDER.get("tt_flaky")) + 1
    RECORDER.record("tt_flaky", attempt)
    emit("tt.flaky.done", {"attempt": attempt})  # discarded with each failed attempt
    if attempt < 3:
        raise ConnectionError(f"transient {attempt}")


@domain_event_handler("tt.fail", name="tt_always_fails", retry=RetryPolicy(max_retries=2))
def tt_always_fails(event: GenericEvent) -> None:
    RECORDER.record("tt_always_fails", event)
    raise RuntimeError(f"boom {len(RECORDER.get('tt_always_fails'))}")


@domain_event_handler("tt.reject", name="tt_rejects", retry=RetryPolicy(max_retries=3))
def tt_rejects(event: GenericEvent) -> None:
    RECORDER.record("tt_rejects", event)
    raise RejectEvent("not for us")


@domain_event_handler("tt.loop", name="tt_loop", retry=None)
def tt_loop(event: GenericEvent) -> None:
    emit("tt.loop", {})


def local_app(*handlers: Handler[..., Any], broker: str = "memory://") -> Celery:
    """An app for in-process tests: only ``handlers``, and a broker that is never used."""
    app = Celery("tt", broker=broker, set_as_current=False)
    DomainEvents(app, service="tt", handlers=list(handlers))
    return app


@pytest.fixture(autouse=True)
def _clean_recorder(recorder: Recorder) -> None:
    """Every test starts with an empty RECORDER (the conftest fixture clears it)."""


def test_typed_event_is_published_and_handled() -> None:
    app = local_app(tt_invoice)
    with capture_events(app) as events:
        placed = emit(TtOrderPlaced(order_id=1, total=990))
        assert transmit(app) == [placed]
        assert events.published == [placed]
        assert events.pending == 1
        events.join()
        assert events.pending == 0
    published = events.published[0]
    assert isinstance(published, TtOrderPlaced)
    assert published.total == 990
    assert events.handled(tt_invoice)[0] == placed
    assert RECORDER.get("tt_invoice") == [placed]
    assert events.messages[0].routing_key == "tt.order.placed"
    assert events.dead_letters == []


KEYS = ["user", "user.created", "user.a.b", "created", "order.created"]


def test_routing_is_amqp_exact() -> None:
    app = local_app(tt_user_hash, tt_user_star, tt_hash_created)
    with capture_events(app) as events:
        for key in KEYS:
            emit(key, {})
        transmit(app)
        events.join()

    def names(handler: Handler[..., Any]) -> list[str]:
        return [e.event_name for e in events.handled(handler)]

    # RabbitMQ's semantics; kombu's memory:// gets the first and the last one wrong.
    assert names(tt_user_hash) == ["user", "user.created", "user.a.b"]
    assert names(tt_user_star) == ["user.created"]
    assert names(tt_hash_created) == ["user.created", "created", "order.created"]
    assert events.handled("tt_user_hash") == events.handled(tt_user_hash)


def test_events_emitted_by_a_handler_are_delivered_in_turn() -> None:
    app = local_app(tt_invoice, tt_audit)
    with capture_events(app) as events:
        placed = emit(TtOrderPlaced(order_id=2))
        transmit(app)
        events.join()
    first, sent = events.published
    assert first == placed
    assert isinstance(sent, TtInvoiceSent)
    assert sent.order_id == 2
    assert events.handled(tt_invoice) == [placed]
    assert events.handled(tt_audit) == [placed, sent]  # the chained event went through routing


def test_retries_run_at_once_and_a_failed_attempt_emits_nothing() -> None:
    app = local_app(tt_flaky)
    started = time.monotonic()
    with capture_events(app) as events:
        emit("tt.flaky", {})
        transmit(app)
        events.join()
    # The countdowns (10 s, 20 s) are skipped; the bound leaves room for a loaded CI machine.
    assert time.monotonic() - started < 5
    assert RECORDER.get("tt_flaky") == [1, 2, 3]
    assert [e.event_name for e in events.handled(tt_flaky)] == ["tt.flaky"]
    assert [e.event_data() for e in events.published[1:]] == [{"attempt": 3}]
    assert events.dead_letters == []


def test_spent_retries_dead_letter_the_event() -> None:
    app = local_app(tt_always_fails)
    with capture_events(app, fail_fast=False) as events:
        event = emit("tt.fail", {"n": 1})
        transmit(app)
        events.join()
    assert len(RECORDER.get("tt_always_fails")) == 3
    [letter] = events.dead_letters
    assert isinstance(letter, DeadLetter)  # the type the dead-letter CLI reads from RabbitMQ
    assert letter.handler == "tt_always_fails"
    assert letter.reason == "retries-exhausted"
    assert letter.attempts == 3  # max_retries + 1
    assert letter.exception == "builtins.RuntimeError"
    assert letter.failure("message") == "boom 3"
    assert letter.queue == "tt.tt_always_fails.dlq"
    assert letter.body == events.messages[0].body  # byte for byte
    assert letter.event == event
    assert isinstance(letter.error, RuntimeError)
    assert events.handled(tt_always_fails) == []


def test_reject_event_dead_letters_without_retries() -> None:
    app = local_app(tt_rejects)
    with capture_events(app) as events:
        emit("tt.reject", {})
        transmit(app)
        with pytest.raises(RejectEvent, match="not for us"):
            events.join()
    assert len(RECORDER.get("tt_rejects")) == 1
    [letter] = events.dead_letters
    assert (letter.reason, letter.attempts) == ("rejected", 1)
    assert letter.exception == "celery_domain_events.exceptions.RejectEvent"


def test_join_reraises_the_first_failure_after_running_every_delivery() -> None:
    app = local_app(tt_always_fails, tt_audit)
    with capture_events(app) as events:
        emit("tt.fail", {"n": 1})
        emit("tt.fail", {"n": 2})
        transmit(app)
        with pytest.raises(RuntimeError, match=r"^boom 3$") as raised:
            events.join()
        assert raised.value is events.dead_letters[0].error
        # The other deliveries ran: the audit, and the second event's three attempts.
        assert len(events.handled(tt_audit)) == 2
        assert [d.failure("message") for d in events.dead_letters] == ["boom 3", "boom 6"]
        events.join()  # each failure is raised by the join that ran it, once
        emit("tt.fail", {"n": 3})
        transmit(app)
        events.join(fail_fast=False)
    assert len(events.dead_letters) == 3


def test_join_times_out_on_an_endless_chain() -> None:
    app = local_app(tt_loop)
    with capture_events(app) as events:
        emit("tt.loop", {})
        transmit(app)
        with pytest.raises(TimeoutError, match="still pending"):
            events.join(timeout=0.2)
        assert events.pending == 1


@pytest.mark.parametrize("broker", ["memory://", "amqp://guest:guest@127.0.0.1:1//"])
def test_no_broker_is_needed(broker: str, monkeypatch: pytest.MonkeyPatch) -> None:
    connects: list[str] = []

    def refuse(conn: Connection) -> Any:
        connects.append(conn.as_uri())
        raise AssertionError(f"the harness connected to {conn.as_uri()}")

    monkeypatch.setattr(Connection, "_establish_connection", refuse)
    memory_queues = dict(memory.Channel.queues)
    app = local_app(tt_invoice, tt_audit, tt_always_fails, broker=broker)
    with capture_events(app, fail_fast=False) as events:
        emit(TtOrderPlaced(order_id=3))
        emit("tt.fail", {})
        transmit(app)
        events.join()
    assert len(events.handled(tt_audit)) == 3
    assert len(events.dead_letters) == 1  # dead letters go through the harness too
    assert connects == []
    assert memory.Channel.queues == memory_queues  # nothing reached kombu's memory transport


def test_the_transport_is_restored_and_the_capture_closed() -> None:
    app = local_app(tt_invoice)
    ext = DomainEvents.of(app)
    broker = ext.transport
    assert isinstance(broker, AmqpTransport)
    with capture_events(app) as outer:
        outer_transport = ext.transport
        assert isinstance(outer_transport, CaptureTransport)
        assert outer_transport.capture is outer
        with capture_events(app) as inner:
            emit(TtOrderPlaced(order_id=4))
            transmit(app)
        assert ext.transport is outer_transport
        emit(TtOrderPlaced(order_id=5))
        transmit(app)
    assert ext.transport is broker
    assert [e.event_data()["order_id"] for e in inner.published] == [4]
    assert [e.event_data()["order_id"] for e in outer.published] == [5]
    assert inner.pending == outer.pending == 0  # dropped on exit, never delivered later
    with pytest.raises(RuntimeError, match="after capture_events"):
        outer.join()
    outer.clear()
    assert outer.published == []


def test_handled_rejects_a_handler_the_app_does_not_have() -> None:
    app = local_app(tt_invoice)
    with capture_events(app) as events, pytest.raises(ValueError, match="tt_audit"):
        events.handled(tt_audit)


# One scenario, two modes (faststream's with_real): the same body runs in process and against
# RabbitMQ with a real worker. Only the second is evidence for the broker's behaviour.


class TtSignedUp(DomainEvent):
    event_name: ClassVar[str] = "tt.mode.signed_up"
    event_version: ClassVar[int] = 1

    user_id: int
    email: str


class TtWelcomed(DomainEvent):
    event_name: ClassVar[str] = "tt.mode.welcomed"
    event_version: ClassVar[int] = 1

    user_id: int


@domain_event_handler("tt.mode.signed_up", name="tt_mode_welcome", retry=None)
def tt_mode_welcome(event: TtSignedUp) -> None:
    RECORDER.record("tt_mode_welcome", event)
    emit(TtWelcomed(user_id=event.user_id))


@domain_event_handler("tt.mode.#", name="tt_mode_audit", retry=None)
def tt_mode_audit(event: DomainEvent | GenericEvent) -> None:
    RECORDER.record("tt_mode_audit", event)


@domain_event_handler("tt.mode.signed_up", name="tt_mode_reject", retry=RetryPolicy(max_retries=2))
def tt_mode_reject(event: TtSignedUp) -> None:
    raise RejectEvent(f"user {event.user_id} is not ours")


MODE_HANDLERS = [tt_mode_welcome, tt_mode_audit, tt_mode_reject]


class Bus(Protocol):
    app: Celery

    def running(self) -> AbstractContextManager[None]: ...

    def settle(self, done: Callable[[], bool]) -> None: ...

    def dead_letters(self, handler: Handler[..., Any]) -> list[DeadLetter]: ...


class InProcessBus:
    def __init__(self, capture: Callable[..., EventCapture]) -> None:
        self.app = local_app(*MODE_HANDLERS)
        self._capture = capture
        self._events: EventCapture | None = None

    @contextmanager
    def running(self) -> Iterator[None]:
        self._events = self._capture(self.app, fail_fast=False)  # the scenario dead-letters
        yield

    def settle(self, done: Callable[[], bool]) -> None:
        assert self._events is not None
        self._events.join()
        assert done()

    def dead_letters(self, handler: Handler[..., Any]) -> list[DeadLetter]:
        assert self._events is not None
        return [d for d in self._events.dead_letters if d.handler == handler.name]


class RabbitBus:
    def __init__(self, request: pytest.FixtureRequest) -> None:
        self.app = request.getfixturevalue("domain_events_app")(handlers=MODE_HANDLERS)
        self._worker = request.getfixturevalue("domain_events_worker")
        self._url: str = request.getfixturevalue("domain_events_broker_url")

    @contextmanager
    def running(self) -> Iterator[None]:
        with self._worker(self.app):
            yield

    def settle(self, done: Callable[[], bool]) -> None:
        wait_for(done, timeout=20, interval=0.2)

    def dead_letters(self, handler: Handler[..., Any]) -> list[DeadLetter]:
        ext = DomainEvents.of(self.app)
        with Connection(self._url) as conn:  # read without acking: they stay in the DLQ
            return process(conn, ext.topology.dead_letter_queue(handler.spec).name)


@pytest.fixture(
    params=[
        "in_process",
        pytest.param(
            "rabbitmq", marks=[pytest.mark.rabbitmq, pytest.mark.worker, pytest.mark.matrix]
        ),
    ]
)
def broker_mode(request: pytest.FixtureRequest) -> str:
    mode: str = request.param
    return mode


@pytest.fixture
def bus(broker_mode: str, request: pytest.FixtureRequest) -> Bus:
    if broker_mode == "in_process":
        return InProcessBus(request.getfixturevalue("domain_events_capture"))
    return RabbitBus(request)


def test_signup_scenario(bus: Bus, recorder: Recorder) -> None:
    with bus.running():
        signed_up = emit(TtSignedUp(user_id=7, email="ada@example.com"))
        transmit(bus.app)
        bus.settle(
            lambda: (
                len(recorder.get("tt_mode_audit")) == 2
                and len(bus.dead_letters(tt_mode_reject)) == 1
            )
        )
    assert recorder.get("tt_mode_welcome") == [signed_up]
    audit = sorted(recorder.get("tt_mode_audit"), key=lambda e: e.event_name)
    assert audit[0] == signed_up
    assert isinstance(audit[1], TtWelcomed)
    assert audit[1].user_id == 7
    [letter] = bus.dead_letters(tt_mode_reject)
    assert letter.reason == "rejected"
    assert letter.failure("attempts") == 1
    assert letter.failure("handler") == "tt_mode_reject"
    assert letter.failure("exception") == "celery_domain_events.exceptions.RejectEvent"
    assert json.loads(letter.body)["id"] == str(signed_up.event_id)


def test_handlers_may_run_in_another_thread() -> None:
    # The harness records under a lock: a handler's own threads may publish through it.
    app = local_app(tt_audit)
    with capture_events(app) as events:
        thread = threading.Thread(target=lambda: (emit("tt.thread", {}), transmit(app)))
        thread.start()
        thread.join()
        events.join()
    assert [e.event_name for e in events.handled(tt_audit)] == ["tt.thread"]


class _Unpicklable(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()  # what a client error may carry (a session, a socket)


@domain_event_handler("tt.unpicklable", name="tt_unpicklable", retry=None)
def tt_unpicklable(event: GenericEvent) -> None:
    raise _Unpicklable("cannot pickle me")


def test_an_unpicklable_error_is_dead_lettered_once() -> None:
    app = local_app(tt_unpicklable)
    with capture_events(app, fail_fast=False) as events:
        emit("tt.unpicklable", {})
        transmit(app)
        events.join()
    assert [d.exception for d in events.dead_letters] == [f"{__name__}._Unpicklable"]
