"""CloudEvents binary content mode, with the official SDK (``cloudevents`` >= 2.2).

The SDK's RabbitMQ binding (``cloudevents.core.bindings.rabbitmq``) writes and reads both
modes. In-process tests check the worker's main-thread reading of binary-mode deliveries, the
retries and dead letters built from them, and the binary publishing mode. The tests marked
``worker`` run against the real broker and a real ``celery worker`` (solo and prefork): SDK to
library in both modes, library to SDK in both modes, poison and retries.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import pickle
import time
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any, ClassVar

import hypothesis
import pytest
from celery import Celery
from cloudevents.core.bindings import rabbitmq
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from hypothesis import given
from hypothesis import strategies as st
from kombu.message import Message

from celery_domain_events import (
    DomainEvent,
    DomainEvents,
    GenericEvent,
    domain_event_handler,
    emit,
    scope,
    scope_async,
)
from celery_domain_events.config import ContentMode, Settings
from celery_domain_events.consuming import delivery as bridge
from celery_domain_events.consuming.task import original_body, retry_message
from celery_domain_events.contrib._outbox_rows import messages_of, rows_of
from celery_domain_events.exceptions import ConfigurationError, EventDecodeError
from celery_domain_events.publishing.send import outbound_messages
from celery_domain_events.registry import EventRegistry, HandlerSpec
from celery_domain_events.testing import capture_events
from celery_domain_events.wire import envelope as wire_envelope
from celery_domain_events.wire import inbound
from celery_domain_events.wire.dead_letter import (
    HEADER_PREFIX,
    DeadLetter,
    FailureReason,
    dead_letter_message,
    failure_key,
    letter_from,
)

from .conftest import Topology, WorkerProcess, drain, probe, wait_for
from .test_inbox_chaos import SKIPPED
from .test_untrusted import POOLS, publish
from .test_wire_conformance import FUZZ, header_values

MAX_BYTES = 1024 * 1024
RETRY_EXCHANGE = "events.retry"


class Shipped(DomainEvent):
    event_name: ClassVar[str] = "bin.order.shipped"
    event_version: ClassVar[int] = 2

    order_id: int
    carrier: str = "?"


REGISTRY = EventRegistry()
REGISTRY.register(Shipped)


def sdk_event(event_type: str = "bin.order.shipped", **attributes: Any) -> CloudEvent:
    data = attributes.pop("data", {"order_id": 7, "carrier": "dhl"})
    return CloudEvent(
        attributes={
            "type": event_type,
            "source": "/warehouse",
            "datacontenttype": "application/json",
            **attributes,
        },
        data=data,
    )


def _message(sdk: rabbitmq.RabbitMQMessage, **changes: Any) -> Message:
    fields: dict[str, Any] = {
        "body": sdk.body,
        "delivery_tag": 1,
        "content_type": sdk.content_type,
        "content_encoding": None,
        "delivery_info": {"exchange": "events", "routing_key": "bin.order.shipped"},
        "properties": {},
        "headers": dict(sdk.headers),
        "channel": None,
    }
    fields.update(changes)
    return Message(**fields)


def _check(message: Message) -> inbound.Inbound:
    return inbound.check(
        message, max_bytes=MAX_BYTES, retry_exchanges={RETRY_EXCHANGE}, max_delay=10.0
    )


# -- Reading binary mode, in process ----------------------------------------------------------


def test_an_sdk_binary_event_becomes_its_structured_envelope() -> None:
    event = sdk_event(eventversion=2, subject="order-7")
    sdk = rabbitmq.to_binary_event(event)
    assert sdk.headers["ce-eventversion"] == "2"  # the SDK sends every attribute as a string
    checked = _check(_message(sdk))
    assert checked.body == sdk.body.decode()
    assert (checked.event_id, checked.event_type) == (event.get_id(), "bin.order.shipped")
    assert checked.version == 2  # Flower shows v2 (inbound.summary), not the default
    assert "'version': 2" in inbound.summary(checked)
    env = wire_envelope.decode(checked.text)
    assert (env.source, env.subject, env.eventversion) == ("/warehouse", "order-7", 2)
    assert env.datacontenttype == "application/json"
    assert env.time == event.get_time()
    typed = wire_envelope.to_event(env, REGISTRY)
    assert isinstance(typed, Shipped)
    assert (typed.order_id, typed.carrier, typed.event_id) == (7, "dhl", event.get_id())
    assert typed.occurred_at == event.get_time()
    # The SDK reads the structured envelope as the event it reads from the binary message.
    again = rabbitmq.from_structured_event(
        rabbitmq.RabbitMQMessage({}, wire_envelope.CONTENT_TYPE, checked.text.encode())
    )
    read = rabbitmq.from_binary_event(sdk)
    assert again.get_attributes() == read.get_attributes()
    assert again.get_data() == read.get_data() == event.get_data()


def test_a_structured_sdk_event_is_read_as_before() -> None:
    sdk = rabbitmq.to_structured_event(sdk_event())
    checked = _check(_message(sdk))
    assert checked.body is None
    assert checked.text == sdk.body.decode()


@pytest.mark.parametrize(
    ("headers", "content_type"),
    [
        ({"CE-SpecVersion": "1.0", "Ce-Id": "x1", "ce-source": "s", "ce-type": "bin.x"}, None),
        (
            {"ce-specversion": "1.0", "ce-id": "x1", "ce-source": "s", "ce-type": "bin.x"},
            "text/json",
        ),
        (
            {"ce-specversion": "1.0", "ce-id": "x1", "ce-source": "s", "ce-type": "bin.x"},
            "application/vnd.acme+json; charset=utf-8",
        ),
    ],
    ids=["header-case-no-content-type", "text-json", "vendor-json"],
)
def test_binary_mode_header_names_and_json_content_types(
    headers: dict[str, Any], content_type: str | None
) -> None:
    message = _message(rabbitmq.RabbitMQMessage(headers, content_type, b'{"a": [1]}'))
    env = wire_envelope.decode(_check(message).text)
    assert (env.id, env.type, env.data, env.datacontenttype) == (
        "x1",
        "bin.x",
        {"a": [1]},
        content_type,
    )


def test_an_empty_binary_body_is_an_event_without_data() -> None:
    sdk = rabbitmq.to_binary_event(sdk_event(data=None))
    assert sdk.body == b""
    checked = _check(_message(sdk))
    assert checked.body == ""
    env = wire_envelope.decode(checked.text)
    assert "data" not in env.model_fields_set
    event = wire_envelope.to_event(env, EventRegistry())
    assert isinstance(event, GenericEvent)
    assert event.data == {}


REQUIRED = {"ce-specversion": "1.0", "ce-id": "x1", "ce-source": "s", "ce-type": "bin.x"}


def _without(name: str) -> dict[str, Any]:
    return {k: v for k, v in REQUIRED.items() if k != name}


@pytest.mark.parametrize(
    ("headers", "content_type", "body", "reason"),
    [
        (_without("ce-id"), "application/json", b"{}", "required attribute.*ce-id"),
        (_without("ce-source"), "application/json", b"{}", "required attribute.*ce-source"),
        (_without("ce-type"), "application/json", b"{}", "required attribute.*ce-type"),
        ({**REQUIRED, "ce-id": ""}, "application/json", b"{}", "required attribute.*ce-id"),
        (_without("ce-specversion"), "application/json", b"{}", "no ce-specversion"),
        (REQUIRED, "text/plain", b"hello", "'text/plain' is not accepted"),
        (REQUIRED, "application/xml", b"<a/>", "'application/xml' is not accepted"),
        (REQUIRED, "application/octet-stream", b"\x00", "not accepted"),
        (REQUIRED, "application/json; charset=latin-1", b"{}", "not accepted"),
        (REQUIRED, "application/json", b"{nope", "not valid UTF-8 JSON"),
        (REQUIRED, "application/json", b"\xff{}", "not UTF-8"),
        (REQUIRED, "application/json", b"[" * 500 + b"]" * 500, "deeper than 200"),
        (REQUIRED, "application/json", b'"' + b"x" * MAX_BYTES + b'"', "over domain_events"),
        ({**REQUIRED, "ce-data": "{}"}, "application/json", b"{}", "'ce-data'"),
        ({**REQUIRED, "ce-foo_bar": "1"}, "application/json", b"{}", "'ce-foo_bar'"),
        ({**REQUIRED, "ce-ext": {"a": 1}}, "application/json", b"{}", "string, integer or boolean"),
        ({**REQUIRED, "ce-ext": 1.5}, "application/json", b"{}", "string, integer or boolean"),
        ({**REQUIRED, "ce-id": 7}, "application/json", b"{}", "ce-id must be a string"),
        ({**REQUIRED, "CE-ID": "x2"}, "application/json", b"{}", "'id' is given twice"),
        ({**REQUIRED, "task": "os.system"}, "application/json", b"{}", "Celery task"),
    ],
    ids=[
        "no-id",
        "no-source",
        "no-type",
        "empty-id",
        "no-specversion",
        "text",
        "xml",
        "octets",
        "latin-1",
        "not-json",
        "not-utf8",
        "deep",
        "too-big",
        "ce-data",
        "bad-name",
        "table",
        "float",
        "int-id",
        "twice",
        "task",
    ],
)
def test_binary_mode_poison_says_why(
    headers: dict[str, Any], content_type: str, body: bytes, reason: str
) -> None:
    with pytest.raises(EventDecodeError, match=reason):
        _check(_message(rabbitmq.RabbitMQMessage(headers, content_type, body)))


def test_invalid_binary_attributes_are_poison_in_the_pool() -> None:
    # What the main thread leaves to the envelope validation, as in structured mode.
    for headers in (
        {**REQUIRED, "ce-specversion": "0.3"},
        {**REQUIRED, "ce-time": "yesterday"},
        {**REQUIRED, "ce-source": "a b"},
        {**REQUIRED, "ce-eventversion": "two"},
    ):
        checked = _check(_message(rabbitmq.RabbitMQMessage(headers, "application/json", b"{}")))
        with pytest.raises(EventDecodeError, match=r"not a CloudEvents 1\.0 envelope"):
            wire_envelope.decode(checked.text)


SPEC = HandlerSpec(name="h", patterns=("bin.#",), fn=lambda event: None, retry=None)


def test_retries_and_dead_letters_of_a_binary_event_keep_its_body_and_headers() -> None:
    sdk = rabbitmq.to_binary_event(
        sdk_event(eventversion=2, traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01")
    )
    message = _message(sdk, headers={**sdk.headers, "x-app": "kept"})
    checked = _check(message)
    task = bridge.to_task_message(message, checked, SPEC, "svc.h")
    kwargs = task.body[1]
    assert kwargs["raw_event"] == checked.text
    meta = kwargs["meta"]
    assert meta["body"] == sdk.body.decode()
    assert original_body(kwargs["raw_event"], meta) == sdk.body
    assert meta["content_type"] == "application/json"
    # A structured delivery carries no body in meta: raw_event is the body.
    structured = _message(rabbitmq.to_structured_event(sdk_event()))
    plain = bridge.to_task_message(structured, _check(structured), SPEC, "svc.h").body[1]
    assert "body" not in plain["meta"]
    assert original_body(plain["raw_event"], plain["meta"]) == structured.body

    letter = dead_letter_message(
        body=original_body(kwargs["raw_event"], meta),
        queue="svc.h",
        handler="h",
        reason=FailureReason.POISON,
        exc=EventDecodeError("x"),
        content_type=meta["content_type"],
        content_encoding=meta["content_encoding"],
        properties=meta["properties"],
        headers=meta["headers"],
    )
    assert letter.body == sdk.body
    assert {k: v for k, v in letter.headers.items() if not k.startswith(HEADER_PREFIX)} == {
        **sdk.headers,
        "x-app": "kept",
    }
    # No message_id: the failure key and the CLI take the id from ce-id, not from the data.
    event_id = sdk.headers["ce-id"]
    assert letter.headers[HEADER_PREFIX + "key"] == failure_key("svc.h", event_id, 1)
    stored = DeadLetter(
        queue="svc.h.dlq",
        body=letter.body,
        content_type=letter.content_type,
        content_encoding=letter.content_encoding,
        properties=letter.properties,
        headers=letter.headers,
    )
    assert stored.event_id == event_id
    replay = stored.replay_message("events.retry")
    assert replay.body == sdk.body
    assert all(replay.headers[k] == v for k, v in sdk.headers.items())


def test_an_in_process_pool_gets_the_parsed_envelope_and_a_prefork_child_the_text() -> None:
    structured = _message(rabbitmq.to_structured_event(sdk_event()))
    checked = _check(structured)
    in_process = bridge.to_task_message(structured, checked, SPEC, "svc.h", in_process=True)
    raw_event = in_process.body[1]["raw_event"]
    assert isinstance(raw_event, wire_envelope.ParsedText)
    assert raw_event == checked.text
    assert raw_event.parsed is checked.parsed
    assert raw_event.parsed == json.loads(checked.text)
    assert wire_envelope.decode(raw_event) == wire_envelope.decode(checked.text)
    # Pickled to a prefork child, or copied: plain text, which the child parses itself.
    for copied in (pickle.loads(pickle.dumps(raw_event)), copy.deepcopy(raw_event)):
        assert type(copied) is str
        assert copied == checked.text
    assert json.loads(json.dumps(in_process.body[1]["raw_event"])) == checked.text
    prefork = bridge.to_task_message(structured, checked, SPEC, "svc.h").body[1]["raw_event"]
    assert type(prefork) is str
    # A delayed retry waits in the worker until it is due: it holds the text only.
    delayed = dataclasses.replace(checked, due=time.time() + 60)
    held = bridge.to_task_message(structured, delayed, SPEC, "svc.h", in_process=True)
    assert type(held.body[1]["raw_event"]) is str
    # A binary-mode event's envelope is built from headers and body: always passed as text.
    sdk = rabbitmq.to_binary_event(sdk_event())
    binary_message = _message(sdk, headers=dict(sdk.headers))
    binary = bridge.to_task_message(
        binary_message, _check(binary_message), SPEC, "svc.h", in_process=True
    )
    assert type(binary.body[1]["raw_event"]) is str


def test_the_id_of_a_binary_dead_letter_is_never_read_from_its_data() -> None:
    body = json.dumps({"id": "not-the-event", "type": "x"}).encode()
    headers = {**REQUIRED, "ce-id": "the-event"}
    letter = dead_letter_message(
        body=body,
        queue="svc.h",
        handler="h",
        reason=FailureReason.POISON,
        exc=EventDecodeError("x"),
        content_type="application/json",
        headers=headers,
    )
    assert letter.headers[HEADER_PREFIX + "key"] == failure_key("svc.h", "the-event", 1)


ce_values = st.one_of(
    st.text(max_size=8),
    st.sampled_from(["1.0", "0.3", "", "2026-12-02T06:15:39Z", "yesterday", "a b"]),
    st.integers(-(2**40), 2**40),
    st.booleans(),
    header_values,
)
ce_names = st.one_of(
    st.sampled_from(["time", "subject", "eventversion", "dataschema", "traceparent", "data"]),
    st.text(max_size=6),
)


@st.composite
def binary_deliveries(draw: st.DrawFn) -> tuple[Message, bytes]:
    """A binary-mode delivery (mostly valid), and its body's bytes on the wire."""
    headers: dict[str, Any] = {}
    for name, usual in (("specversion", "1.0"), ("id", "e-1"), ("source", "/s"), ("type", "t")):
        if draw(st.integers(0, 9)):
            key = "ce-" + name
            headers[key.upper() if draw(st.booleans()) else key] = (
                usual if draw(st.integers(0, 4)) else draw(ce_values)
            )
    headers.update(draw(st.dictionaries(ce_names.map("ce-".__add__), ce_values, max_size=3)))
    headers.update(draw(st.dictionaries(st.text(max_size=6), header_values, max_size=2)))
    content_type = draw(
        st.one_of(
            st.sampled_from(
                [
                    "application/json",
                    "application/json; charset=utf-8",
                    "Application/Vnd.Acme+JSON",
                    None,
                    "text/plain",
                    "application/json; charset=latin-1",
                    "application/cloudevents+json",
                ]
            ),
            st.text(max_size=20),
        )
    )
    data = draw(
        st.one_of(
            st.recursive(
                st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5)),
                lambda c: st.one_of(
                    st.lists(c, max_size=3), st.dictionaries(st.text(max_size=4), c, max_size=3)
                ),
                max_leaves=6,
            ).map(lambda v: json.dumps(v).encode()),
            st.binary(max_size=20),
            st.just(b""),
            st.integers(190, 210).map(lambda n: b"[" * n + b"]" * n),
        )
    )
    message = Message(
        body=data,
        delivery_tag=1,
        content_type=content_type,
        content_encoding=None,
        delivery_info={"exchange": "events", "routing_key": "t"},
        properties={},
        headers=headers,
        channel=None,
    )
    return message, data


