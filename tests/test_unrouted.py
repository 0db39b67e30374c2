"""The unrouted queue: bounded, of the configured queue type, never fatal to declare."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from kombu import Connection

from celery_domain_events import emit, transmit

from .conftest import Topology, WorkerProcess, wait_for

pytestmark = [pytest.mark.rabbitmq]


def queue_arguments(topology: Topology, name: str) -> dict[str, object]:
    from celery_domain_events.ops.rabbitmq_api import ManagementClient

    client = ManagementClient.for_broker(topology.broker_url)
    return dict((client.queue(name) or {}).get("arguments") or {})


def test_unrouted_events_are_bounded_and_the_oldest_dropped(topology: Topology) -> None:
    app = topology.app(domain_events_unrouted_max_length=100)
    for n in range(150):
        emit("test.unrouted.nobody", {"n": n})
    transmit(app)
    wait_for(lambda: topology.queue_depth(topology.unrouted) == 100)
    with Connection(topology.broker_url) as conn:
        first = conn.default_channel.basic_get(topology.unrouted, no_ack=True)
    assert b'"n":50' in (first.body.encode() if isinstance(first.body, str) else first.body)
    assert queue_arguments(topology, topology.unrouted) == {
        "x-max-length": 100,
        "x-overflow": "drop-head",
        "x-queue-type": "classic",
    }


def test_the_unrouted_queue_follows_the_queue_type(topology: Topology) -> None:
    app = topology.app(domain_events_queue_type="quorum")
    emit("test.unrouted.quorum", {})
    transmit(app)
    assert queue_arguments(topology, topology.unrouted)["x-queue-type"] == "quorum"


def test_an_unrouted_queue_with_other_arguments_never_stops_publishing(
    topology: Topology, caplog: pytest.LogCaptureFixture
) -> None:
    with Connection(topology.broker_url) as conn:  # an older deployment's queue
        conn.default_channel.exchange_declare(topology.unrouted, "fanout", durable=True)
        conn.default_channel.queue_declare(topology.unrouted, durable=True, auto_delete=False)
        conn.default_channel.queue_bind(topology.unrouted, topology.unrouted, "")
    app = topology.app()
    with caplog.at_level(logging.WARNING):
        emit("test.unrouted.older", {})
        transmit(app)
    assert topology.queue_depth(topology.unrouted) == 1
    assert "could not declare" in caplog.text
    assert "set_policy" in caplog.text


@pytest.mark.worker
def test_the_worker_warns_when_unrouted_events_pile_up(
    topology: Topology, worker_process: Callable[..., WorkerProcess]
) -> None:
    publisher = topology.app("pub", domain_events_unrouted_max_length=1_000)
    for n in range(850):  # over 80% of the limit
        emit("test.unrouted.pile", {"n": n})
    transmit(publisher)
    worker = worker_process(["typed_or_not"], TEST_UNROUTED_MAX="1000").start("-P", "solo")
    wait_for(lambda: "no handler is bound to" in worker.log(), timeout=10)
    assert f"{topology.unrouted} holds 850 event(s)" in worker.log()
    assert "the oldest are dropped past 1000" in worker.log()


def test_the_documented_unrouted_defaults() -> None:
    from celery_domain_events.config import Settings
    from celery_domain_events.consuming import bootstep

    assert Settings.model_fields["unrouted_max_length"].default == 100_000
    assert bootstep.UNROUTED_WARN_FRACTION == 0.8  # "80 % full"
    assert bootstep.UNROUTED_CHECK_SECONDS == 300  # "every 5 minutes"
