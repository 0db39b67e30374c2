"""The main path against the real RabbitMQ and a real worker: emit -> transmit -> handlers."""

from __future__ import annotations

import json
import uuid
from datetime import datetime

import pytest
from kombu import Connection, Consumer, Queue

from celery_domain_events import DomainEvents, GenericEvent, discard, emit, transmit
from celery_domain_events.routing import matches
from celery_domain_events.tracing import trace_id

from . import handlers
from .conftest import Recorder, Topology, running_worker, wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.worker]


@pytest.mark.matrix
def test_fan_out_runs_each_handler_once(topology: Topology, recorder: Recorder) -> None:
    app = topology.app(handlers=[handlers.welcome_mail, handlers.user_stats])
    with running_worker(app):
        event = emit(handlers.UserCreated(user_id=1, email="ada@example.com"))
        assert transmit(app) == [event]
        wait_for(lambda: recorder.get("welcome_mail") and recorder.get("user_stats"))
        # Give a duplicate the chance to show up before asserting exactly once.
        wait_for(lambda: topology.queue_depth(f"{topology.service()}.welcome_mail") == 0)
    assert recorder.get("welcome_mail") == [event]
    assert recorder.get("user_stats") == [event]
    received = recorder.get("welcome_mail")[0]
    assert isinstance(received, handlers.UserCreated)
    assert received.email == "ada@example.com"


KEYS = ["user", "user.created", "user.a.b", "created", "order.created", "user.x.done", "user.done"]


def test_wildcards_match_exactly_as_rabbitmq(topology: Topology, recorder: Recorder) -> None:
    app = topology.app(handlers=list(handlers.WILDCARDS))
    ids: dict[str, str] = {}
    with running_worker(app):
        for key in KEYS:
            ids[str(emit(key, {"key": key}).event_id)] = key
        transmit(app)
        expected = {
            name: sorted(k for k in KEYS if any(matches(p, k) for p in patterns))
            for name, patterns in handlers.WILDCARDS.items()
        }
        total = sum(len(v) for v in expected.values())
        wait_for(lambda: sum(len(recorder.get(n)) for n in expected) >= total)
    got = {name: sorted(e.event_name for e in recorder.get(name)) for name in expected}
    assert got == expected
    # The RabbitMQ semantics our in-process matcher must reproduce (kombu's memory:// does not).
    assert "user" in got["w_user_hash"]
    assert "created" in got["w_hash_created"]
    assert "user.done" in got["w_mid_hash"]
    assert "user.a.b" not in got["w_user_star"]
    assert all(isinstance(e, GenericEvent) for e in recorder.get("w_all"))


def test_worker_started_after_emit_gets_the_events(topology: Topology, recorder: Recorder) -> None:
    app = topology.app(handlers=[handlers.welcome_mail])
    queue = f"{topology.service()}.welcome_mail"
    with running_worker(app):
        pass  # a first deployment declared the durable queue, then the worker went away
    events = [emit(handlers.UserCreated(user_id=i)) for i in range(5)]
    transmit(app)
    wait_for(lambda: topology.queue_depth(queue) == 5)
    assert recorder.get("welcome_mail") == []
    with running_worker(app):
        wait_for(lambda: len(recorder.get("welcome_mail")) == 5)
    assert recorder.get("welcome_mail") == events


def test_discard_sends_nothing(topology: Topology, recorder: Recorder) -> None:
    app = topology.app(handlers=[handlers.welcome_mail])
    queue = f"{topology.service()}.welcome_mail"
    with running_worker(app):
        pass
    emit(handlers.UserCreated(user_id=1))
    emit("test.user.created", {"user_id": 2})
    assert len(discard()) == 2
    assert transmit(app) == []
    assert topology.queue_depth(queue) == 0
    assert topology.queue_depth(topology.unrouted) == 0


@pytest.mark.matrix
def test_wire_format_is_cloudevents_json(topology: Topology) -> None:
    app = topology.app()
    probe = Queue(
        f"test.{topology.uid}.probe",
        exchange=DomainEvents.of(app).topology.exchange(),
        routing_key="#",
        auto_delete=True,
    )
    with Connection(topology.broker_url) as conn:
        probe.declare(channel=conn.default_channel)
        event = emit(handlers.UserCreated(user_id=7, email="x@example.com"))
        transmit(app)
        received: list = []
        with Consumer(
            conn,
            [probe],
            callbacks=[lambda body, msg: received.append(msg)],
            accept=["application/cloudevents+json"],
        ):
            wait_for(lambda: bool(received) or conn.drain_events(timeout=1) or bool(received))
    message = received[0]
    body = json.loads(message.body)
    traceparent = body.pop("traceparent")  # a new trace: none was active in the test
    assert trace_id(traceparent) is not None
    # Python 3.10's fromisoformat does not read the "Z" suffix.
    assert datetime.fromisoformat(body.pop("time").replace("Z", "+00:00")) == event.occurred_at
    assert body == {
        "specversion": "1.0",
        "id": str(event.event_id),
        "source": topology.service(),
        "type": "test.user.created",
        "datacontenttype": "application/json",
        "eventversion": 1,
        "data": {"user_id": 7, "email": "x@example.com"},
    }
    assert message.content_type == "application/cloudevents+json"
    assert message.properties["message_id"] == str(event.event_id)
    assert message.properties["type"] == "test.user.created"
    assert message.properties["delivery_mode"] == 2
    assert message.properties["app_id"] == topology.service()
    assert message.headers == {}  # structured mode: every attribute is in the body
    assert message.delivery_info["routing_key"] == "test.user.created"


def test_unbound_events_are_kept_in_the_unrouted_queue(topology: Topology) -> None:
    app = topology.app()
    emit(f"nobody.listens.{uuid.uuid4().hex[:6]}", {"n": 1})
    transmit(app)
    wait_for(lambda: topology.queue_depth(topology.unrouted) == 1)