@FUZZ
@given(delivery=binary_deliveries())
def test_binary_deliveries_are_accepted_as_their_envelope_or_poison(
    delivery: tuple[Message, bytes],
) -> None:
    message, wire = delivery
    headers = dict(message.headers)
    try:
        checked = _check(message)
    except EventDecodeError as exc:
        hypothesis.event(f"poison: {str(exc)[:30]}")
        return
    assert "task" not in headers
    envelope = json.loads(checked.text)
    assert (envelope["id"], envelope["type"]) == (checked.event_id, checked.event_type)
    if checked.body is None:  # read as structured (no ce-specversion, or a CloudEvents type)
        hypothesis.event("structured")
        assert checked.text == wire.decode()
        return
    hypothesis.event("binary")
    assert checked.body == wire.decode()
    assert envelope.get("data", None) == (json.loads(wire) if wire.strip() else None)
    assert {"specversion", "id", "source", "type"} <= set(envelope)
    meta = bridge.to_task_message(message, checked, SPEC, "svc.h").body[1]["meta"]
    assert original_body(checked.text, meta) == wire
    try:
        wire_envelope.to_event(wire_envelope.decode(checked.text), REGISTRY)
    except EventDecodeError:
        hypothesis.event("poison in the pool")


# -- Publishing binary mode, in process --------------------------------------------------------


