"""OpenTelemetry spans (#17): publishing, handler runs, batches, the outbox, and one trace end to
end across a real broker and a real worker."""

from __future__ import annotations

import json
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from celery_domain_events import (
    Batch,
    BatchItemsFailed,
    DomainEvent,
    GenericEvent,
    PublishError,
    domain_event_handler,
    emit,
    transmit,
)
from celery_domain_events.contrib._outbox_rows import relay_span, rows_of
from celery_domain_events.extension import DomainEvents
from celery_domain_events.publishing import spans
from celery_domain_events.registry import HandlerRegistry
from celery_domain_events.testing import capture_events
from celery_domain_events.tracing import current_traceparent, trace_id, use_traceparent
from celery_domain_events.wire import envelope

from .conftest import Topology, WorkerProcess, wait_for
from .test_untrusted import POOLS


class Signup(DomainEvent):
    event_name: ClassVar[str] = "oteltest.signup"
    n: int = 0


class Otel:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("tests")

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if name in {None, s.name}]

    def one(self, name: str) -> ReadableSpan:
        [span] = self.spans(name)
        return span


@pytest.fixture
def otel(monkeypatch: pytest.MonkeyPatch) -> Iterator[Otel]:
    """An SDK tracer provider with an in-memory exporter, global for this test only."""
    state = Otel()
    # The API lets a process set its provider once; tests swap it (as opentelemetry's own
    # test utilities do) so other tests keep running without one.
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", state.provider)
    yield state
    state.provider.shutdown()


def _hex(value: int, width: int) -> str:
    return f"{value:0{width}x}"


def _tp(span: ReadableSpan) -> str:
    ctx = span.context
    return f"00-{_hex(ctx.trace_id, 32)}-{_hex(ctx.span_id, 16)}-{int(ctx.trace_flags):02x}"


def _carried(message: Any) -> str:
    traceparent = envelope.decode(message.body).traceparent
    assert traceparent is not None
    return traceparent


# ----------------------------------------------------------------------------- publishing


def test_transmit_publishes_in_a_producer_span_whose_context_the_events_carry(
    topology: Topology, otel: Otel
) -> None:
    app = topology.app("pub")
    exchange = DomainEvents.of(app).settings.exchange
    with capture_events(app) as events:
        with otel.tracer.start_as_current_span("web request") as request:
            emit(Signup(n=1))
            transmit(app)
            emit(Signup(n=2))
            emit(Signup(n=3))
            transmit(app)
        one, batch = otel.spans(f"publish {exchange}")
    root = request.get_span_context()
    for span in (one, batch):
        assert span.kind is SpanKind.PRODUCER
        assert span.parent is not None
        assert span.parent.span_id == root.span_id
        assert span.context.trace_id == root.trace_id
        assert span.attributes["messaging.system"] == "rabbitmq"
        assert span.attributes["messaging.operation.type"] == "send"
        assert span.attributes["messaging.destination.name"] == exchange
    # One event: its own attributes; a batch: its size, no per-message attributes.
    first = events.published[0]
    assert one.attributes["messaging.message.id"] == str(first.event_id)
    assert one.attributes["cloudevents.event_id"] == str(first.event_id)
    assert one.attributes["cloudevents.event_type"] == "oteltest.signup"
    assert one.attributes["cloudevents.event_source"] == topology.service("pub")
    assert one.attributes["cloudevents.event_spec_version"] == "1.0"
    assert one.attributes["messaging.rabbitmq.destination.routing_key"] == "oteltest.signup"
    assert "messaging.batch.message_count" not in one.attributes
    assert batch.attributes["messaging.batch.message_count"] == 2
    assert "messaging.message.id" not in batch.attributes
    # Each event carries its batch's span as its traceparent: the trace continues from there.
    carried = [_carried(m) for m in events.messages]
    assert carried[0] == _tp(one)
    assert carried[1] == carried[2]
    assert carried[1] == _tp(batch)


