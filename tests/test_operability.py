"""Trace propagation, structured event logs and petisco-style routing keys (real broker)."""

from __future__ import annotations

import logging

import pytest

from celery_domain_events import emit, transmit
from celery_domain_events.tracing import trace_id, use_traceparent

from . import handlers
from .conftest import Recorder, Topology, running_worker, wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.worker]

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_trace_context_flows_from_emit_through_handlers(
    topology: Topology, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    app = topology.app(handlers=[handlers.trace_start, handlers.trace_next])
    with caplog.at_level(logging.INFO, logger="celery_domain_events.events"), running_worker(app):
        with use_traceparent(TRACEPARENT):
            start = emit("test.trace.start", {})
            transmit(app)
        wait_for(lambda: len(recorder.get("trace_next")) == 1)
    [in_start] = recorder.get("trace_start")
    [in_next] = recorder.get("trace_next")
    # Same trace all the way, each handler in a span of its own.
    assert trace_id(in_start) == trace_id(in_next) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert len({TRACEPARENT, in_start, in_next}) == 3
    records = [r for r in caplog.records if r.name == "celery_domain_events.events"]
    emitted = [r for r in records if r.outcome == "emitted"]
    handled = [r for r in records if r.outcome == "handled"]
    assert {r.event_name for r in emitted} == {"test.trace.start", "test.trace.next"}
    assert {r.handler for r in handled} == {"trace_start", "trace_next"}
    assert all(r.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736" for r in emitted + handled)
    [first] = [r for r in emitted if r.event_name == "test.trace.start"]
    assert first.event_id == str(start.event_id)
    assert all(r.duration_ms >= 0 for r in handled)


def test_petisco_keys_route_by_event_name_patterns(topology: Topology, recorder: Recorder) -> None:
    conf = {"domain_events_key_format": "petisco", "domain_events_organization": "acme"}
    app = topology.app(handlers=[handlers.petisco_users], **conf)
    with running_worker(app):
        created = emit("user.created", {})
        emit("order.paid", {})
        emit("user.profile.changed", {})  # two words after user: not user.*
        transmit(app)
        wait_for(lambda: len(recorder.get("petisco_users")) == 1)
        wait_for(lambda: topology.queue_depth(f"{topology.service()}.petisco_users") == 0)
    assert recorder.get("petisco_users") == [created]
    assert recorder.get("petisco_users")[0].event_name == "user.created"
