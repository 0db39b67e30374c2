"""``transmit_async`` and ``scope_async``: publishing from asyncio with confirms, never blocking.

Each test runs its own event loop (``asyncio.run``) against the real broker, or against one
that is down, refuses us, or stops mid-batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from celery import Celery
from kombu import Connection

from celery_domain_events import (
    DomainEvents,
    PublishError,
    emit,
    scope_async,
    transmit,
    transmit_async,
)
from celery_domain_events.publishing.api import buffered, discard

from .conftest import Topology, drain, probe
from .test_publish_failures import DEADLINE, EVENTS, RESEND_SECONDS, app_for, copies_by_id

pytestmark = [pytest.mark.rabbitmq]


def run(main: Callable[[], Awaitable[Any]], app: Celery | None = None) -> Any:
    """Run ``main()`` on a new event loop, closing the app's asyncio connection at the end."""

    async def wrapper() -> Any:
        try:
            return await main()
        finally:
            if app is not None:
                await DomainEvents.of(app).aclose()

    return asyncio.run(wrapper())


async def max_loop_lag(during: Awaitable[Any], tick: float = 0.005) -> tuple[Any, float]:
    """Await ``during`` while measuring how late a ``tick``-second sleep wakes up, at most."""
    lag = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal lag
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(tick)
            lag = max(lag, time.perf_counter() - before - tick)

    ticking = asyncio.ensure_future(ticker())
    try:
        result = await asyncio.gather(during, return_exceptions=True)
    finally:
        done.set()
        await ticking
    return result[0], lag


@pytest.mark.matrix
def test_transmit_async_publishes_in_emit_order_once_confirmed(topology: Topology) -> None:
    app = topology.app()
    queue = probe(topology, app)

    async def main() -> list[Any]:
        async with scope_async(app):
            for n in range(200):
                emit("test.aio.order", {"n": n})
        assert buffered() == []
        return await transmit_async(app)  # nothing left: a no-op

    assert run(main, app) == []
    assert [json.loads(m.body)["data"]["n"] for m in drain(topology.broker_url, queue)] == list(
        range(200)
    )


def test_scope_async_discards_on_error_and_keeps_tasks_apart(topology: Topology) -> None:
    app = topology.app()
    queue = probe(topology, app)

    async def request(n: int, fail: bool) -> None:
        async with scope_async(app):
            emit("test.aio.request", {"n": n})
            await asyncio.sleep(0.01)  # the other requests run meanwhile
            if fail:
                raise ValueError("rolled back")

    async def main() -> list[Any]:
        return await asyncio.gather(
            *(request(n, fail=n % 2 == 1) for n in range(10)), return_exceptions=True
        )

    outcomes = run(main, app)
    assert [type(o).__name__ for o in outcomes] == ["NoneType", "ValueError"] * 5
    published = sorted(json.loads(m.body)["data"]["n"] for m in drain(topology.broker_url, queue))
    assert published == [0, 2, 4, 6, 8]  # each scope sent only its own event, on success only


def test_one_connection_per_event_loop_is_reused(topology: Topology) -> None:
    app = topology.app()
    probe(topology, app)
    transport = None

    async def main() -> tuple[Any, Any]:
        nonlocal transport
        links = []
        for n in range(3):
            emit("test.aio.reuse", {"n": n})
            await transmit_async(app)
            transport = DomainEvents.of(app)._aio_broker
            links.append(transport._link().connection)
        assert links[0] is links[1] is links[2]
        return links[0], transport

    connection, transport = run(main, app)
    assert connection.is_closed  # aclose() closed it
    assert len(transport._links) == 0


def test_unreachable_broker_fails_by_the_deadline_without_blocking_the_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = app_for("amqp://guest:s3cretpw@127.0.0.1:5999//", domain_events_publish_timeout=3)

    async def main() -> tuple[Any, float, float, list[Any]]:
        event = emit("test.aio.unreachable", {})
        started = time.monotonic()
        error, lag = await max_loop_lag(transmit_async(app))
        elapsed = time.monotonic() - started
        assert error.events == (event,)
        left = buffered()
        discard()
        return error, elapsed, lag, left

    with caplog.at_level(logging.DEBUG):
        error, elapsed, lag, left = run(main, app)
    assert isinstance(error, PublishError)
    assert 2 <= elapsed <= 3 + 1, elapsed  # retried until the deadline, and no longer
    assert lag < 0.25, lag  # the loop kept serving other tasks (a blocked one lags seconds)
    assert len(left) == 1  # still buffered for the caller to retry or store
    assert "127.0.0.1:5999" in str(error)
    assert "s3cretpw" not in str(error)
    assert "s3cretpw" not in caplog.text


