"""Retries confined to one handler, dead letters, poison input (real broker, real worker)."""

from __future__ import annotations

import json
import pickle
import uuid
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Producer

from celery_domain_events import DomainEvents, emit, transmit
from celery_domain_events.wire.dead_letter import HEADER_PREFIX, MAX_HEADERS_BYTES

from . import handlers
from .conftest import Recorder, Topology, drain, running_worker, unwritable_dlq, wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.worker]


def as_bytes(body: bytes | str) -> bytes:
    # py-amqp hands out str bodies for content_encoding utf-8; compare the bytes on the wire.
    return body.encode() if isinstance(body, str) else body


def probe_name(topology: Topology) -> str:
    return f"test.{topology.uid}.probe"


def bind_probe(topology: Topology, app: Any) -> None:
    from kombu import Queue

    with Connection(topology.broker_url) as conn:
        Queue(
            probe_name(topology),
            DomainEvents.of(app).topology.exchange(),
            routing_key="#",
            auto_delete=False,
        ).declare(channel=conn.default_channel)


def test_retry_reruns_only_the_failing_handler_then_dead_letters(
    topology: Topology, recorder: Recorder
) -> None:
    app = topology.app(handlers=[handlers.always_fails, handlers.retry_sibling])
    bind_probe(topology, app)
    queue = f"{topology.service()}.always_fails"
    with running_worker(app):
        event = emit("test.retry.order", {"order_id": 9})
        transmit(app)
        wait_for(lambda: topology.queue_depth(queue + ".dlq") == 1)
        wait_for(lambda: topology.queue_depth(queue) == 0)
    attempts = recorder.get("always_fails")
    assert len(attempts) == 3  # max_retries + 1, counted exactly
    assert recorder.get("retry_sibling") == [event]  # never re-delivered to the sibling
    [letter] = drain(topology.broker_url, queue + ".dlq")
    [original] = drain(topology.broker_url, probe_name(topology))
    assert as_bytes(letter.body) == as_bytes(original.body)  # byte-identical
    headers = letter.headers
    assert headers[HEADER_PREFIX + "reason"] == "retries-exhausted"
    assert headers[HEADER_PREFIX + "attempts"] == 3
    assert headers[HEADER_PREFIX + "exception"] == "builtins.RuntimeError"
    assert headers[HEADER_PREFIX + "message"] == f"boom {event.event_id}"
    assert "RuntimeError" in headers[HEADER_PREFIX + "traceback"]
    assert headers[HEADER_PREFIX + "handler"] == "always_fails"
    assert headers[HEADER_PREFIX + "queue"] == queue
    assert headers[HEADER_PREFIX + "routing-key"] == "test.retry.order"
    assert headers[HEADER_PREFIX + "exchange"] == topology.exchange
    assert headers[HEADER_PREFIX + "time"]
    assert letter.properties["type"] == "test.retry.order"  # the original properties survive
    assert letter.properties["message_id"] == str(event.event_id)
    assert letter.properties["content_type"] == "application/cloudevents+json"
    assert sum(len(str(k)) + len(str(v)) for k, v in headers.items()) < MAX_HEADERS_BYTES


def test_transient_failures_recover_without_a_dead_letter(
    topology: Topology, recorder: Recorder
) -> None:
    app = topology.app(handlers=[handlers.fails_twice])
    queue = f"{topology.service()}.fails_twice"
    with running_worker(app):
        event = emit("test.flaky.payment", {})
        transmit(app)
        wait_for(lambda: len(recorder.get("fails_twice")) == 3)
        wait_for(lambda: topology.queue_depth(queue) == 0)
    assert recorder.get("fails_twice") == [event] * 3
    assert topology.queue_depth(queue + ".dlq") == 0


def test_countdown_delays_the_retry(topology: Topology, recorder: Recorder) -> None:
    app = topology.app(handlers=[handlers.delayed_retry])
    queue = f"{topology.service()}.delayed_retry"
    with running_worker(app):
        emit("test.delay.x", {})
        transmit(app)
        wait_for(lambda: topology.queue_depth(queue + ".dlq") == 1)
    first, second = recorder.get("delayed_retry")
    assert second - first >= 0.9


def test_reject_event_dead_letters_at_once(topology: Topology, recorder: Recorder) -> None:
    app = topology.app(handlers=[handlers.rejects])
    queue = f"{topology.service()}.rejects"
    with running_worker(app):
        emit("test.reject.it", {})
        transmit(app)
        wait_for(lambda: topology.queue_depth(queue + ".dlq") == 1)
    assert len(recorder.get("rejects")) == 1
    [letter] = drain(topology.broker_url, queue + ".dlq")
    assert letter.headers[HEADER_PREFIX + "reason"] == "rejected"
    assert letter.headers[HEADER_PREFIX + "attempts"] == 1
    assert letter.headers[HEADER_PREFIX + "exception"].endswith("RejectEvent")


def test_an_error_the_policy_does_not_retry_dead_letters_at_once(
    topology: Topology, recorder: Recorder
) -> None:
    # Not in autoretry_for (ValueError), or in dont_retry_for (a ConnectionError subclass):
    # one attempt, reason "rejected", whatever max_retries.
    app = topology.app(handlers=[handlers.narrow_retry])
    queue = f"{topology.service()}.narrow_retry"
    with running_worker(app):
        emit("test.narrow.value", {"raise": "value"})
        emit("test.narrow.refused", {"raise": "refused"})
        transmit(app)
        wait_for(lambda: topology.queue_depth(queue + ".dlq") == 2)
    assert len(recorder.get("narrow_retry")) == 2
    letters = drain(topology.broker_url, queue + ".dlq")
    assert sorted(letter.headers[HEADER_PREFIX + "exception"] for letter in letters) == [
        "builtins.ConnectionRefusedError",
        "builtins.ValueError",
    ]
    for letter in letters:
        assert letter.headers[HEADER_PREFIX + "reason"] == "rejected"
        assert letter.headers[HEADER_PREFIX + "attempts"] == 1


