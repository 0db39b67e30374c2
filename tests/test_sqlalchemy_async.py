"""AsyncSession hooks and the async outbox, against the real PostgreSQL and the real RabbitMQ."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from celery_domain_events import ConfigurationError, DomainEvent, DomainEvents, PublishError
from celery_domain_events.contrib.outbox import Outbox
from celery_domain_events.contrib.sqlalchemy import emit_with, install

from .conftest import DB_URL, Topology, drain, probe
from .test_publish_failures import app_for
from .test_transmit_async import max_loop_lag

pytestmark = [pytest.mark.rabbitmq]

ROOT = Path(__file__).resolve().parent.parent


class OrderPlaced(DomainEvent):
    event_name: ClassVar[str] = "test.asa.order_placed"
    order_id: int


@pytest.fixture
def orders(topology: Topology, engine: sa.Engine) -> Iterator[sa.Table]:
    """A business table of this test only."""
    table = sa.Table(
        f"orders_{topology.uid}", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True)
    )
    table.create(engine)
    yield table
    table.drop(engine, checkfirst=True)


def run(main: Any, app: Any) -> Any:
    async def wrapper() -> Any:
        engine = create_async_engine(DB_URL)
        try:
            return await main(engine)
        finally:
            await engine.dispose()
            await DomainEvents.of(app).aclose()

    return asyncio.run(wrapper())


def published(topology: Topology, queue: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        (m.delivery_info["routing_key"], json.loads(m.body)["data"])
        for m in drain(topology.broker_url, queue)
    ]


@pytest.mark.matrix
def test_an_async_commit_publishes_and_a_rollback_or_savepoint_rollback_drops(
    topology: Topology, orders: sa.Table
) -> None:
    app = topology.app()
    queue = probe(topology, app)

    async def main(engine: Any) -> list[int]:
        maker = async_sessionmaker(engine)
        install(maker, app)
        async with maker.begin() as session:
            await session.execute(sa.insert(orders).values(id=1))
            emit_with(session, OrderPlaced(order_id=1))
            async with session.begin_nested():  # released: its event joins the outer one
                emit_with(session, OrderPlaced(order_id=2))
            nested = await session.begin_nested()
            emit_with(session, OrderPlaced(order_id=3))
            await nested.rollback()  # a rolled-back SAVEPOINT drops its own event

        async def refused() -> None:
            async with maker.begin() as session:
                emit_with(session, OrderPlaced(order_id=4))
                raise ValueError("refused")

        with pytest.raises(ValueError, match="refused"):
            await refused()
        async with maker() as session:  # no transaction yet: emit_with begins one
            emit_with(session, "test.asa.untyped", {"n": 5})
            await session.commit()
        async with maker() as session:
            return list((await session.scalars(sa.select(orders.c.id))).all())

    assert run(main, app) == [1]
    assert published(topology, queue) == [
        ("test.asa.order_placed", {"order_id": 1}),
        ("test.asa.order_placed", {"order_id": 2}),
        ("test.asa.untyped", {"n": 5}),
    ]


def test_an_async_session_or_its_class_can_be_installed_and_others_are_refused(
    topology: Topology,
) -> None:
    app = topology.app()
    queue = probe(topology, app)

    class Sessions(AsyncSession):
        pass

    async def main(engine: Any) -> None:
        async with AsyncSession(engine) as session:
            with pytest.raises(ConfigurationError, match="no domain events hooks"):
                emit_with(session, OrderPlaced(order_id=1))
            install(session, app)
            emit_with(session, OrderPlaced(order_id=2))
            await session.commit()
        install(Sessions, app)
        async with Sessions(engine) as session:
            emit_with(session, OrderPlaced(order_id=3))
            await session.commit()

    run(main, app)
    assert [data["order_id"] for _, data in published(topology, queue)] == [2, 3]


def test_a_failing_publish_after_commit_keeps_the_loop_running_and_raises_after_the_commit(
    topology: Topology, orders: sa.Table
) -> None:
    app = app_for("amqp://guest:guest@127.0.0.1:5999//", domain_events_publish_timeout=2)

    async def main(engine: Any) -> tuple[Any, float, list[int]]:
        maker = async_sessionmaker(engine)
        install(maker, app)

        async def order() -> None:
            async with maker.begin() as session:
                await session.execute(sa.insert(orders).values(id=7))
                emit_with(session, OrderPlaced(order_id=7))

        error, lag = await max_loop_lag(order())
        async with maker() as session:
            return error, lag, list((await session.scalars(sa.select(orders.c.id))).all())

    error, lag, rows = run(main, app)
    assert isinstance(error, PublishError)
    assert [e.order_id for e in error.events] == [7]  # the caller can still store them
    assert rows == [7]  # committed first
    # A blocked loop would lag by the 2 s publish deadline; on a loaded machine scheduling alone
    # can delay a tick by tens of milliseconds.
    assert lag < 0.25, lag


@pytest.fixture
def outbox_table(topology: Topology, engine: sa.Engine) -> Iterator[str]:
    name = f"outbox_{topology.uid}"
    yield name
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP TABLE IF EXISTS "{name}"'))


def test_the_async_outbox_writes_in_the_transaction_and_relays_with_confirms(
    topology: Topology, orders: sa.Table, outbox_table: str, engine: sa.Engine
) -> None:
    app = topology.app()
    queue = probe(topology, app)
    metadata = sa.MetaData()
    outbox = Outbox(DomainEvents.of(app), metadata, table_name=outbox_table)
    metadata.create_all(engine)

    async def main(async_engine: Any) -> tuple[int, int]:
        maker = async_sessionmaker(async_engine)
        async with maker.begin() as session:
            await session.execute(sa.insert(orders).values(id=1))
            await outbox.add_async(session, OrderPlaced(order_id=1))

        async def refused() -> None:
            async with maker.begin() as session:
                await outbox.add_async(session, OrderPlaced(order_id=2))
                raise ValueError("refused")

        with pytest.raises(ValueError, match="refused"):
            await refused()
        async with async_engine.begin() as conn:
            await outbox.add_async(conn, "test.asa.untyped", {"n": 3})
        relayed = await outbox.relay_once_async(async_engine)
        return relayed, await outbox.relay_once_async(async_engine)

    assert run(main, app) == (2, 0)
    assert [data for _, data in published(topology, queue)] == [{"order_id": 1}, {"n": 3}]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["after-commit", "in-relay"])
def test_a_crash_between_commit_and_publish_loses_nothing(
    topology: Topology, orders: sa.Table, outbox_table: str, engine: sa.Engine, mode: str
) -> None:
    app = topology.app()
    queue = probe(topology, app)
    metadata = sa.MetaData()
    outbox = Outbox(DomainEvents.of(app), metadata, table_name=outbox_table)
    metadata.create_all(engine)
    env = {
        **os.environ,
        "TEST_BROKER_URL": topology.broker_url,
        "TEST_EXCHANGE": topology.exchange,
        "TEST_UNROUTED": topology.unrouted,
        "TEST_OUTBOX_TABLE": outbox_table,
        "TEST_ORDERS_TABLE": orders.name,
        "TEST_DB_URL": DB_URL,
        "TEST_EVENTS": "50",
    }
    crashed = subprocess.run(
        [sys.executable, "-m", "tests.aio_outbox_crash", mode],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert crashed.returncode == -9, crashed.stdout + crashed.stderr  # SIGKILL
    assert "committed" in crashed.stdout
    before = drain(topology.broker_url, queue)
    assert len(before) == (50 if mode == "in-relay" else 0)  # confirmed, not yet deleted

    async def relay(async_engine: Any) -> int:
        return await outbox.relay_once_async(async_engine)

    assert run(relay, app) == 50  # the next relay publishes every row the crash left
    after = drain(topology.broker_url, queue)
    numbers = sorted(json.loads(m.body)["data"]["n"] for m in after)
    assert numbers == list(range(50))  # 0 lost
    if mode == "in-relay":  # at least once: the same event ids, for handlers to dedupe
        ids = {m.properties["message_id"] for m in before}
        assert ids == {m.properties["message_id"] for m in after}
