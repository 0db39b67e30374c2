"""RabbitMQ stops in the middle of transmit() and comes back: not one event is lost; a worker
started while it is down waits for it.

The broker stopped is a private node this test starts (tests/rabbitnode.py), never the one the
suite runs against.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection

from celery_domain_events import emit, transmit
from celery_domain_events.publishing.api import discard

from .conftest import Topology, WorkerProcess, probe, wait_for
from .test_untrusted import envelope, publish

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

EVENTS = 1_000
BATCH = 50


@pytest.fixture
def topology_on(private_node: Any) -> Iterator[Topology]:
    topo = Topology(private_node.url)
    yield topo
    topo.cleanup()


def test_no_event_is_lost_when_the_broker_restarts_during_transmit(
    private_node: Any, topology_on: Topology, record_property: Any
) -> None:
    topology = topology_on
    app = topology.app()
    probe_queue = probe(topology, app)  # durable: it keeps what a stopped broker had
    sent: list[str] = []
    errors: list[BaseException] = []
    first_batch_done = threading.Event()

    def publish_all() -> None:
        try:
            for start in range(0, EVENTS, BATCH):
                for n in range(start, start + BATCH):
                    emit("test.restart.tick", {"n": n})
                sent.extend(str(e.event_id) for e in transmit(app))
                first_batch_done.set()
                time.sleep(0.02)  # spread the batches over the restart window
        except BaseException as exc:
            errors.append(exc)
            discard()
            first_batch_done.set()

    publisher = threading.Thread(target=publish_all)
    publisher.start()
    assert first_batch_done.wait(30)
    private_node.stop_app()
    time.sleep(3)
    private_node.start_app()
    publisher.join(timeout=180)
    assert not publisher.is_alive()
    assert errors == []
    assert len(sent) == EVENTS

    received: set[str] = set()
    duplicates = 0

    def drain() -> bool:
        nonlocal duplicates
        with Connection(topology.broker_url) as conn:
            channel = conn.channel()
            while (message := channel.basic_get(probe_queue, no_ack=True)) is not None:
                event_id = message.properties["message_id"]
                duplicates += event_id in received
                received.add(event_id)
        return received >= set(sent)

    wait_for(drain, timeout=30, interval=0.5)
    assert received == set(sent)  # 0 of 1,000 lost; duplicates are allowed (at-least-once)
    record_property("duplicates", duplicates)


@pytest.mark.worker
def test_a_worker_started_while_the_broker_is_down_waits_for_it(
    private_node: Any, topology_on: Topology, tmp_path: Any
) -> None:
    topology = topology_on
    private_node.stop_app()  # the AMQP port is closed: connections are refused
    worker = WorkerProcess(topology, tmp_path, ["sibling"])
    try:
        worker.start("-P", "solo", ready=False)
        assert worker.proc is not None
        wait_for(lambda: "could not declare the topology" in worker.log(), timeout=60)
        time.sleep(3)
        assert worker.proc.poll() is None, worker.log()  # still running, not an exit
        assert "Unrecoverable error" not in worker.log()
        private_node.start_app()
        wait_for(lambda: " ready." in worker.log(), timeout=90)
        event_id = str(uuid.uuid4())
        body = json.dumps(envelope("probe.retry", id=event_id)).encode()
        publish(topology, body, routing_key="probe.retry")
        wait_for(lambda: len(worker.marker_lines("sibling", event_id)) == 1, timeout=30)
    finally:
        worker.cleanup()