def test_the_content_mode_setting() -> None:
    assert Settings(service="s").content_mode is ContentMode.STRUCTURED
    assert (
        Settings.from_conf({"domain_events_content_mode": "binary"}, service="s").content_mode
        is ContentMode.BINARY
    )
    with pytest.raises(ConfigurationError, match="content_mode"):
        Settings.from_conf({"domain_events_content_mode": "binery"}, service="s")


@pytest.mark.parametrize("mode", ["structured", "binary"])
def test_published_events_are_read_by_the_sdk_and_by_a_worker(mode: str) -> None:
    app = Celery("bin", broker="memory://", set_as_current=False)
    app.conf.domain_events_content_mode = mode
    ext = DomainEvents(app, service="billing")
    at = datetime(2026, 12, 2, 6, 15, 39, 213049, tzinfo=timezone.utc)
    typed = Shipped(order_id=1, carrier="ups", occurred_at=at)
    untyped = GenericEvent(event_name="bin.untyped", event_version=3, data={"n": [1, 2]})
    traceparent = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    messages = outbound_messages(ext, [typed, untyped], traceparent)
    for message, event in zip(messages, (typed, untyped), strict=True):
        assert message.properties["message_id"] == event.event_id
        sdk = rabbitmq.from_rabbitmq_event(
            rabbitmq.RabbitMQMessage(message.headers, message.content_type, message.body)
        )
        assert sdk.get_id() == event.event_id
        assert sdk.get_source() == "billing"
        assert sdk.get_type() == event.event_name
        assert sdk.get_datacontenttype() == "application/json"
        assert sdk.get_time() == event.occurred_at
        assert str(sdk.get_extension("eventversion")) == str(event.event_version)
        assert sdk.get_extension("traceparent") == traceparent
        data = sdk.get_data()
        assert data == (
            event.data if isinstance(event, GenericEvent) else {"order_id": 1, "carrier": "ups"}
        )
        # ... and a worker reads it back as the same event.
        received = _check(
            Message(
                body=message.body,
                delivery_tag=1,
                content_type=message.content_type,
                content_encoding=message.content_encoding,
                delivery_info={"exchange": "domain_events", "routing_key": message.routing_key},
                properties=message.properties,
                headers=message.headers,
                channel=None,
            )
        )
        registry = EventRegistry()
        registry.register(Shipped)
        assert wire_envelope.to_event(wire_envelope.decode(received.text), registry) == event
    if mode == "binary":
        assert messages[0].content_type == "application/json"
        assert json.loads(messages[0].body) == {"order_id": 1, "carrier": "ups"}
        assert messages[0].headers == {
            "ce-specversion": "1.0",
            "ce-id": typed.event_id,
            "ce-source": "billing",
            "ce-type": "bin.order.shipped",
            "ce-eventversion": "2",
            "ce-time": "2026-12-02T06:15:39.213049Z",
            "ce-traceparent": traceparent,
        }
    else:
        assert messages[0].content_type == wire_envelope.CONTENT_TYPE
        assert messages[0].headers == {}


