"""Dead-lettering when the broker will not take dead letters (real broker, real worker).

A DLQ that refuses publishes, or a broker that blocks publishers, must neither stall the
worker's other handlers for longer than the publish deadline nor lose the event; copies of a
dead letter whose confirm timed out are listed once and removed together.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kombu import Connection

from celery_domain_events.consuming.bootstep import HOLD_FIRST_SECONDS

from .conftest import Topology, WorkerProcess, unwritable_dlq, wait_for
from .test_cli import cli
from .test_untrusted import POOLS, envelope, publish

pytestmark = [pytest.mark.rabbitmq, pytest.mark.worker, pytest.mark.slow]

Make = Callable[..., WorkerProcess]
DEADLINE = 1.0  # domain_events_publish_timeout of these workers


def healthy_events_are_handled(worker: WorkerProcess, count: int, within: float) -> None:
    ids = [str(uuid.uuid4()) for _ in range(count)]
    started = time.monotonic()
    for event_id in ids:
        publish(worker.topology, json.dumps(envelope(id=event_id)).encode())
    wait_for(
        lambda: all(worker.marker_lines("also_untyped", i) for i in ids),
        timeout=within,
    )
    assert time.monotonic() - started < within


def settled_depth(topology: Topology, queue: str, quiet: float = 3.0) -> int:
    """The depth of ``queue`` once it has not changed for ``quiet`` seconds."""
    depth, since = topology.queue_depth(queue), time.monotonic()
    while time.monotonic() - since < quiet:
        time.sleep(0.2)
        now = topology.queue_depth(queue)
        if now != depth:
            depth, since = now, time.monotonic()
    return depth


def depth_or_zero(topology: Topology, queue: str) -> int:
    try:
        return topology.queue_depth(queue)
    except Exception:  # not declared (again) yet
        return 0


@pytest.mark.parametrize("pool", list(POOLS))
def test_a_refused_dead_letter_holds_only_its_handler(
    topology: Topology, worker_process: Make, pool: str
) -> None:
    worker = worker_process(["fails", "also_untyped"], TEST_PUBLISH_TIMEOUT=str(DEADLINE))
    worker.start(*POOLS[pool])
    queue = worker.queue("fails")
    unwritable_dlq(topology.broker_url, queue + ".dlq")
    event_id = str(uuid.uuid4())
    publish(
        topology, json.dumps(envelope("probe.fail", id=event_id)).encode(), routing_key="probe.fail"
    )
    wait_for(lambda: "holding the queue" in worker.log(), timeout=DEADLINE + 10)
    held_at = time.monotonic()
    # The other handler runs at full speed while the failing one is held...
    healthy_events_are_handled(worker, 20, within=5.0)
    # ... and the refused delivery is not redelivered in a loop meanwhile: it waits.
    assert len(worker.marker_lines("fails", event_id)) == 1
    assert topology.queue_depth(queue) == 1
    # The operator repairs the DLQ; after the hold the event is dead-lettered, once.
    with Connection(topology.broker_url) as conn:
        conn.default_channel.queue_delete(queue + ".dlq")
    wait_for(lambda: depth_or_zero(topology, queue + ".dlq") == 1, timeout=HOLD_FIRST_SECONDS + 15)
    assert time.monotonic() - held_at >= HOLD_FIRST_SECONDS - 1
    assert len(worker.marker_lines("fails", event_id)) == 2
    assert topology.queue_depth(queue) == 0
    assert "consumed again after a hold" in worker.log()


def test_a_refused_poison_dead_letter_holds_only_its_queue(
    topology: Topology, worker_process: Make
) -> None:
    # Poison is dead-lettered on the worker's main thread: the hold matters most here.
    worker = worker_process(["typed_or_not", "also_untyped"], TEST_PUBLISH_TIMEOUT=str(DEADLINE))
    worker.start(*POOLS["solo"])
    queue = worker.queue("typed_or_not")
    unwritable_dlq(topology.broker_url, queue + ".dlq")
    publish(topology, b"not json", queue=queue)
    wait_for(lambda: "holding the queue" in worker.log(), timeout=DEADLINE + 10)
    healthy_events_are_handled(worker, 20, within=5.0)
    assert worker.log().count("Could not dead-letter a poison message") == 1
    # An operator's resume ends the hold at once.
    with Connection(topology.broker_url) as conn:
        conn.default_channel.queue_delete(queue + ".dlq")
    subprocess_control(worker, "add_consumer", queue)
    wait_for(lambda: depth_or_zero(topology, queue + ".dlq") == 1, timeout=15)


def subprocess_control(worker: WorkerProcess, *args: str) -> None:
    worker.celery("control", *args, "-d", worker.hostname)


@pytest.fixture
def private_topology(private_node: Any) -> Iterator[Topology]:
    topology = Topology(private_node.url)
    yield topology
    topology.cleanup()


def test_an_unconfirmed_dead_letter_stalls_the_other_handlers_for_the_deadline_at_most(
    private_node: Any, private_topology: Topology, tmp_path: Any, record_property: Any
) -> None:
    # The solo pool dead-letters on the worker's main thread (as poison is on every pool): the
    # worst case. Under a memory alarm the dead letter's confirm never comes.
    deadline = 3.0
    topology = private_topology
    worker = WorkerProcess(
        topology, tmp_path, ["fails_later", "also_untyped"], TEST_PUBLISH_TIMEOUT=str(deadline)
    )
    try:
        worker.start(*POOLS["solo"])
        failing = str(uuid.uuid4())
        body = json.dumps(envelope("probe.fail.later", id=failing)).encode()
        publish(topology, body, routing_key="probe.fail.later")
        wait_for(lambda: bool(worker.marker_lines("fails_later", failing)), timeout=30)
        # Healthy events wait behind the failing run on the worker's only thread.
        healthy = [str(uuid.uuid4()) for _ in range(10)]
        for event_id in healthy:
            publish(topology, json.dumps(envelope(id=event_id)).encode())
        private_node.ctl("set_vm_memory_high_watermark", "absolute", "1")
        failed_at = time.time()
        (worker.markers / "go").touch()  # the failing run raises; its dead letter is blocked
        wait_for(lambda: all(worker.marker_lines("also_untyped", i) for i in healthy), timeout=30)
        handled_at = max(
            float(worker.marker_lines("also_untyped", i)[0].split()[0]) for i in healthy
        )
        stalled = handled_at - failed_at
        record_property("stall_seconds", round(stalled, 2))
        [held] = [line for line in worker.log().splitlines() if "holding the queue" in line]
        assert "ERROR/" in held, held
        # The deadline, plus 1 s for the failing run to see its marker and 10 tiny handlers.
        assert stalled <= deadline + 1, stalled
        assert len(worker.marker_lines("fails_later", failing)) == 1  # held: not run again
    finally:
        private_node.ctl("set_vm_memory_high_watermark", "0.4")
        worker.cleanup()


def test_dead_letters_sent_twice_under_a_memory_alarm_are_listed_once(
    private_node: Any, private_topology: Topology, tmp_path: Any, record_property: Any
) -> None:
    topology = private_topology
    worker = WorkerProcess(topology, tmp_path, ["fails_later"], TEST_PUBLISH_TIMEOUT=str(DEADLINE))
    try:
        worker.start(*POOLS["prefork"])
        queue = worker.queue("fails_later")
        ids = [str(uuid.uuid4()) for _ in range(4)]
        for event_id in ids:
            body = json.dumps(envelope("probe.fail.later", id=event_id)).encode()
            publish(topology, body, routing_key="probe.fail.later")
        wait_for(lambda: sum(bool(worker.marker_lines("fails_later", i)) for i in ids) >= 2)
        # The broker blocks every publisher: the handlers now fail, and their dead letters
        # wait in the broker's socket buffer, unconfirmed; the deliveries are requeued.
        private_node.ctl("set_vm_memory_high_watermark", "absolute", "1")
        (worker.markers / "go").touch()
        # 60 s: once, on a loaded machine, the first hold took longer than 30 s.
        wait_for(lambda: "holding the queue" in worker.log(), timeout=60)
        time.sleep(2 * DEADLINE)
        private_node.ctl("set_vm_memory_high_watermark", "0.4")
        dlq = queue + ".dlq"
        wait_for(lambda: topology.queue_depth(queue) == 0, timeout=HOLD_FIRST_SECONDS * 4)
        wait_for(lambda: topology.queue_depth(dlq) >= len(ids), timeout=30)
        depth = settled_depth(topology, dlq)  # late copies of blocked dead letters included
        record_property("dead_letters", depth)
        assert depth > len(ids)  # the blocked ones arrived as well: some are copies
        listing = json.loads(cli(worker, "dlq", "list", "--messages", "--json").stdout)
        [row] = listing
        assert row["depth"] == depth
        assert sorted(m["event_id"] for m in row["messages"]) == sorted(ids)  # once each
        assert sum(m["copies"] for m in row["messages"]) == depth
        copies = {m["event_id"]: m["copies"] for m in row["messages"]}
        assert all(m["attempts"] == 1 for m in row["messages"])
        # A replay sends each event back once and removes its copies.
        out = json.loads(cli(worker, "dlq", "replay", "--json").stdout)
        assert sorted(m["event_id"] for m in out["replayed"]) == sorted(ids)
        # Each fails again, now with a broker that confirms: one dead letter each, no copies.
        wait_for(lambda: topology.queue_depth(dlq) == len(ids), timeout=30)
        time.sleep(1)
        listing = json.loads(cli(worker, "dlq", "list", "--messages", "--json").stdout)
        assert [m["copies"] for m in listing[0]["messages"]] == [1] * len(ids)
        # Every run left exactly one dead letter: the copies, then the one after the replay.
        runs = {i: len(worker.marker_lines("fails_later", i)) for i in ids}
        assert runs == {i: copies[i] + 1 for i in ids}
    finally:
        worker.cleanup()
