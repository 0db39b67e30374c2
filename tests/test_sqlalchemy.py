"""SQLAlchemy session hooks against the real PostgreSQL and the real RabbitMQ."""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from celery import Celery
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from celery_domain_events import ConfigurationError, DomainEvent, DomainEvents, PublishError
from celery_domain_events.contrib.sqlalchemy import emit_with, install
from celery_domain_events.publishing import send as publisher_module

from .conftest import Topology, drain, probe, wait_for

pytestmark = [pytest.mark.rabbitmq]


class ItemAdded(DomainEvent):
    event_name: ClassVar[str] = "test.sa.item_added"
    item_id: int


@pytest.fixture
def items(topology: Topology, engine: sa.Engine) -> Iterator[sa.Table]:
    """A business table of this test only."""
    table = sa.Table(
        f"items_{topology.uid}",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
    )
    table.create(engine)
    yield table
    table.drop(engine, checkfirst=True)


def published(topology: Topology, name: str, expected: int) -> list[tuple[str, dict[str, Any]]]:
    """Wait for ``expected`` events at the probe; return (routing key, data) in arrival order."""
    seen: list[Any] = []

    def enough() -> bool:
        seen.extend(drain(topology.broker_url, name))
        return len(seen) >= expected

    wait_for(enough, timeout=10)
    assert drain(topology.broker_url, name) == []  # and not one more
    return [(m.delivery_info["routing_key"], json.loads(m.body)["data"]) for m in seen]


def ids(session: Session, items: sa.Table) -> list[int]:
    return list(session.scalars(sa.select(items.c.id).order_by(items.c.id)))


def emit_then_fail(maker: sessionmaker[Session], item_id: int) -> None:
    with maker.begin() as session:
        emit_with(session, ItemAdded(item_id=item_id))
        raise ValueError("boom")


def savepoint_that_fails(session: Session, items: sa.Table, item_id: int) -> None:
    with session.begin_nested():
        session.execute(items.insert().values(id=item_id))
        emit_with(session, ItemAdded(item_id=item_id))
        raise ValueError("inner")