def test_retry_message_of_a_binary_event_is_the_original() -> None:
    app = Celery("bin", broker="memory://", set_as_current=False)
    ext = DomainEvents(app, service="svc")
    sdk = rabbitmq.to_binary_event(sdk_event())
    message = _message(sdk)
    checked = _check(message)
    meta = bridge.to_task_message(message, checked, SPEC, "svc.h").body[1]["meta"]
    retry = retry_message(ext, SPEC, checked.text, meta, 1, 0)
    assert retry.body == sdk.body
    assert retry.content_type == "application/json"
    assert {k: retry.headers[k] for k in sdk.headers} == sdk.headers
    assert retry.headers[inbound.RETRIES_HEADER] == 1


def test_the_outbox_relays_binary_rows_in_binary_mode() -> None:
    app = Celery("bin", broker="memory://", set_as_current=False)
    app.conf.domain_events_content_mode = "binary"
    ext = DomainEvents(app, service="billing")
    event = Shipped(order_id=9)
    [row] = rows_of(ext, [event])
    json.dumps(row["headers"])  # the headers column is JSON
    [relayed] = messages_of(ext, [SimpleNamespace(**row)])
    [published] = outbound_messages(ext, [event], row["headers"]["ce-traceparent"])
    assert (relayed.body, relayed.content_type, relayed.headers) == (
        published.body,
        "application/json",
        published.headers,
    )
    structured = DomainEvents(Celery("s", broker="memory://", set_as_current=False), service="b")
    [plain] = messages_of(structured, [SimpleNamespace(**rows_of(structured, [event])[0])])
    assert plain.content_type == wire_envelope.CONTENT_TYPE


