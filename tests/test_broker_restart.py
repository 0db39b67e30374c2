"""RabbitMQ stops in the middle of transmit() and comes back: not one event is lost.

The broker stopped is a private node this test starts (tests/rabbitnode.py), never the one the
suite runs against.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kombu import Connection

from celery_domain_events import emit, transmit
from celery_domain_events.publishing.api import discard

from .conftest import Topology, probe, wait_for

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