def test_use_traceparent_is_the_parent_of_the_publish_span(topology: Topology, otel: Otel) -> None:
    app = topology.app("pub")
    given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with capture_events(app) as events, use_traceparent(given):
        emit(Signup())
        transmit(app)
    [span] = otel.spans()
    assert span.parent is not None
    assert _hex(span.parent.span_id, 16) == "00f067aa0ba902b7"
    assert trace_id(_carried(events.messages[0])) == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_a_failed_publish_fails_its_span(
    topology: Topology, otel: Otel, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = topology.app("pub")

    def refuse(messages: Any, declare: Any = ()) -> None:
        raise PublishError("not confirmed", events=[m.source for m in messages])

    with capture_events(app):
        monkeypatch.setattr(DomainEvents.of(app), "publish", refuse)
        emit(Signup())
        with pytest.raises(PublishError):
            transmit(app)
    [span] = otel.spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "celery_domain_events.exceptions.PublishError"


def test_without_an_sdk_no_span_and_the_trace_context_is_as_before(topology: Topology) -> None:
    assert spans.tracer() is None  # the API alone: the no-op provider records nothing
    app = topology.app("pub")
    given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with capture_events(app) as events, use_traceparent(given):
        emit(Signup())
        transmit(app)
    assert _carried(events.messages[0]) == given


def test_without_opentelemetry_installed_publishing_and_handling_work(
    topology: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spans, "_trace", None)
    registry = HandlerRegistry()
    seen: list[str | None] = []

    @domain_event_handler("oteltest.signup", registry=registry)
    def record(event: Signup) -> None:
        seen.append(current_traceparent())

    app = topology.app("noapi", registry=registry)
    with capture_events(app) as events:
        emit(Signup())
        transmit(app)
        events.join()
    carried = _carried(events.messages[0])
    [inside] = seen
    assert trace_id(inside) == trace_id(carried)
    assert inside != carried  # a child span of it, as before


# ----------------------------------------------------------------------------- handling


def test_a_handler_runs_in_a_consumer_span_child_of_and_linked_to_the_producer(
    topology: Topology, otel: Otel
) -> None:
    registry = HandlerRegistry()
    inside: list[str | None] = []

    @domain_event_handler("oteltest.signup", registry=registry)
    def welcome(event: Signup) -> None:
        inside.append(current_traceparent())
        emit("oteltest.welcomed", {"n": event.n})

    app = topology.app("h", registry=registry)
    ext = DomainEvents.of(app)
    queue = ext.topology.handler_queue_name(ext.handlers[0])
    with capture_events(app) as events:
        with otel.tracer.start_as_current_span("web request"):
            emit(Signup(n=7))
            transmit(app)
        events.join()
    first, then = otel.spans(f"publish {ext.settings.exchange}")
    run = otel.one(f"process {queue}")
    assert run.kind is SpanKind.CONSUMER
    assert run.parent is not None
    assert run.parent.span_id == first.context.span_id
    assert run.context.trace_id == first.context.trace_id
    assert [link.context.span_id for link in run.links] == [first.context.span_id]
    signup = events.published[0]
    assert run.attributes["messaging.operation.type"] == "process"
    assert run.attributes["messaging.destination.subscription.name"] == queue
    assert run.attributes["messaging.message.id"] == str(signup.event_id)
    assert run.attributes["cloudevents.event_type"] == "oteltest.signup"
    assert run.attributes["celery_domain_events.handler"] == "welcome"
    assert run.status.status_code is StatusCode.UNSET
    # Inside the run the current trace context is the run's span; what it emits is its child.
    assert inside == [_tp(run)]
    assert then.parent is not None
    assert then.parent.span_id == run.context.span_id
    assert then.attributes["cloudevents.event_type"] == "oteltest.welcomed"


def test_a_failing_handler_fails_its_span(topology: Topology, otel: Otel) -> None:
    registry = HandlerRegistry()

    @domain_event_handler("oteltest.signup", retry=None, registry=registry)
    def broken(event: Signup) -> None:
        raise ValueError("mail server down")

    app = topology.app("f", registry=registry)
    with capture_events(app, fail_fast=False) as events:
        emit(Signup())
        transmit(app)
        events.join()
    [run] = [s for s in otel.spans() if s.kind is SpanKind.CONSUMER]
    assert run.status.status_code is StatusCode.ERROR
    assert run.status.description == "ValueError: mail server down"
    assert run.attributes["error.type"] == "builtins.ValueError"
    [exception] = run.events
    assert exception.name == "exception"
    assert exception.attributes["exception.message"] == "mail server down"
    assert len(events.dead_letters) == 1


def test_a_batch_runs_in_one_span_linked_to_each_event(topology: Topology, otel: Otel) -> None:
    registry = HandlerRegistry()

    @domain_event_handler("oteltest.signup", batch=Batch(max_size=3), retry=None, registry=registry)
    def sink(events: list[Signup]) -> None:
        emit("oteltest.counted", {"count": len(events)})
        raise BatchItemsFailed((e, RuntimeError("odd")) for e in events if e.n % 2)

    app = topology.app("b", registry=registry)
    with capture_events(app, fail_fast=False) as events:
        with otel.tracer.start_as_current_span("request a"):
            emit(Signup(n=1))
            transmit(app)
        with otel.tracer.start_as_current_span("request b"):
            emit(Signup(n=2))
            emit(Signup(n=4))
            transmit(app)
        events.join()
    publish_a, publish_b, counted = otel.spans(f"publish {DomainEvents.of(app).settings.exchange}")
    [run] = [s for s in otel.spans() if s.kind is SpanKind.CONSUMER]
    assert run.attributes["messaging.batch.message_count"] == 3
    ids = [str(e.event_id) for e in events.published[:3]]
    links = [(link.context.span_id, link.attributes["messaging.message.id"]) for link in run.links]
    assert links == [
        (publish_a.context.span_id, ids[0]),
        (publish_b.context.span_id, ids[1]),
        (publish_b.context.span_id, ids[2]),
    ]
    # One of the three failed alone: the run's span says so; what it emitted is its child.
    assert run.status.status_code is StatusCode.ERROR
    assert run.attributes["celery_domain_events.batch.failed_count"] == 1
    assert counted.parent is not None
    assert counted.parent.span_id == run.context.span_id


def test_with_celerys_own_instrumentation_the_run_keeps_the_events_trace(
    topology: Topology, otel: Otel
) -> None:
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    registry = HandlerRegistry()

    @domain_event_handler("oteltest.signup", registry=registry)
    def greet(event: Signup) -> None:
        pass

    app = topology.app("ci", registry=registry)
    instrumentor = CeleryInstrumentor()
    instrumentor.instrument(tracer_provider=otel.provider)
    try:
        with capture_events(app) as events:
            emit(Signup())
            transmit(app)
            events.join()
    finally:
        instrumentor.uninstrument()
    [publish] = [s for s in otel.spans() if s.kind is SpanKind.PRODUCER]
    celery_run = otel.one(f"run/{app.tasks[DomainEvents.of(app).handlers[0].task_name].name}")
    [run] = [s for s in otel.spans() if s.name.startswith("process ")]
    # Celery's span starts a trace of its own (a handler's task message carries no trace
    # headers): the handler's span stays in the event's trace and links Celery's.
    assert run.parent is not None
    assert run.parent.span_id == publish.context.span_id
    assert {link.context.span_id for link in run.links} == {
        publish.context.span_id,
        celery_run.context.span_id,
    }


# ----------------------------------------------------------------------------- outbox


def test_an_outbox_row_is_created_in_a_span_its_relay_links(topology: Topology, otel: Otel) -> None:
    app = topology.app("ob")
    ext = DomainEvents.of(app)
    with otel.tracer.start_as_current_span("web request") as request:
        [row] = rows_of(ext, [Signup()])
    create = otel.one(f"create {ext.settings.exchange}")
    assert create.kind is SpanKind.PRODUCER
    assert create.attributes["messaging.operation.type"] == "create"
    assert create.parent is not None
    assert create.parent.span_id == request.get_span_context().span_id
    carried = envelope.decode(row["body"]).traceparent
    assert carried == _tp(create)
    rows = [types.SimpleNamespace(body=row["body"]), types.SimpleNamespace(body=b"not json")]
    with relay_span(ext, rows):
        pass
    relay = otel.one(f"publish {ext.settings.exchange}")
    assert relay.kind is SpanKind.CLIENT
    assert relay.attributes["messaging.batch.message_count"] == 2
    assert [link.context.span_id for link in relay.links] == [create.context.span_id]


# ----------------------------------------------------------------------------- end to end


def _worker_spans(markers: Path) -> list[dict[str, Any]]:
    found = []
    for path in markers.glob("spans-*.jsonl"):
        found += [json.loads(line) for line in path.read_text().splitlines() if line]
    return found


@pytest.mark.rabbitmq
@pytest.mark.worker
@pytest.mark.slow
@pytest.mark.parametrize("pool", list(POOLS))
def test_one_trace_from_a_web_request_through_two_handlers_in_a_real_worker(
    topology: Topology,
    worker_process: Callable[..., WorkerProcess],
    pool: str,
    otel: Otel,
) -> None:
    worker = worker_process(["otel_first", "otel_second"], TEST_OTEL="1").start(*POOLS[pool])
    publisher = topology.app("web")
    with otel.tracer.start_as_current_span("web request") as request:
        emit(GenericEvent(event_name="otel.start", data={"order": 1}))
        transmit(publisher)
    second_name = f"process {worker.queue('otel_second')}"
    wait_for(lambda: any(s["name"] == second_name for s in _worker_spans(worker.markers)), 30)
    by_name = {s["name"]: s for s in _worker_spans(worker.markers)}
    root = request.get_span_context()
    trace_hex = f"0x{_hex(root.trace_id, 32)}"
    [web_publish] = [s for s in otel.spans() if s.kind is SpanKind.PRODUCER]
    assert web_publish.parent is not None
    assert web_publish.parent.span_id == root.span_id
    first = by_name[f"process {worker.queue('otel_first')}"]
    emitted = by_name[f"publish {topology.exchange}"]
    second = by_name[second_name]
    # One trace: web request -> publish -> otel_first -> publish -> otel_second.
    assert {s["context"]["trace_id"] for s in (first, emitted, second)} == {trace_hex}
    assert first["kind"] == "SpanKind.CONSUMER"
    assert first["parent_id"] == f"0x{_hex(web_publish.context.span_id, 16)}"
    assert [link["context"]["span_id"] for link in first["links"]] == [first["parent_id"]]
    assert first["attributes"]["cloudevents.event_type"] == "otel.start"
    assert emitted["kind"] == "SpanKind.PRODUCER"
    assert emitted["parent_id"] == first["context"]["span_id"]
    assert emitted["attributes"]["cloudevents.event_type"] == "otel.next"
    assert second["kind"] == "SpanKind.CONSUMER"
    assert second["parent_id"] == emitted["context"]["span_id"]
    assert [link["context"]["span_id"] for link in second["links"]] == [second["parent_id"]]
    assert first["status"]["status_code"] == second["status"]["status_code"] == "UNSET"
