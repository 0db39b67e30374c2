"""Batch handlers: one Celery task per batch, each event settled on its own (#16)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
from celery import Celery

from celery_domain_events import (
    Batch,
    BatchItemsFailed,
    ConfigurationError,
    DomainEvent,
    DomainEvents,
    DomainEventsError,
    EventDefinitionError,
    GenericEvent,
    RetryPolicy,
    domain_event_handler,
    emit,
    transmit,
)
from celery_domain_events.batching import MAX_BATCH_SIZE, MAX_BATCH_WAIT
from celery_domain_events.registry import HandlerRegistry
from celery_domain_events.testing import capture_events
from celery_domain_events.wire.dead_letter import letter_from

from .conftest import Topology, WorkerProcess, drain, wait_for
from .test_untrusted import POOLS


class Item(DomainEvent):
    event_name: ClassVar[str] = "batchtest.item"
    n: int


# ----------------------------------------------------------------------------- definition


def test_batch_policy_bounds() -> None:
    assert Batch.of(10) == Batch(max_size=10, max_wait=1.0)
    for bad in (0, MAX_BATCH_SIZE + 1):
        with pytest.raises(ConfigurationError, match="max_size"):
            Batch(max_size=bad)
    for wait in (0, -1, MAX_BATCH_WAIT + 1):
        with pytest.raises(ConfigurationError, match="consumer_timeout"):
            Batch(max_wait=wait)
    with pytest.raises(ConfigurationError, match="batch="):
        Batch.of(1.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        Batch.of(True)  # type: ignore[arg-type]


def test_a_batch_handler_takes_a_list_of_events_checked_at_decoration() -> None:
    registry = HandlerRegistry()
    with pytest.raises(EventDefinitionError, match="list of events"):

        @domain_event_handler("batchtest.item", batch=10, registry=registry)
        def one(event: Item) -> None: ...

    with pytest.raises(EventDefinitionError, match="list of events"):

        @domain_event_handler("batchtest.item", batch=10, registry=registry)
        def ints(events: list[int]) -> None: ...

    with pytest.raises(ConfigurationError, match="idempotent"):
        domain_event_handler("batchtest.item", batch=10, idempotent=object())  # type: ignore[arg-type]

    @domain_event_handler("batchtest.item", batch=10, registry=registry)
    def fine(events: list[Item]) -> None: ...

    assert fine.spec.batch == Batch(max_size=10)
    assert fine.spec.event_versions() == {"batchtest.item": frozenset({1})}


def test_batch_items_failed_names_events_by_id_or_event() -> None:
    a, b = Item(n=1), Item(n=2)
    error = BatchItemsFailed([(a, ValueError("a")), (b.event_id, KeyError("b"))])
    assert isinstance(error, DomainEventsError)
    assert set(error.failures) == {a.event_id, b.event_id}
    assert str(error) == "2 event(s) of the batch failed"
    with pytest.raises(TypeError):
        BatchItemsFailed([(object(), ValueError())])


# ----------------------------------------------------------------------------- in-process


def test_in_process_a_batch_handler_gets_the_events_as_a_list_and_fails_some_alone(
    topology: Topology,
) -> None:
    registry = HandlerRegistry()
    batches: list[list[int]] = []
    peer: list[int] = []

    @domain_event_handler(
        "batchtest.item",
        batch=Batch(max_size=4),
        retry=RetryPolicy(max_retries=2, backoff=False),
        registry=registry,
    )
    def sink(events: list[Item]) -> None:
        batches.append([event.n for event in events])
        emit("batchtest.seen", {"count": len(events)})
        failing = [event for event in events if event.n == 3]
        if failing:
            raise BatchItemsFailed((event, RuntimeError("three")) for event in failing)

    @domain_event_handler("batchtest.item", registry=registry)
    def one_by_one(event: Item) -> None:
        peer.append(event.n)

    app = topology.app("inproc", registry=registry)
    with capture_events(app, fail_fast=False) as events:
        for n in range(6):
            emit(Item(n=n))
        transmit(app)
        events.join()
    # 6 events: a batch of 4 and one of 2; n=3 runs twice more alone (in-process retries run
    # at once, as Celery's eager retries do), then is dead-lettered.
    assert batches == [[0, 1, 2, 3], [3], [3], [4, 5]]
    assert sorted(e.n for e in events.handled(sink)) == [0, 1, 2, 4, 5]  # type: ignore[attr-defined]
    assert sorted(peer) == list(range(6))
    [letter] = events.dead_letters
    assert letter.handler == "sink"
    assert letter.attempts == 3
    assert letter.event is not None
    assert letter.event.n == 3
    # A partial failure still publishes what the run emitted.
    assert [e.data["count"] for e in events.published if e.event_name == "batchtest.seen"] == [  # type: ignore[union-attr]
        4,
        1,
        1,
        2,
    ]


def test_in_process_an_exception_fails_every_event_of_the_batch(topology: Topology) -> None:
    registry = HandlerRegistry()

    @domain_event_handler("batchtest.item", batch=10, retry=None, registry=registry)
    def broken(events: list[Item]) -> None:
        emit("batchtest.never", {})
        raise ValueError("the sink is down")

    app = topology.app("inproc2", registry=registry)
    with capture_events(app, fail_fast=False) as events:
        for n in range(3):
            emit(Item(n=n))
        transmit(app)
        events.join()
    assert sorted(letter.event.n for letter in events.dead_letters) == [0, 1, 2]  # type: ignore[union-attr]
    assert {letter.reason for letter in events.dead_letters} == {"rejected"}
    assert not [e for e in events.published if e.event_name == "batchtest.never"]
    with capture_events(app) as events:  # fail_fast re-raises the handler's error
        emit(Item(n=1))
        transmit(app)
        with pytest.raises(ValueError, match="sink is down"):
            events.join()


# ----------------------------------------------------------------------------- real worker


def _batches(worker: WorkerProcess, name: str) -> list[int]:
    return [int(path.read_text().split()[1]) for path in worker.markers.glob(f"{name}_batch-*")]


def _runs(worker: WorkerProcess, name: str, ids: list[str]) -> Counter[str]:
    return Counter({i: len(worker.marker_lines(name, i)) for i in ids})


def _publish(app: Celery, event_type: str, count: int) -> tuple[list[str], dict[str, int]]:
    ids, numbers = [], {}
    for n in range(count):
        event = GenericEvent(event_name=event_type, data={"n": n})
        emit(event)
        ids.append(str(event.event_id))
        numbers[str(event.event_id)] = n
    transmit(app)
    return ids, numbers


@pytest.mark.rabbitmq
@pytest.mark.worker
@pytest.mark.slow
@pytest.mark.parametrize("pool", list(POOLS))
def test_batches_in_a_real_worker_settle_each_event_alone(
    topology: Topology, worker_process: Callable[..., WorkerProcess], pool: str
) -> None:
    worker = worker_process(["batch_sink", "batch_peer"]).start(*POOLS[pool])
    # The default prefetch (4 per process) would cap batches at a few events: raised.
    assert "prefetch raised by 100 for batch handlers" in worker.log()
    publisher = topology.app("pub")
    ids, numbers = _publish(publisher, "batch.item", 300)
    failing = [i for i in ids if numbers[i] % 10 == 7]
    wait_for(lambda: all(worker.marker_lines("batch_peer", i) for i in ids), timeout=60)
    wait_for(lambda: all(len(worker.marker_lines("batch_sink", i)) == 2 for i in failing), 60)
    dlq = worker.queue("batch_sink") + ".dlq"
    wait_for(lambda: topology.queue_depth(dlq) == len(failing), timeout=30)

    sizes = _batches(worker, "batch_sink")
    assert max(sizes) == 50  # full batches, one task each
    assert sum(sizes) == len(ids) + len(failing)  # every event once, plus one retry each
    assert len(sizes) < 300 // 50 + 30  # a handful of partial batches at most
    runs = _runs(worker, "batch_sink", ids)
    assert {i for i in ids if runs[i] != 1} == set(failing)  # the others ran exactly once
    assert all(runs[i] == 2 for i in failing)  # first run and one retry, alone
    assert set(_runs(worker, "batch_peer", ids).values()) == {1}  # retries never reach it
    letters = [letter_from(dlq, m) for m in drain(topology.broker_url, dlq)]
    assert sorted(letter.event_id for letter in letters) == sorted(failing)
    assert {letter.reason for letter in letters} == {"retries-exhausted"}
    assert {letter.failure("attempts") for letter in letters} == {2}
    assert all("fails" in str(letter.failure("message", "")) for letter in letters)
    assert topology.queue_depth(worker.queue("batch_sink")) == 0


@pytest.mark.rabbitmq
@pytest.mark.worker
@pytest.mark.slow
@pytest.mark.parametrize("pool", list(POOLS))
def test_a_batch_is_flushed_after_max_wait(
    topology: Topology, worker_process: Callable[..., WorkerProcess], pool: str
) -> None:
    worker = worker_process(["batch_sink"]).start(*POOLS[pool])
    publisher = topology.app("pub")
    started = time.monotonic()
    ids, _ = _publish(publisher, "batch.item", 3)
    wait_for(lambda: all(worker.marker_lines("batch_sink", i) for i in ids), timeout=10)
    assert time.monotonic() - started < 5  # max_wait 0.5 s, not "when 50 are there"
    assert _batches(worker, "batch_sink") == [3]


@pytest.mark.rabbitmq
@pytest.mark.worker
@pytest.mark.slow
def test_a_worker_killed_mid_batch_gets_the_whole_batch_again(
    topology: Topology, worker_process: Callable[..., WorkerProcess]
) -> None:
    worker = worker_process(["batch_slow"])
    worker.start("-P", "prefork", "-c", "1")
    publisher = topology.app("pub")
    ids, _ = _publish(publisher, "batch.slow", 20)
    # Every event is in a running batch (one, or a few on a slow machine), none acked yet.
    wait_for(lambda: all(worker.marker_lines("batch_slow", i) for i in ids), timeout=15)
    worker.kill()  # SIGKILL while the batch sleeps: nothing was acked
    queue = worker.queue("batch_slow")
    wait_for(lambda: topology.queue_depth(queue) == 20, timeout=15)
    worker.start("-P", "prefork", "-c", "1")
    wait_for(lambda: all(len(worker.marker_lines("batch_slow", i)) == 2 for i in ids), 30)
    wait_for(lambda: topology.queue_depth(queue) == 0, timeout=10)


@pytest.mark.rabbitmq
@pytest.mark.worker
@pytest.mark.slow
def test_a_pool_process_killed_mid_batch_gets_the_whole_batch_again(
    topology: Topology, worker_process: Callable[..., WorkerProcess]
) -> None:
    # reject_on_worker_lost: Celery rejects the batch's task message with requeue, and every
    # delivery of the batch goes back to the queue.
    worker = worker_process(["batch_crash_once"]).start("-P", "prefork", "-c", "1")
    ids, _ = _publish(topology.app("pub"), "batch.crash", 10)
    # Every event ran twice: in the batch that crashed and in its redelivery, none lost.
    wait_for(lambda: all(len(worker.marker_lines("batch_crash_once", i)) == 2 for i in ids), 30)
    assert sum(_batches(worker, "batch_crash_once")) == 20
    queue = worker.queue("batch_crash_once")
    wait_for(lambda: topology.queue_depth(queue) == 0, timeout=10)
    assert topology.queue_depth(queue + ".dlq") == 0


def test_in_process_an_async_batch_handler_runs_on_the_loop(topology: Topology) -> None:
    registry = HandlerRegistry()
    seen: list[int] = []

    @domain_event_handler("batchtest.item", batch=5, retry=None, registry=registry)
    async def async_sink(events: list[Item]) -> None:
        await asyncio.sleep(0)
        seen.extend(event.n for event in events)

    app = topology.app("inproc3", registry=registry)
    with capture_events(app) as events:
        for n in range(7):
            emit(Item(n=n))
        transmit(app)
        events.join()
    assert seen == list(range(7))
    assert len(events.handled(async_sink)) == 7


def test_flower_shows_a_batch_by_size_names_and_ids_never_data(tmp_path: Path) -> None:
    from kombu.message import Message

    from celery_domain_events.consuming.delivery import to_batch_task_message
    from celery_domain_events.registry import HandlerSpec
    from celery_domain_events.wire.inbound import Inbound

    spec = HandlerSpec(name="sink", patterns=("x",), fn=lambda events: None, batch=Batch(5))
    deliveries: list[tuple[Any, Inbound]] = []
    for n in range(3):
        message = Message(body=b"{}", delivery_tag=n + 1, channel=None)
        inbound = Inbound(
            text='{"secret": 1}',
            event_id=f"id-{n}",
            event_type="user.created",
            version=1,
            source="s",
            retries=0,
            due=None,
            exchange="x",
            routing_key="user.created",
            headers={},
        )
        deliveries.append((message, inbound))
    task_message = to_batch_task_message(deliveries, spec, "svc.sink")
    shown = task_message.headers["kwargsrepr"]
    assert "'batch': 3" in shown
    assert "id-0" in shown
    assert "id-2" in shown
    assert "secret" not in shown
    assert task_message.headers["task"] == spec.task_name


def test_in_process_unknown_ids_in_batch_items_failed_fail_the_whole_batch(
    topology: Topology,
) -> None:
    registry = HandlerRegistry()

    @domain_event_handler("batchtest.item", batch=10, retry=None, registry=registry)
    def confused(events: list[Item]) -> None:
        raise BatchItemsFailed({"order-42": ValueError("not an event id")})

    app = topology.app("inproc4", registry=registry)
    with capture_events(app, fail_fast=False) as events:
        for n in range(3):
            emit(Item(n=n))
        transmit(app)
        events.join()
    assert not events.handled(confused)
    assert len(events.dead_letters) == 3  # none acked as done
    assert {letter.failure("exception") for letter in events.dead_letters} == {
        "builtins.RuntimeError"
    }


def test_a_worker_refuses_batches_that_need_a_prefetch_above_amqps_limit(
    topology: Topology,
) -> None:
    from types import SimpleNamespace

    from celery_domain_events.consuming.bootstep import DomainEventsStep

    registry = HandlerRegistry()
    for n in range(4):
        domain_event_handler("batchtest.item", name=f"big{n}", batch=9000, registry=registry)(_sink)
    ext = DomainEvents.of(topology.app("prefetch", registry=registry))
    qos = SimpleNamespace(value=8, increment_eventually=lambda n: None, update=lambda: None)
    step = DomainEventsStep.__new__(DomainEventsStep)
    with pytest.raises(SystemExit, match="65535"):
        step._raise_prefetch(ext, SimpleNamespace(qos=qos))


def _sink(events: list[Item]) -> None: ...
