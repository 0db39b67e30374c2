"""A 3-node RabbitMQ cluster loses the node everyone is connected to: nothing is lost.

The cluster is private to this test (tests/rabbitnode.py): three nodes on their own ports and
data directories, joined into one cluster, stopped afterwards. Publisher and worker get the
three URLs as a failover list; every queue is a quorum queue (the handler queues, the DLQs,
the unrouted queue, and Celery's own task queue).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from celery_domain_events import PublishError, emit, transmit

from .conftest import Topology, WorkerProcess, wait_for
from .rabbitnode import RabbitNode, node_support

pytestmark = [
    pytest.mark.rabbitmq,
    pytest.mark.worker,
    pytest.mark.slow,
    pytest.mark.cluster,
    pytest.mark.timeout(600),
]

EVENTS = 10_000
BATCH = 500
HANDLERS = ["typed_or_not", "also_untyped"]  # both bound to probe.untyped


@pytest.fixture
def cluster() -> Iterator[list[RabbitNode]]:
    why_not = node_support()
    if why_not is not None:
        if os.environ.get("CI"):
            pytest.fail(why_not)
        pytest.skip(why_not)
    uid = uuid.uuid4().hex[:6]
    nodes = [RabbitNode(f"dc{uid}n{i}") for i in range(3)]
    try:
        first = nodes[0].start()
        for node in nodes[1:]:
            node.start()
            node.ctl("stop_app")
            node.ctl("join_cluster", first.node)
            node.start_app()
        yield nodes
    finally:
        for node in reversed(nodes):
            node.stop()


def test_losing_the_connected_node_loses_no_event(
    cluster: list[RabbitNode], worker_process: Callable[..., WorkerProcess], tmp_path: Any
) -> None:
    urls = ";".join(node.url for node in cluster)
    topology = Topology(urls)
    worker = worker_process(
        HANDLERS, TEST_BROKER_URL=urls, TEST_QUEUE_TYPE="quorum", TEST_CELERY_QUEUE_TYPE="quorum"
    )
    worker.topology = topology
    worker.env["TEST_EXCHANGE"] = topology.exchange
    worker.env["TEST_UNROUTED"] = topology.unrouted
    worker.start()
    publisher = topology.app("pub", domain_events_queue_type="quorum")
    ids: list[str] = []
    errors: list[BaseException] = []
    half_sent = threading.Event()

    def publish_all() -> None:
        for start in range(0, EVENTS, BATCH):
            batch = [emit("probe.untyped", {"n": n}) for n in range(start, start + BATCH)]
            for attempt in range(3):  # a batch that fails is transmitted again: nothing dropped
                try:
                    transmit(publisher)
                    break
                except PublishError as exc:
                    errors.append(exc)
                    if attempt == 2:
                        raise
            ids.extend(str(e.event_id) for e in batch)
            if len(ids) >= EVENTS // 2:
                half_sent.set()

    thread = threading.Thread(target=publish_all)
    started = time.monotonic()
    thread.start()
    assert half_sent.wait(120)
    cluster[0].stop_app()  # the first URL: the node publisher and worker are connected to
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert len(ids) == EVENTS

    def handled() -> set[str]:
        return set(os.listdir(worker.markers))

    expected = {f"{h}-{i}" for h in HANDLERS for i in ids}
    wait_for(lambda: handled() >= expected, timeout=300, interval=1.0)
    assert handled() >= expected  # 10,000 handled per handler, 0 lost
    assert worker.proc is not None
    assert worker.proc.poll() is None, worker.log()[-3000:]
    elapsed = time.monotonic() - started
    assert elapsed < 600