HANDLED: list[Any] = []


@domain_event_handler("bin.order.shipped", name="bin_capture", retry=None)
def bin_capture(event: Shipped) -> None:
    HANDLED.append(event)


def test_capture_events_runs_handlers_in_binary_mode() -> None:
    app = Celery("bin", broker="memory://", set_as_current=False)
    app.conf.domain_events_content_mode = "binary"
    DomainEvents(app, service="billing", handlers=[bin_capture])
    HANDLED.clear()
    with capture_events(app) as events:
        with scope(app):
            sent = emit(Shipped(order_id=4, carrier="gls"))
        events.join()
    assert events.messages[0].content_type == "application/json"
    assert events.published == [sent]
    assert [sent] == HANDLED
    assert events.dead_letters == []


# -- On the real broker, with a real worker ----------------------------------------------------

Make = Any  # tests.conftest's worker_process factory


@pytest.fixture(params=list(POOLS))
def pool(request: pytest.FixtureRequest) -> tuple[str, ...]:
    return POOLS[request.param]


def publish_sdk(topology: Topology, sdk: rabbitmq.RabbitMQMessage, routing_key: str) -> None:
    """Publish what the SDK's binding made, as any AMQP client would, to the events exchange."""
    publish(
        topology,
        sdk.body,
        routing_key=routing_key,
        content_type=sdk.content_type,
        headers=dict(sdk.headers),
    )


