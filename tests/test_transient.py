"""Transient handlers on real workers: a queue of each worker's own, only while it runs."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from kombu import Connection

from celery_domain_events.ops.rabbitmq_api import ManagementClient

from .conftest import BROKER_URL, Topology, WorkerProcess, wait_for
from .test_untrusted import MATRIX_SOLO, POOLS, envelope, publish

pytestmark = [pytest.mark.rabbitmq, pytest.mark.worker, pytest.mark.slow]

Make = Callable[..., WorkerProcess]


def running_queues(topology: Topology, handler: str) -> list[str]:
    """The transient queues of ``handler`` bound to the exchange now (they exist iff bound)."""
    prefix = f"{topology.service('proc')}.{handler}."
    bindings = ManagementClient.for_broker(BROKER_URL).bindings_from(topology.exchange)
    return sorted({b["destination"] for b in bindings if b["destination"].startswith(prefix)})


def exists(queue: str) -> bool:
    with Connection(BROKER_URL) as conn:
        try:
            conn.default_channel.queue_declare(queue, passive=True)
        except conn.channel_errors as exc:
            return getattr(exc, "reply_code", None) == 405  # RESOURCE_LOCKED: another's exclusive
        return True


def send(topology: Topology, event_type: str, **data: object) -> str:
    event_id = str(uuid.uuid4())
    body = envelope(event_type, id=event_id, data=data or {"n": 1})
    publish(topology, json.dumps(body).encode(), routing_key=event_type, message_id=event_id)
    return event_id


def queues(worker: WorkerProcess, event_id: str) -> list[str]:
    """The queues the ``transient_seen`` handler got ``event_id`` from."""
    return sorted(line.split()[3] for line in worker.marker_lines("transient_seen", event_id))


def tags(worker: WorkerProcess, handler: str, event_id: str) -> list[str]:
    return sorted(line.split()[2] for line in worker.marker_lines(handler, event_id))


@pytest.mark.parametrize("pool", MATRIX_SOLO)
def test_events_published_while_no_worker_runs_are_not_kept(
    topology: Topology, worker_process: Make, pool: str
) -> None:
    worker = worker_process(["transient_seen"]).start(*POOLS[pool])
    [first] = running_queues(topology, "transient_seen")
    # <service>.<handler>.<hostname, one word>-<6 random hex digits>
    host = re.sub(r"[^\w@-]", "_", worker.hostname, flags=re.ASCII)
    assert re.fullmatch(
        rf"{re.escape(worker.queue('transient_seen'))}\.{host}-[0-9a-f]{{6}}", first
    )
    seen = send(topology, "probe.transient")
    wait_for(lambda: bool(worker.marker_lines("transient_seen", seen)), timeout=20)

    worker.stop()
    wait_for(lambda: not running_queues(topology, "transient_seen"), timeout=10)
    assert not exists(first)
    missed = send(topology, "probe.transient")
    wait_for(lambda: topology.queue_depth(topology.unrouted) == 1, timeout=10)  # bound to none

    worker.start(*POOLS[pool])  # its log already says " ready.": wait for its queue
    wait_for(lambda: len(running_queues(topology, "transient_seen")) == 1, timeout=60)
    [second] = running_queues(topology, "transient_seen")
    assert second != first
    after = send(topology, "probe.transient")
    wait_for(lambda: bool(worker.marker_lines("transient_seen", after)), timeout=20)
    assert not worker.marker_lines("transient_seen", missed)
    # No durable queue and no DLQ, ever.
    assert not exists(worker.queue("transient_seen"))
    assert not exists(worker.queue("transient_seen") + ".dlq")
    worker.stop()
    wait_for(lambda: not running_queues(topology, "transient_seen"), timeout=10)


def test_every_running_worker_handles_every_event(topology: Topology, worker_process: Make) -> None:
    a = worker_process(["transient_seen"], TEST_WORKER_TAG="a").start(*POOLS["solo"])
    worker_process(["transient_seen"], TEST_WORKER_TAG="b").start(*POOLS["prefork"])
    assert len(running_queues(topology, "transient_seen")) == 2
    ids = [send(topology, "probe.transient") for _ in range(10)]
    # Both workers share the marker directory: each line names its worker.
    wait_for(lambda: all(len(a.marker_lines("transient_seen", i)) == 2 for i in ids), timeout=30)
    assert all(tags(a, "transient_seen", i) == ["a", "b"] for i in ids)


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_a_retry_reaches_only_the_worker_it_failed_on(
    topology: Topology, worker_process: Make, queue_type: str
) -> None:
    # With quorum handler queues (typed_or_not's), Celery's native delayed delivery is on:
    # the transient queue stays classic and its retries are still held by the worker.
    handlers = ["transient_fails", "typed_or_not"]
    env = {"TEST_QUEUE_TYPE": queue_type}
    a = worker_process(handlers, TEST_WORKER_TAG="a", **env).start(*POOLS["prefork"])
    b = worker_process(handlers, TEST_WORKER_TAG="b", **env).start(*POOLS["solo"])
    event_id = send(topology, "probe.transient.fail")
    # Each worker got the event once and retried it twice, through its own queue only.
    wait_for(lambda: len(a.marker_lines("transient_fails", event_id)) >= 6, timeout=30)
    wait_for(lambda: f"Dropped event {event_id}" in a.log(), timeout=10)
    wait_for(lambda: f"Dropped event {event_id}" in b.log(), timeout=10)
    assert tags(a, "transient_fails", event_id) == ["a"] * 3 + ["b"] * 3
    for queue in running_queues(topology, "transient_fails"):
        client = ManagementClient.for_broker(BROKER_URL)
        info = client.queue(queue) or {}
        assert info.get("type") == "classic"
        assert info.get("exclusive")
        assert info.get("auto_delete")
        assert not info.get("durable")
    if queue_type == "quorum":
        assert "celery_delayed" not in json.dumps(
            ManagementClient.for_broker(BROKER_URL).bindings_from(topology.exchange + ".retry")
        )


def test_a_final_failure_is_logged_and_acked_without_a_dlq(
    topology: Topology, worker_process: Make
) -> None:
    worker = worker_process(["transient_fails"]).start(*POOLS["prefork"])
    [queue] = running_queues(topology, "transient_fails")
    event_id = send(topology, "probe.transient.fail", secret="s3cr3t-data")
    wait_for(lambda: f"Dropped event {event_id}" in worker.log(), timeout=30)
    dropped = next(
        line for line in worker.log().splitlines() if f"Dropped event {event_id}" in line
    )
    assert "ERROR" in dropped
    assert "after 3 attempt(s)" in dropped
    assert "retries-exhausted builtins.RuntimeError: transient_fails handler failed" in dropped
    assert "s3cr3t-data" not in worker.log()  # never the event's data
    # Poison is dropped the same way.
    publish(topology, b"not json", routing_key="probe.transient.fail", message_id="poison-1")
    wait_for(lambda: "Dropped event poison-1" in worker.log(), timeout=20)
    assert "poison" in next(
        ln for ln in worker.log().splitlines() if "Dropped event poison-1" in ln
    )

    def settled() -> bool:  # the management API's statistics lag by a few seconds
        info = ManagementClient.for_broker(BROKER_URL).queue(queue) or {}
        return info.get("messages_unacknowledged") == 0 and info.get("messages") == 0

    wait_for(settled, timeout=30, interval=0.5)
    assert len(worker.marker_lines("transient_fails", event_id)) == 3  # acked: not redelivered
    assert not exists(worker.queue("transient_fails") + ".dlq")
    assert not exists(worker.queue("transient_fails"))


def test_pause_deletes_the_queue_and_resume_declares_a_new_one(
    topology: Topology, worker_process: Make
) -> None:
    worker = worker_process(["transient_seen"]).start(*POOLS["solo"])
    [first] = running_queues(topology, "transient_seen")
    stable = worker.queue("transient_seen")
    control = topology.app("ctl").control
    reply = control.cancel_consumer(stable, destination=[worker.hostname], reply=True)
    assert reply == [{worker.hostname: {"ok": f"no longer consuming from {stable}"}}]
    wait_for(lambda: not running_queues(topology, "transient_seen"), timeout=10)
    wait_for(lambda: "its events are not kept meanwhile" in worker.log(), timeout=10)
    missed = send(topology, "probe.transient")

    control.add_consumer(stable, destination=[worker.hostname], reply=True)
    wait_for(lambda: len(running_queues(topology, "transient_seen")) == 1, timeout=10)
    [second] = running_queues(topology, "transient_seen")
    assert second != first
    after = send(topology, "probe.transient")
    wait_for(lambda: bool(worker.marker_lines("transient_seen", after)), timeout=20)
    assert not worker.marker_lines("transient_seen", missed)
    # Its own name works too.
    control.cancel_consumer(second, destination=[worker.hostname], reply=True)
    wait_for(lambda: not running_queues(topology, "transient_seen"), timeout=10)


@pytest.mark.slow
def test_a_reconnect_declares_a_fresh_queue(private_node: Any, tmp_path: Any) -> None:
    # The broker that goes away is a node of this test's own, never the suite's.
    topology = Topology(private_node.url)
    worker = WorkerProcess(topology, tmp_path, ["transient_seen"])
    try:
        worker.start(*POOLS["solo"])
        before = send(topology, "probe.transient")
        wait_for(lambda: bool(worker.marker_lines("transient_seen", before)), timeout=20)
        [first] = queues(worker, before)
        # The worker's connection breaks, as in a network failure; its exclusive queue goes.
        private_node.stop_app()
        private_node.start_app()
        after = ""

        def handled_after_reconnect() -> bool:
            nonlocal after
            if not after or not worker.marker_lines("transient_seen", after):
                after = send(topology, "probe.transient")  # lost while nothing is bound
                return False
            return True

        wait_for(handled_after_reconnect, timeout=90, interval=2)
        [second] = queues(worker, after)
        assert second != first
        assert second.startswith(first.rsplit("-", 1)[0])  # <service>.<handler>.<hostname>-
    finally:
        worker.cleanup()
        topology.cleanup()
