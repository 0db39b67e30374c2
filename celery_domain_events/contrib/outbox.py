"""A transactional outbox: events are rows written in your transaction, relayed to RabbitMQ.

::

    outbox = Outbox(DomainEvents.of(app), metadata=Base.metadata)  # the table joins your migrations

    with Session.begin() as session:
        session.add(Order(id=42))
        outbox.add(session, OrderPaid(order_id=42))  # committed or rolled back with the order

    outbox.relay_forever(engine)  # or: celery -A proj domain-events outbox relay --db-url URL

Each row holds the exact message :func:`~celery_domain_events.publishing.send.publish_events` would
send: the CloudEvents body (trace context included), routing key and AMQP properties.
A relay takes up to ``limit`` of the oldest rows ``FOR UPDATE SKIP LOCKED``, publishes them with
publisher confirms and deletes them in the same database transaction, so any number of relays
can run side by side and each row is published once. Rows are relayed in ``created_at`` order,
which is emit order within a process.

Delivery is **at least once**. Where a crash can strike:

- before the business transaction commits: no row, no event (nothing happened);
- after the commit, before a relay publishes: the rows wait for the next relay;
- in a relay, before the broker confirmed: its transaction dies with its connection and the rows
  are unlocked for the next relay;
- in a relay, after the confirms and before its ``DELETE`` commits: the next relay publishes the
  rows again. These **duplicates** carry the same event id (the CloudEvents ``id`` and AMQP
  ``message_id``), and handlers get a stable task id from it: dedupe on it.

Nothing is deleted before the broker confirmed it, so nothing is lost. Use PostgreSQL (or another
database with ``SKIP LOCKED``) at the READ COMMITTED isolation level, its default.

From asyncio, ``await outbox.add_async(session, event)`` takes an ``AsyncSession`` or
``AsyncConnection``, and ``relay_once_async`` / ``relay_forever_async`` relay from an
``AsyncEngine`` with :func:`~celery_domain_events.transmit_async`'s transport (aio-pika), so a
relay can run as a task of the web service's own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    Connection,
    DateTime,
    Delete,
    Engine,
    Index,
    Insert,
    Integer,
    LargeBinary,
    MetaData,
    Select,
    String,
    Table,
    Update,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from celery_domain_events import metrics
from celery_domain_events.contrib._outbox_rows import (
    DEFAULT_TABLE_NAME,
    messages_of,
    relay_span,
    rows_of,
    split_confirmed,
)
from celery_domain_events.events import AnyEvent
from celery_domain_events.exceptions import PublishError
from celery_domain_events.extension import DomainEvents
from celery_domain_events.publishing.send import as_event

__all__ = ["DEFAULT_TABLE_NAME", "Outbox", "define_table"]

log = logging.getLogger(__name__)


def define_table(metadata: MetaData, name: str = DEFAULT_TABLE_NAME) -> Table:
    """Return the outbox table ``name`` on ``metadata``, defining it if it is not there yet.

    Call it where your models are defined so the table is part of your migrations; it needs no
    Celery app.
    """
    existing = metadata.tables.get(name)
    if existing is not None:
        return existing
    return Table(
        name,
        metadata,
        Column("id", String(36), primary_key=True, comment="event id (CloudEvents id)"),
        Column("created_at", DateTime(timezone=True), nullable=False),
        Column("exchange", String(255), nullable=False),
        Column("routing_key", String(255), nullable=False),
        Column("body", LargeBinary, nullable=False, comment="CloudEvents JSON, as published"),
        Column("properties", JSON, nullable=False),
        Column("headers", JSON, nullable=False),
        Column("attempts", Integer, nullable=False, default=0, server_default="0"),
        Index(f"ix_{name}_created_at", "created_at"),
    )


class Outbox:
    """Write events in the caller's database transaction; relay them to RabbitMQ later.

    Args:
        ext: the ``DomainEvents`` whose settings (service, exchange, confirms) apply.
        metadata: the ``MetaData`` to define the table on (default: a private one).
        table_name: the table's name.
    """

    def __init__(
        self,
        ext: DomainEvents,
        metadata: MetaData | None = None,
        table_name: str = DEFAULT_TABLE_NAME,
    ) -> None:
        self.ext = ext
        self.table = define_table(metadata if metadata is not None else MetaData(), table_name)

    def add(
        self,
        target: Session | Connection,
        event: AnyEvent | str,
        data: Mapping[str, Any] | None = None,
        *,
        version: int = 1,
    ) -> AnyEvent:
        """Insert an event into the outbox, in ``target``'s current transaction.

        Args:
            target: the ``Session`` or ``Connection`` doing the business work.
            event: a ``DomainEvent`` instance, or an event name for an untyped event.
            data: the payload of an untyped event.
            version: the version of an untyped event.

        Returns:
            The event (a ``GenericEvent`` for untyped ones).

        Raises:
            InvalidRoutingPattern: an untyped event name is not dotted words.
            TypeError: ``data`` was given with a typed event.
        """
        event = as_event(event, data, version=version)
        target.execute(self._insert(event))
        return event

    async def add_async(
        self,
        target: Any,
        event: AnyEvent | str,
        data: Mapping[str, Any] | None = None,
        *,
        version: int = 1,
    ) -> AnyEvent:
        """:meth:`add` for an ``AsyncSession`` or ``AsyncConnection``.

        Raises:
            InvalidRoutingPattern: an untyped event name is not dotted words.
            TypeError: ``data`` was given with a typed event.
        """
        event = as_event(event, data, version=version)
        await target.execute(self._insert(event))
        return event

    def _insert(self, event: AnyEvent) -> Insert:
        [row] = rows_of(self.ext, [event])  # exactly what publish_events would send now
        return insert(self.table).values(**row)

    def relay_once(
        self,
        engine: Engine,
        limit: int = 500,
        *,
        _after_publish: Callable[[], None] | None = None,
    ) -> int:
        """Publish up to ``limit`` of the oldest unlocked rows, then delete them.

        One database transaction locks the rows (``FOR UPDATE SKIP LOCKED``), publishes them
        with publisher confirms and deletes them. ``_after_publish`` is a test hook, called
        between the confirms and the delete.

        Returns:
            How many events were published (0 when the outbox is empty or fully locked).

        Raises:
            PublishError: the broker did not confirm some rows; their ids are in
                ``error.events``, their ``attempts`` went up and they stay in the outbox.
                Rows that were confirmed are deleted.
        """
        with engine.connect() as conn, conn.begin():
            rows = conn.execute(self._batch(limit)).all()
            if not rows:
                return 0
            ids = [row.id for row in rows]
            try:
                self._publish(rows)
            except PublishError as exc:
                for statement in self._keep_unconfirmed(ids, exc):
                    conn.execute(statement)
                error = exc
            else:
                if _after_publish is not None:
                    _after_publish()
                conn.execute(self._delete(ids))
                return len(rows)
        # Raised once the transaction committed: the confirmed rows are gone for good.
        raise error

    async def relay_once_async(
        self,
        engine: Any,
        limit: int = 500,
        *,
        _after_publish: Callable[[], Awaitable[None]] | None = None,
    ) -> int:
        """:meth:`relay_once` from asyncio, on an ``AsyncEngine``, publishing with aio-pika.

        Raises:
            PublishError: as for :meth:`relay_once`.
        """
        async with engine.connect() as conn, conn.begin():
            rows = (await conn.execute(self._batch(limit))).all()
            if not rows:
                return 0
            ids = [row.id for row in rows]
            messages = messages_of(self.ext, rows)
            try:
                with relay_span(self.ext, rows), metrics.publishing(self.ext.settings, messages):
                    await self.ext.publish_async(
                        messages, declare=self.ext.topology.publisher_entities()
                    )
            except PublishError as exc:
                for statement in self._keep_unconfirmed(ids, exc):
                    await conn.execute(statement)
                error = exc
            else:
                if _after_publish is not None:
                    await _after_publish()
                await conn.execute(self._delete(ids))
                return len(rows)
        raise error

    async def relay_forever_async(
        self,
        engine: Any,
        *,
        interval: float = 1.0,
        limit: int = 500,
        stop: asyncio.Event | None = None,
    ) -> int:
        """:meth:`relay_forever` from asyncio: relay until ``stop`` is set (or cancelled).

        Returns:
            How many events were relayed in total.
        """
        stop = stop or asyncio.Event()
        total = 0
        while not stop.is_set():
            try:
                count = await self.relay_once_async(engine, limit)
            except (PublishError, OperationalError) as exc:
                log.warning("Outbox relay failed, retrying in %.1f s: %s", interval, exc)
                count = 0
            if count:
                total += count
                log.info("Relayed %d event(s) from %s", count, self.table.name)
            if count < limit:  # caught up (or failed): do not spin
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
        return total

    def relay_forever(
        self,
        engine: Engine,
        *,
        interval: float = 1.0,
        limit: int = 500,
        stop: threading.Event | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> int:
        """Relay until ``stop`` is set, waiting ``interval`` seconds whenever caught up.

        Broker and database outages are logged and retried after ``interval``.

        Args:
            engine: the database holding the outbox.
            interval: seconds to wait when the outbox is empty or a relay failed.
            limit: rows per batch (one database transaction each).
            stop: set it to return after the current batch (default: run forever).
            on_batch: called with the size of each non-empty batch.

        Returns:
            How many events were relayed in total.
        """
        stop = stop or threading.Event()
        total = 0
        while not stop.is_set():
            try:
                count = self.relay_once(engine, limit)
            except (PublishError, OperationalError) as exc:
                log.warning("Outbox relay failed, retrying in %.1f s: %s", interval, exc)
                count = 0
            if count:
                total += count
                log.info("Relayed %d event(s) from %s", count, self.table.name)
                if on_batch is not None:
                    on_batch(count)
            if count < limit:  # caught up (or failed): do not spin
                stop.wait(interval)
        return total

    def _publish(self, rows: Sequence[Any]) -> None:
        messages = messages_of(self.ext, rows)
        with relay_span(self.ext, rows), metrics.publishing(self.ext.settings, messages):
            self.ext.publish(messages, declare=self.ext.topology.publisher_entities())

    def _batch(self, limit: int) -> Select[Any]:
        table = self.table
        return (
            select(table)
            .order_by(table.c.created_at, table.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )

    def _delete(self, ids: list[str]) -> Delete:
        return delete(self.table).where(self.table.c.id.in_(ids))

    def _keep_unconfirmed(self, ids: list[str], exc: PublishError) -> list[Delete | Update]:
        """Delete the confirmed rows of a failed batch; count an attempt on the others."""
        table = self.table
        confirmed, unconfirmed = split_confirmed(ids, exc)
        statements: list[Delete | Update] = [self._delete(confirmed)] if confirmed else []
        statements.append(
            update(table).where(table.c.id.in_(unconfirmed)).values(attempts=table.c.attempts + 1)
        )
        return statements