def records(worker: WorkerProcess, handler: str, event_id: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in worker.marker_lines(handler, event_id)]


@pytest.mark.rabbitmq
@pytest.mark.worker
@pytest.mark.slow
def test_sdk_events_in_both_modes_reach_typed_and_untyped_handlers(
    worker_process: Make, pool: tuple[str, ...]
) -> None:
    worker: WorkerProcess = worker_process(["ce_typed", "ce_untyped"]).start(*pool)
    sent = []
    for to_rabbitmq in (rabbitmq.to_structured_event, rabbitmq.to_binary_event):
        typed = sdk_event("probe.ce.typed", eventversion=2, data={"n": 5, "note": "héllo"})
        untyped = sdk_event("probe.ce.untyped", data={"k": [1, {"z": None}]})
        publish_sdk(worker.topology, to_rabbitmq(typed), "probe.ce.typed")
        publish_sdk(worker.topology, to_rabbitmq(untyped), "probe.ce.untyped")
        sent.append((typed, untyped))
    for typed, untyped in sent:
        wait_for(lambda t=typed: records(worker, "ce_typed", t.get_id()) != [])
        wait_for(lambda u=untyped: records(worker, "ce_untyped", u.get_id()) != [])
        assert records(worker, "ce_typed", typed.get_id()) == [
            {
                "class": "CeTyped",
                "id": typed.get_id(),
                "version": 2,
                "occurred_at": typed.get_time().isoformat(),
                "n": 5,
                "note": "héllo",
            }
        ]
        assert records(worker, "ce_untyped", untyped.get_id()) == [
            {
                "class": "GenericEvent",
                "id": untyped.get_id(),
                "version": 1,
                "occurred_at": untyped.get_time().isoformat(),
                "name": "probe.ce.untyped",
                "data": {"k": [1, {"z": None}]},
            }
        ]
    assert drain(worker.topology.broker_url, worker.queue("ce_typed") + ".dlq") == []
    assert drain(worker.topology.broker_url, worker.queue("ce_untyped") + ".dlq") == []


def _dead_letters(worker: WorkerProcess, handler: str, count: int) -> list[DeadLetter]:
    dlq = worker.queue(handler) + ".dlq"
    found: list[DeadLetter] = []
    wait_for(
        lambda: (
            found.extend(letter_from(dlq, m) for m in drain(worker.topology.broker_url, dlq))
            or len(found) >= count
        )
    )
    assert len(found) == count, found
    return found


def _own_headers(letter: DeadLetter) -> dict[str, Any]:
    return {k: v for k, v in letter.headers.items() if not k.startswith(HEADER_PREFIX)}


