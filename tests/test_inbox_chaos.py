"""Idempotent handlers under chaos, in a real `celery worker` with the real PostgreSQL (#15).

1,000 events to two idempotent handlers, 20% of them published twice, a DLQ replay of events
already handled and three SIGKILLs of the worker mid-handler: each handler's side effect is
committed exactly once per event. The side-effect table has no unique key on the event, so a
second run of an event would show as a second row.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from kombu import Connection

from celery_domain_events import DomainEvents, emit, transmit
from celery_domain_events.consuming.delivery import task_id_for
from celery_domain_events.inbox import DUPLICATE
from celery_domain_events.wire import envelope
from celery_domain_events.wire.dead_letter import FailureReason, dead_letter_message

from .conftest import Topology, WorkerProcess, wait_for
from .test_cli import cli

pytestmark = [pytest.mark.rabbitmq, pytest.mark.worker]

Make = Callable[..., WorkerProcess]
HANDLERS = ("inbox_a", "inbox_b")
EVENTS = 1000
TWICE = 200  # 20% of the events are published a second time, with the same id
KILLS = 3
REPLAYED = 25  # dead-letter copies of handled events put into inbox_a's DLQ, then replayed
SKIPPED = "already handled it"


def side_effects(engine: Any, table: str) -> dict[tuple[str, str], int]:
    """Rows per (handler, event id) in the side-effect table."""
    with engine.connect() as conn:
        result = conn.execute(
            sa.text(f"SELECT handler, event_id, count(*) FROM {table} GROUP BY 1, 2")
        )
        return {(h, e): n for h, e, n in result}


def in_flight(engine: Any, table: str) -> int:
    """Transactions that wrote to ``table`` and have not ended: handlers mid-run."""
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_locks l JOIN pg_class c ON l.relation = c.oid "
                    "WHERE c.relname = :t AND l.mode = 'RowExclusiveLock' AND l.granted"
                ),
                {"t": table},
            ).scalar_one()
        )


def count(engine: Any, table: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())


@pytest.mark.slow
def test_each_handler_commits_each_event_once_through_duplicates_replays_and_kills(
    topology: Topology,
    worker_process: Make,
    inbox_tables: dict[str, str],
    engine: Any,
    record_property: Any,
) -> None:
    started = time.monotonic()
    worker = worker_process(list(HANDLERS), PYTHONUNBUFFERED="1", **inbox_tables).start()
    rows, inbox = inbox_tables["TEST_INBOX_ROWS"], inbox_tables["TEST_INBOX_TABLE"]
    publisher = topology.app("pub")
    events = [emit("probe.inbox", {"n": i}) for i in range(EVENTS)]
    transmit(publisher)
    # 20% again, same ids, shuffled among each other: some duplicates reach the two pool
    # processes at once (the database's key decides), others come long after the first.
    rng = random.Random(15)
    again = rng.sample(events, TWICE)
    for event in again:
        emit(event)
    transmit(publisher)

    # Three SIGKILLs of the whole worker (main process and pool) while handlers run, each
    # followed by a restart: the unacked deliveries come back to the next worker.
    total = EVENTS * len(HANDLERS)
    for k in range(1, KILLS + 1):
        wait_for(lambda k=k: count(engine, rows) >= total * k // (KILLS + 1), timeout=60)
        wait_for(lambda: in_flight(engine, rows) > 0, timeout=10, interval=0.001)
        worker.kill()
        worker.start()
    wait_for(lambda: count(engine, rows) >= total, timeout=60)
    for handler in HANDLERS:
        wait_for(lambda h=handler: topology.queue_depth(worker.queue(h)) == 0, timeout=30)

    # A DLQ replay of events already handled: dead letters built by the library's own code,
    # then `domain-events dlq replay` sends them back; each is skipped as a duplicate.
    replayed = rng.sample(events, REPLAYED)
    queue = worker.queue("inbox_a")
    ext = DomainEvents.of(publisher)
    letters = [
        dead_letter_message(
            body=envelope.encode(event, ext.settings.service),
            queue=queue,
            handler="inbox_a",
            reason=FailureReason.REJECTED,
            exc=RuntimeError("chaos: a dead letter of an event already handled"),
            exchange=topology.exchange,
            routing_key="probe.inbox",
            properties={"message_id": str(event.event_id), "type": "probe.inbox"},
        )
        for event in replayed
    ]
    ext.publish(letters)
    assert topology.queue_depth(queue + ".dlq") == REPLAYED
    before_replay = len(worker.log())
    out = json.loads(cli(worker, "dlq", "replay", "--json").stdout)
    assert sorted(m["event_id"] for m in out["replayed"]) == sorted(
        str(e.event_id) for e in replayed
    )

    def replay_skipped() -> list[str]:
        log = worker.log()[before_replay:]
        return [str(e.event_id) for e in replayed if f"id={e.event_id}: inbox_a {SKIPPED}" in log]

    wait_for(lambda: len(replay_skipped()) == REPLAYED, timeout=30)
    wait_for(lambda: topology.queue_depth(queue) == 0, timeout=30)
    time.sleep(0.5)  # anything still running would now show in the tables

    # Every event once per handler: no duplicate, nothing lost.
    ids = {str(e.event_id) for e in events}
    effects = side_effects(engine, rows)
    for handler in HANDLERS:
        mine = {e: n for (h, e), n in effects.items() if h == handler}
        assert set(mine) == ids, f"{handler}: {len(ids - set(mine))} lost"
        assert sum(mine.values()) == EVENTS, f"{handler}: {sum(mine.values()) - EVENTS} extra"
        with engine.connect() as conn:
            inbox_rows = conn.execute(
                sa.text(f"SELECT count(*) FROM {inbox} WHERE handler = :h"), {"h": handler}
            ).scalar_one()
        assert inbox_rows == EVENTS
        assert topology.queue_depth(worker.queue(handler) + ".dlq") == 0

    # The kills landed mid-handler: runs that began were rolled back and ran again.
    runs = (worker.markers / "inbox_started").read_text().splitlines()
    assert len(runs) > total, "no SIGKILL interrupted a handler"
    # Each handler got 1,200 deliveries (+ replays, + redeliveries of committed runs whose
    # ack a kill prevented): all but one per event were skipped, and the log says so.
    log = worker.log()
    skipped = log.count(SKIPPED)
    assert skipped >= TWICE * len(HANDLERS) + REPLAYED
    assert log.count(" ready.") == KILLS + 1
    record_property("duplicates_skipped", skipped)
    record_property("runs_rolled_back_by_kills", len(runs) - total)
    record_property("seconds", round(time.monotonic() - started, 1))


def _task_events(app: Celery, hostname: str, into: list[dict[str, Any]]) -> Callable[[], None]:
    """Capture this worker's task-succeeded events in a thread; return what stops it."""
    ready = threading.Event()
    conn = Connection(app.conf.broker_url)
    receiver = app.events.Receiver(
        conn,
        handlers={
            "task-succeeded": lambda e: into.append(e) if e.get("hostname") == hostname else None
        },
        routing_key="task.#",  # the worker buffers task events, sent as task.multi
    )
    receiver.on_consume_ready = lambda *a, **kw: ready.set()  # type: ignore[method-assign]

    def capture() -> None:
        receiver.capture(limit=None, timeout=None, wakeup=False)

    thread = threading.Thread(target=capture, daemon=True)
    thread.start()
    assert ready.wait(15), "the event receiver did not start"

    def stop() -> None:
        receiver.should_stop = True
        thread.join(10)
        conn.release()

    return stop


@pytest.mark.matrix
def test_a_duplicate_delivery_succeeds_with_the_result_duplicate(
    topology: Topology, worker_process: Make, inbox_tables: dict[str, str]
) -> None:
    worker = worker_process(["inbox_a"], **inbox_tables)
    publisher = topology.app("pub")
    worker.start()
    # The worker's task events (celeryev exchange), as Flower receives them: its own only.
    received: list[dict[str, Any]] = []
    listener = Celery("listener", broker=topology.broker_url, set_as_current=False)
    stop = _task_events(listener, worker.hostname, received)
    try:
        event = emit("probe.inbox", {"n": 1})
        transmit(publisher)
        task_id = task_id_for(str(event.event_id), "inbox_a")
        wait_for(lambda: any(e["uuid"] == task_id for e in received), timeout=30)
        emit(event)  # the same event id again
        transmit(publisher)
        wait_for(lambda: len([e for e in received if e["uuid"] == task_id]) == 2, timeout=30)
    finally:
        stop()
    results = [e["result"] for e in received if e["uuid"] == task_id]
    assert results == ["None", repr(DUPLICATE)]  # what Flower shows: 'duplicate'
    assert f"id={event.event_id}: inbox_a {SKIPPED}" in worker.log()