def test_refused_credentials_fail_at_once(
    broker_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = app_for(broker_url.replace("guest:guest@", "guest:wr0ngpw@"))

    async def main() -> tuple[Any, float]:
        emit("test.aio.auth", {})
        started = time.monotonic()
        try:
            await transmit_async(app)
        except PublishError as exc:
            discard()
            return exc, time.monotonic() - started
        raise AssertionError("published with wrong credentials")

    with caplog.at_level(logging.DEBUG):
        error, elapsed = run(main, app)
    assert elapsed < 1
    assert "ACCESS_REFUSED" in str(error)
    assert "wr0ngpw" not in str(error)
    assert "wr0ngpw" not in caplog.text


def test_an_exchange_declared_with_other_arguments_fails_at_once(topology: Topology) -> None:
    with Connection(topology.broker_url) as conn:  # no alternate-exchange: not ours
        conn.default_channel.exchange_declare(topology.exchange, "topic", durable=True)
    app = topology.app()

    async def main() -> float:
        emit("test.aio.conflict", {})
        started = time.monotonic()
        with pytest.raises(PublishError, match="PRECONDITION_FAILED"):
            await transmit_async(app)
        discard()
        return time.monotonic() - started

    assert run(main, app) < 1
    emit("test.sync.conflict", {})
    started = time.monotonic()
    with pytest.raises(PublishError, match="PRECONDITION_FAILED"):
        transmit(app)  # the sync path says the same, as fast
    discard()
    assert time.monotonic() - started < 1


async def resend_until_sent_async(send: Callable[[], Awaitable[Any]], node: Any) -> None:
    """Await ``send()`` until it raises no ``PublishError``, for up to RESEND_SECONDS."""
    deadline = time.monotonic() + RESEND_SECONDS
    while True:
        try:
            await send()
            return
        except PublishError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"re-transmit failed: {exc}\n{node.log_tail()}") from exc
            await asyncio.sleep(0.5)


@pytest.mark.slow
def test_a_broker_stopped_mid_batch_loses_nothing_and_resends_only_the_unconfirmed(
    private_node: Any, record_property: Any
) -> None:
    topology = Topology(private_node.url)
    app = topology.app()
    probe_queue = probe(topology, app)

    async def stop_when_some_are_confirmed() -> float:
        with Connection(private_node.url) as conn:
            conn.connect()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                _, count, _ = conn.default_channel.queue_declare(probe_queue, passive=True)
                if count >= 2_000:
                    break
                await asyncio.sleep(0.01)
        stopping = time.monotonic()
        await asyncio.to_thread(private_node.stop_app)
        return time.monotonic() - stopping  # how long rabbitmqctl took (seconds on a busy box)

    async def main() -> tuple[list[Any], Any, float, list[Any]]:
        events = [emit("test.aio.tick", {"n": n}) for n in range(EVENTS)]
        started = time.monotonic()
        stopper = asyncio.ensure_future(stop_when_some_are_confirmed())
        try:
            await transmit_async(app)
        except PublishError as exc:
            error: Any = exc
        else:
            error = None
        elapsed = time.monotonic() - started
        stopping = await stopper
        left = buffered()
        discard()
        return events, error, elapsed - stopping, left

    events, error, elapsed, left = run(main, app)
    assert isinstance(error, PublishError)
    # Not counting the time rabbitmqctl took to stop the node: the reconnect attempts after
    # the loss run under the deadline (a hung transmit would take minutes).
    assert elapsed <= DEADLINE + 5
    unconfirmed = list(error.events)
    assert left == unconfirmed  # exactly the unconfirmed ones, in order
    assert 0 < len(unconfirmed) < EVENTS
    record_property("unconfirmed", len(unconfirmed))

    private_node.start_app()
    private_node.wait_for_queue(probe_queue)  # ~30,000 persistent messages to recover

    async def again() -> None:
        for event in unconfirmed:
            emit(event)
        # Sends only what RabbitMQ had not confirmed; a slow restarted node: see the sync test.
        await resend_until_sent_async(lambda: transmit_async(app), private_node)

    run(again, app)
    confirmed_ids = {e.event_id for e in events} - {e.event_id for e in unconfirmed}
    seen = copies_by_id(private_node.url, probe_queue)
    assert set(seen) == {e.event_id for e in events}  # 0 lost
    assert [i for i in confirmed_ids if seen[i] > 1] == []  # 0 confirmed events sent twice


def test_a_failover_list_is_tried_in_turn(
    topology: Topology, caplog: pytest.LogCaptureFixture
) -> None:
    dead = topology.broker_url.replace("127.0.0.1:5672", "127.0.0.1:5999")
    assert dead != topology.broker_url
    app = topology.app()
    app.conf.broker_url = f"{dead};{topology.broker_url}"
    queue = probe(topology, app)

    async def main() -> None:
        emit("test.aio.failover", {})
        await transmit_async(app)

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="celery_domain_events.amqp.aio"):
        run(main, app)
    assert time.monotonic() - started < 3
    assert len(drain(topology.broker_url, queue)) == 1
    failed = [r.getMessage() for r in caplog.records if r.name == "celery_domain_events.amqp.aio"]
    assert failed, caplog.text
    assert all(m.startswith("Publishing to amqp://guest:**@127.0.0.1:5999/ failed") for m in failed)


def test_an_unknown_vhost_fails_at_once(broker_url: str) -> None:
    app = app_for(broker_url.rstrip("/") + "/no-such-vhost")

    async def main() -> float:
        emit("test.aio.vhost", {})
        started = time.monotonic()
        with pytest.raises(
            PublishError, match="no-such-vhost: the broker refused to open the vhost"
        ):
            await transmit_async(app)
        discard()
        return time.monotonic() - started

    assert run(main, app) < 1


def test_a_lost_connection_is_replaced_on_the_next_publish(topology: Topology) -> None:
    app = topology.app()
    queue = probe(topology, app)

    async def main() -> None:
        emit("test.aio.lost", {"n": 1})
        await transmit_async(app)
        link = DomainEvents.of(app)._aio_broker._link()
        await link.connection.close()  # as a broker restart or a network cut would
        emit("test.aio.lost", {"n": 2})
        await transmit_async(app)

    run(main, app)
    assert [json.loads(m.body)["data"]["n"] for m in drain(topology.broker_url, queue)] == [1, 2]