@pytest.mark.rabbitmq
@pytest.mark.worker
@pytest.mark.slow
def test_binary_poison_is_dead_lettered_byte_for_byte_with_the_reason(
    worker_process: Make, pool: tuple[str, ...]
) -> None:
    worker: WorkerProcess = worker_process(["ce_untyped"]).start(*pool)
    no_source = rabbitmq.to_binary_event(sdk_event("probe.ce.untyped", subject="a"))
    headers = {k: v for k, v in no_source.headers.items() if k != "ce-source"}
    headers["x-app"] = "kept"
    publish(
        worker.topology,
        no_source.body,
        routing_key="probe.ce.untyped",
        content_type="application/json",
        headers=headers,
    )
    not_json = rabbitmq.to_binary_event(
        CloudEvent(
            attributes={
                "type": "probe.ce.untyped",
                "source": "/w",
                "datacontenttype": "text/plain",
            },
            data="plain text",
        )
    )
    publish_sdk(worker.topology, not_json, "probe.ce.untyped")
    letters = {
        letter.failure("message").split(":")[0]: letter
        for letter in _dead_letters(worker, "ce_untyped", 2)
    }
    missing = next(v for k, v in letters.items() if "required" in k)
    assert missing.failure("message") == (
        "binary-mode CloudEvent without required attribute(s): ce-source"
    )
    assert missing.reason == FailureReason.POISON.value
    assert missing.failure("exception") == "celery_domain_events.exceptions.EventDecodeError"
    assert missing.failure("attempts") == 1
    assert missing.body == no_source.body
    assert missing.content_type == "application/json"
    assert _own_headers(missing) == headers
    assert missing.event_id == no_source.headers["ce-id"]
    refused = next(v for v in letters.values() if v is not missing)
    assert "'text/plain' is not accepted" in refused.failure("message")
    assert refused.body == b"plain text"
    assert refused.content_type == "text/plain"
    assert _own_headers(refused) == not_json.headers
    assert worker.marker_lines("ce_untyped", no_source.headers["ce-id"]) == []


@pytest.mark.rabbitmq
@pytest.mark.worker
@pytest.mark.slow
def test_a_retried_binary_event_keeps_its_body_and_headers(
    worker_process: Make, pool: tuple[str, ...]
) -> None:
    worker: WorkerProcess = worker_process(["ce_flaky"]).start(*pool)
    sdk = rabbitmq.to_binary_event(sdk_event("probe.ce.retry", eventversion=1, data={"n": 1}))
    publish_sdk(worker.topology, sdk, "probe.ce.retry")
    [letter] = _dead_letters(worker, "ce_flaky", 1)
    event_id = sdk.headers["ce-id"]
    # Two attempts: the retry was read as the same binary-mode event.
    assert [r["data"] for r in records(worker, "ce_flaky", event_id)] == [{"n": 1}, {"n": 1}]
    assert letter.reason == FailureReason.RETRIES_EXHAUSTED.value
    assert letter.failure("attempts") == 2
    assert letter.body == sdk.body
    assert letter.content_type == "application/json"
    assert _own_headers(letter) == sdk.headers
    assert letter.event_id == event_id


@pytest.mark.rabbitmq
@pytest.mark.worker
@pytest.mark.slow
def test_binary_events_reach_a_batch_handler_and_fail_alone(
    worker_process: Make, pool: tuple[str, ...]
) -> None:
    # batch_sink (tests/worker_app.py): batches of up to 50 typed BatchItem events; an event
    # whose n ends in 7 fails alone, is retried once through the handler's queue, then
    # dead-lettered.
    worker: WorkerProcess = worker_process(["batch_sink"]).start(*pool)
    sent = [rabbitmq.to_binary_event(sdk_event("batch.item", data={"n": n})) for n in range(20)]
    for sdk in sent:
        publish_sdk(worker.topology, sdk, "batch.item")
    ids = [sdk.headers["ce-id"] for sdk in sent]
    letters = _dead_letters(worker, "batch_sink", 2)  # n = 7 and n = 17
    failing = {sdk.headers["ce-id"]: sdk for sdk in sent if json.loads(sdk.body)["n"] % 10 == 7}
    runs = {i: len(worker.marker_lines("batch_sink", i)) for i in ids}
    assert {i for i, count in runs.items() if count != 1} == set(failing)
    assert all(runs[i] == 2 for i in failing)  # the first run and its retry, alone
    assert {letter.event_id for letter in letters} == set(failing)
    for letter in letters:
        original = failing[letter.event_id]
        assert letter.reason == FailureReason.RETRIES_EXHAUSTED.value
        assert letter.body == original.body  # the binary body, not the structured envelope
        assert _own_headers(letter) == original.headers
    assert worker.topology.queue_depth(worker.queue("batch_sink")) == 0


