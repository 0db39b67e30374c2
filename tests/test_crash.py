"""Crashes in real `celery worker` subprocesses: SIGKILL, crash loops, quorum queues."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from celery_domain_events import emit, transmit

from .conftest import Topology, WorkerProcess, wait_for

pytestmark = [pytest.mark.rabbitmq, pytest.mark.worker, pytest.mark.slow]

Make = Callable[..., WorkerProcess]


def test_killed_pool_process_gets_the_event_redelivered(
    topology: Topology, worker_process: Make
) -> None:
    worker = worker_process(["crash_once"]).start()
    publisher = topology.app("pub")
    event = emit("probe.crash.once", {})
    transmit(publisher)
    # First delivery: the pool process dies (SIGKILL); reject_on_worker_lost requeues it.
    wait_for(lambda: len(worker.marker_lines("crash_once", event.event_id)) == 2, timeout=60)
    wait_for(lambda: topology.queue_depth(worker.queue("crash_once")) == 0)
    assert topology.queue_depth(worker.queue("crash_once") + ".dlq") == 0
    pids = {line.split()[1] for line in worker.marker_lines("crash_once", event.event_id)}
    assert len(pids) == 2  # ran in a new pool process the second time
    assert worker.proc is not None
    assert worker.proc.poll() is None


def test_sigkilled_worker_mid_handler_redelivers_to_the_next_worker(
    topology: Topology, worker_process: Make
) -> None:
    first = worker_process(["hang_once"]).start()
    publisher = topology.app("pub")
    event = emit("probe.hang", {})
    transmit(publisher)
    wait_for(lambda: len(first.marker_lines("hang_once", event.event_id)) == 1, timeout=30)
    first.kill()  # main process and pool, mid-handler: the delivery was never acked
    second = worker_process(["hang_once"]).start()
    wait_for(lambda: len(second.marker_lines("hang_once", event.event_id)) == 2, timeout=60)
    wait_for(lambda: topology.queue_depth(second.queue("hang_once")) == 0)


def test_quorum_delivery_limit_ends_a_crash_loop_in_the_dlq(
    topology: Topology, worker_process: Make
) -> None:
    worker = worker_process(
        ["crash_always"], TEST_QUEUE_TYPE="quorum", TEST_DELIVERY_LIMIT="2"
    ).start()
    publisher = topology.app("pub", domain_events_queue_type="quorum")
    event = emit("probe.crash.always", {})
    transmit(publisher)
    dlq = worker.queue("crash_always") + ".dlq"
    wait_for(lambda: topology.queue_depth(dlq) == 1, timeout=90)
    assert topology.queue_depth(worker.queue("crash_always")) == 0
    # delivered, then redelivered up to the limit: 1 + 2 attempts, each killing its process
    assert len(worker.marker_lines("crash_always", event.event_id)) == 3
    assert worker.proc is not None
    assert worker.proc.poll() is None


def test_quorum_retries_use_native_delay_and_reach_only_the_failing_handler(
    topology: Topology, worker_process: Make
) -> None:
    worker = worker_process(["flaky", "sibling"], TEST_QUEUE_TYPE="quorum").start()
    publisher = topology.app("pub", domain_events_queue_type="quorum")
    event = emit("probe.retry", {})
    transmit(publisher)
    dlq = worker.queue("flaky") + ".dlq"
    wait_for(lambda: topology.queue_depth(dlq) == 1, timeout=60)
    attempts = [float(line.split()[0]) for line in worker.marker_lines("flaky", event.event_id)]
    assert len(attempts) == 3  # max_retries=2, counted exactly
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert all(gap >= 0.9 for gap in gaps), gaps  # countdown=1 honoured
    assert len(worker.marker_lines("sibling", event.event_id)) == 1