def test_commit_publishes_one_batch_in_emit_order(
    topology: Topology, engine: sa.Engine, items: sa.Table, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = topology.app()
    queue = probe(topology, app)
    maker = sessionmaker(engine)
    install(maker, app)
    batches: list[list[Any]] = []
    real = publisher_module.publish_events

    def recording(ext: DomainEvents, events: list[Any]) -> None:
        batches.append(list(events))
        real(ext, events)

    monkeypatch.setattr(publisher_module, "publish_events", recording)

    with maker() as session:
        first = emit_with(session, ItemAdded(item_id=1))  # before any SQL: begins the transaction
        session.execute(items.insert().values(id=1))
        second = emit_with(session, "test.sa.untyped", {"n": 2}, version=3)
        session.execute(items.insert().values(id=2))
        third = emit_with(session, ItemAdded(item_id=3))
        session.flush()
        assert drain(topology.broker_url, queue) == []  # nothing leaves before the commit
        session.commit()

    assert batches == [[first, second, third]]
    assert published(topology, queue, 3) == [
        ("test.sa.item_added", {"item_id": 1}),
        ("test.sa.untyped", {"n": 2}),
        ("test.sa.item_added", {"item_id": 3}),
    ]


def test_rollback_publishes_nothing(topology: Topology, engine: sa.Engine, items: sa.Table) -> None:
    app = topology.app()
    queue = probe(topology, app)
    maker = sessionmaker(engine)
    install(maker, app)

    with maker() as session:
        session.execute(items.insert().values(id=1))
        emit_with(session, ItemAdded(item_id=1))
        session.rollback()
        emit_with(session, ItemAdded(item_id=2))
        session.close()  # closed without a commit: rolled back too

        # The dropped events do not leak into the session's next transaction.
        session.execute(items.insert().values(id=3))
        emit_with(session, ItemAdded(item_id=3))
        session.commit()
        assert ids(session, items) == [3]

    with pytest.raises(ValueError, match="boom"):
        emit_then_fail(maker, 4)

    assert published(topology, queue, 1) == [("test.sa.item_added", {"item_id": 3})]


def test_rolled_back_savepoint_drops_only_its_own_events(
    topology: Topology, engine: sa.Engine, items: sa.Table
) -> None:
    app = topology.app()
    queue = probe(topology, app)
    maker = sessionmaker(engine)
    install(maker, app)

    with maker() as session:
        session.execute(items.insert().values(id=1))
        emit_with(session, ItemAdded(item_id=1))
        with pytest.raises(ValueError, match="inner"):
            savepoint_that_fails(session, items, 2)
        savepoint = session.begin_nested()
        emit_with(session, ItemAdded(item_id=3))
        inner = session.begin_nested()  # a SAVEPOINT inside it: rolled back with its parent
        emit_with(session, ItemAdded(item_id=4))
        savepoint.rollback()
        assert not inner.is_active
        session.execute(items.insert().values(id=5))
        emit_with(session, ItemAdded(item_id=5))
        session.commit()
        assert ids(session, items) == [1, 5]

    assert published(topology, queue, 2) == [
        ("test.sa.item_added", {"item_id": 1}),
        ("test.sa.item_added", {"item_id": 5}),
    ]


def test_released_savepoint_events_go_with_the_outer_commit(
    topology: Topology, engine: sa.Engine, items: sa.Table
) -> None:
    app = topology.app()
    queue = probe(topology, app)
    maker = sessionmaker(engine)
    install(maker, app)

    with maker() as session:
        emit_with(session, ItemAdded(item_id=1))
        with session.begin_nested():
            session.execute(items.insert().values(id=2))
            emit_with(session, ItemAdded(item_id=2))
            with session.begin_nested():
                emit_with(session, ItemAdded(item_id=3))
        assert drain(topology.broker_url, queue) == []  # released, not committed: still waiting
        emit_with(session, ItemAdded(item_id=4))
        session.commit()

        # A released savepoint's events die with a rolled-back outer transaction.
        with session.begin_nested():
            emit_with(session, ItemAdded(item_id=5))
        session.rollback()

    assert published(topology, queue, 3 + 1) == [
        ("test.sa.item_added", {"item_id": 1}),
        ("test.sa.item_added", {"item_id": 2}),
        ("test.sa.item_added", {"item_id": 3}),
        ("test.sa.item_added", {"item_id": 4}),
    ]


def test_install_targets_and_uninstalled_sessions(
    topology: Topology, engine: sa.Engine, items: sa.Table
) -> None:
    app = topology.app()
    queue = probe(topology, app)

    with Session(engine) as plain, pytest.raises(ConfigurationError, match="install"):
        emit_with(plain, ItemAdded(item_id=0))

    class AppSession(Session):
        pass

    install(AppSession, app)
    install(AppSession, app)  # idempotent: still one publish per commit
    with AppSession(engine) as session:
        emit_with(session, ItemAdded(item_id=1))
        session.commit()

    single = Session(engine)
    install(single, app)
    with single:
        emit_with(single, ItemAdded(item_id=2))
        single.commit()

    scoped = scoped_session(sessionmaker(engine))
    install(scoped, app)
    emit_with(scoped(), ItemAdded(item_id=3))
    scoped.commit()
    scoped.remove()

    assert published(topology, queue, 3) == [
        ("test.sa.item_added", {"item_id": 1}),
        ("test.sa.item_added", {"item_id": 2}),
        ("test.sa.item_added", {"item_id": 3}),
    ]
    with pytest.raises(TypeError, match="sessionmaker"):
        install(engine)  # type: ignore[arg-type]


def test_every_new_sessionmaker_publishes(topology: Topology, engine: sa.Engine) -> None:
    # A collected sessionmaker's class id gets reused; SQLAlchemy's event.contains() is keyed
    # on that id and would claim the hooks were already there.
    app = topology.app()
    queue = probe(topology, app)
    for n in range(5):
        maker = sessionmaker(engine)
        install(maker, app)
        with maker.begin() as session:
            emit_with(session, ItemAdded(item_id=n))
        del maker, session
        gc.collect()
    assert [data["item_id"] for _, data in published(topology, queue, 5)] == list(range(5))


def test_publish_failure_after_commit_raises_with_the_events(
    topology: Topology, engine: sa.Engine, items: sa.Table
) -> None:
    app = Celery("unreachable", broker="amqp://guest:guest@127.0.0.1:1//", set_as_current=False)
    app.conf.broker_heartbeat = None
    DomainEvents(
        app,
        service=topology.service("down"),
        exchange=topology.exchange,
        publish_timeout=1,
    )
    maker = sessionmaker(engine)
    install(maker, app)

    with maker() as session:
        session.execute(items.insert().values(id=1))
        event = emit_with(session, ItemAdded(item_id=1))
        with pytest.raises(PublishError) as info:
            session.commit()
        assert list(info.value.events) == [event]
        # The commit stands, and the session is usable afterwards.
        assert ids(session, items) == [1]
        session.execute(items.insert().values(id=2))
        session.commit()
        assert ids(session, items) == [1, 2]