@pytest.mark.rabbitmq
@pytest.mark.parametrize("publisher", ["transmit", "transmit_async"])
@pytest.mark.parametrize("mode", ["structured", "binary"])
def test_library_events_in_both_modes_are_read_by_the_sdk(
    topology: Topology, mode: str, publisher: str
) -> None:
    app = topology.app("pub", domain_events_content_mode=mode)
    probe_queue = probe(topology, app)
    if publisher == "transmit":
        with scope(app):
            typed = emit(Shipped(order_id=3, carrier="dpd"))
            untyped = emit("bin.untyped", {"n": [1, "x"]}, version=4)
    else:

        async def publish_async() -> tuple[Any, Any]:
            async with scope_async(app):
                return (
                    emit(Shipped(order_id=3, carrier="dpd")),
                    emit("bin.untyped", {"n": [1, "x"]}, version=4),
                )

        typed, untyped = asyncio.run(publish_async())
    [raw_typed, raw_untyped] = drain(topology.broker_url, probe_queue) or [None, None]
    for raw, event, data in (
        (raw_typed, typed, {"order_id": 3, "carrier": "dpd"}),
        (raw_untyped, untyped, {"n": [1, "x"]}),
    ):
        props = raw.properties
        headers = dict(props.get("application_headers") or {})
        body = inbound.raw_body(raw.body, props.get("content_encoding"))
        read = rabbitmq.from_rabbitmq(
            rabbitmq.RabbitMQMessage(headers, props.get("content_type"), body), JSONFormat()
        )
        assert read.get_id() == event.event_id
        assert read.get_type() == event.event_name
        assert read.get_source() == topology.service("pub")
        assert read.get_time() == event.occurred_at
        assert read.get_datacontenttype() == "application/json"
        assert str(read.get_extension("eventversion")) == str(event.event_version)
        assert read.get_data() == data
        if mode == "binary":
            assert props.get("content_type") == "application/json"
            assert headers["ce-specversion"] == "1.0"
        else:
            assert props.get("content_type") == wire_envelope.CONTENT_TYPE
            assert headers == {}


@pytest.mark.rabbitmq
@pytest.mark.worker
@pytest.mark.slow
def test_binary_events_are_upcast_deduplicated_by_the_inbox_and_reach_transient_handlers(
    worker_process: Make, pool: tuple[str, ...], inbox_tables: dict[str, str]
) -> None:
    # evolve_v3 takes v3 only (a v1 event is upcast twice), inbox_a is idempotent through a
    # PostgreSQL inbox, transient_seen consumes an exclusive queue of this worker's own.
    handlers = ["evolve_v3", "inbox_a", "transient_seen"]
    worker: WorkerProcess = worker_process(handlers, **inbox_tables).start(*pool)
    old = rabbitmq.to_binary_event(
        sdk_event("probe.evolve", eventversion=1, data={"order_id": 1, "amount": 19.9})
    )
    once = rabbitmq.to_binary_event(sdk_event("probe.inbox", data={"n": 1}))
    live = rabbitmq.to_binary_event(sdk_event("probe.transient", data={"n": 2}))
    publish_sdk(worker.topology, old, "probe.evolve")
    publish_sdk(worker.topology, once, "probe.inbox")
    publish_sdk(worker.topology, live, "probe.transient")
    upcast = worker.markers / f"evolve_v3-{old.headers['ce-id']}"
    wait_for(upcast.exists)
    assert json.loads(upcast.read_text()) == {
        "type": "EvolveV3",
        "id": old.headers["ce-id"],
        "order_id": 1,
        "cents": 1990,
        "currency": "EUR",
    }
    wait_for(lambda: len(worker.marker_lines("transient_seen", live.headers["ce-id"])) == 1)
    runs = worker.markers / "inbox_started"  # "<handler> <event id> <pid>" per run started
    wait_for(lambda: runs.exists() and once.headers["ce-id"] in runs.read_text())
    publish_sdk(worker.topology, once, "probe.inbox")  # the same binary event again
    wait_for(lambda: f"id={once.headers['ce-id']}: inbox_a {SKIPPED}" in worker.log())
    assert runs.read_text().count(once.headers["ce-id"]) == 1  # the duplicate never ran
    for handler in ("evolve_v3", "inbox_a"):
        assert drain(worker.topology.broker_url, worker.queue(handler) + ".dlq") == []