class _Evil:
    """Unpickling this creates a file: proof that nothing was unpickled if it is absent."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (str(self.path), "w"))


def _envelope(**overrides: Any) -> bytes:
    body = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "elsewhere",
        "type": "test.poison.typed",
        "eventversion": 1,
        "data": {"n": 1},
    }
    return json.dumps({**body, **overrides}).encode()


def test_poison_goes_straight_to_the_dlq_and_the_worker_stays_up(
    topology: Topology, recorder: Recorder, tmp_path: Path
) -> None:
    app = topology.app(handlers=[handlers.poison_target])
    queue = f"{topology.service()}.poison_target"
    marker = tmp_path / "unpickled"
    cloud = "application/cloudevents+json"
    poison: dict[str, tuple[bytes, str, dict[str, Any]]] = {
        "bad-json": (b'{"specversion": "1.0", "id": ', cloud, {"message_id": "m1"}),
        "bad-json-no-id": (b"not json at all", cloud, {}),
        "not-utf8": (b"\xff\xfe\xfd", cloud, {"message_id": "m2"}),
        "text-plain": (_envelope(), "text/plain", {"message_id": "m3"}),
        "pickle": (
            pickle.dumps(_Evil(marker)),
            "application/x-python-serialize",
            {"message_id": "m4"},
        ),
        "schema-invalid": (_envelope(data={"n": "not a number"}), cloud, {"message_id": "m5"}),
        "unknown-version": (_envelope(eventversion=7), cloud, {"message_id": "m6"}),
        "foreign-task": (
            _envelope(),
            "application/json",
            {"message_id": "m7", "headers": {"task": "celery.backend_cleanup"}},
        ),
        "not-an-envelope": (b'{"hello": "world"}', cloud, {"message_id": "m8"}),
    }
    with running_worker(app), Connection(topology.broker_url) as conn:
        producer = Producer(conn.channel(), exchange=DomainEvents.of(app).topology.exchange())
        for kind, (body, content_type, props) in poison.items():
            producer.publish(
                body,
                routing_key=f"test.poison.{kind}",
                content_type=content_type,
                content_encoding="binary",
                **props,
            )
        wait_for(lambda: topology.queue_depth(queue + ".dlq") == len(poison))
        valid = emit(handlers.PoisonTarget(n=5))
        transmit(app)
        wait_for(lambda: recorder.get("poison_target") == [valid])
        wait_for(lambda: topology.queue_depth(queue) == 0)
    by_kind = {
        m.headers[HEADER_PREFIX + "routing-key"].removeprefix("test.poison."): m
        for m in drain(topology.broker_url, queue + ".dlq")
    }
    assert set(by_kind) == set(poison)
    for kind, letter in by_kind.items():
        assert as_bytes(letter.body) == poison[kind][0], kind  # byte-identical, even not UTF-8
        assert letter.headers[HEADER_PREFIX + "reason"] == "poison", kind
        assert letter.headers[HEADER_PREFIX + "attempts"] == 1, kind  # never retried
        assert "EventDecodeError" in letter.headers[HEADER_PREFIX + "exception"] or (
            "UnknownEventError" in letter.headers[HEADER_PREFIX + "exception"]
            or "EventValidationError" in letter.headers[HEADER_PREFIX + "exception"]
        ), kind
    assert "EventValidationError" in by_kind["schema-invalid"].headers[HEADER_PREFIX + "exception"]
    assert "UnknownEventError" in by_kind["unknown-version"].headers[HEADER_PREFIX + "exception"]
    assert not marker.exists(), "a pickle was deserialized"
    assert recorder.get("poison_target") == [valid]


def test_dead_letter_survives_a_deleted_dlq(topology: Topology, recorder: Recorder) -> None:
    app = topology.app(handlers=[handlers.rejects])
    queue = f"{topology.service()}.rejects"
    with running_worker(app):
        emit("test.reject.first", {})
        transmit(app)
        wait_for(lambda: topology.queue_depth(queue + ".dlq") == 1)
        with Connection(topology.broker_url) as conn:
            conn.default_channel.queue_delete(queue + ".dlq")  # an operator's mistake
        emit("test.reject.second", {})
        transmit(app)
        wait_for(lambda: len(recorder.get("rejects")) == 2)
        wait_for(lambda: _depth_or_zero(topology, queue + ".dlq") == 1)


def _depth_or_zero(topology: Topology, queue: str) -> int:
    try:
        return topology.queue_depth(queue)
    except Exception:
        return 0


def test_event_is_requeued_when_its_dead_letter_cannot_be_confirmed(
    topology: Topology, recorder: Recorder
) -> None:
    app = topology.app(
        handlers=[handlers.rejects],
        domain_events_publish_timeout=1,
    )
    queue = f"{topology.service()}.rejects"
    with running_worker(app):
        unwritable_dlq(topology.broker_url, queue + ".dlq")
        emit("test.reject.unwritable", {})
        transmit(app)
        wait_for(lambda: len(recorder.get("rejects")) >= 1)  # ran, dead letter refused
    wait_for(lambda: topology.queue_depth(queue) == 1)  # still there: nothing was lost
    assert topology.queue_depth(queue + ".dlq") == 0
    with Connection(topology.broker_url) as conn:
        conn.default_channel.queue_delete(queue + ".dlq")  # the operator repairs the DLQ
    with running_worker(app):
        wait_for(lambda: topology.queue_depth(queue + ".dlq") == 1)
    assert topology.queue_depth(queue) == 0
