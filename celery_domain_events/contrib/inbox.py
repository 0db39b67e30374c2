"""SQLAlchemy inboxes: idempotent handlers whose side effects share the inbox row's transaction.

::

    Session = sessionmaker(engine)
    inbox = SqlAlchemyInbox(Session, metadata=Base.metadata)   # the table joins your migrations

    @domain_event_handler("order.placed", idempotent=inbox)
    def project(event: OrderPlaced) -> None:
        inbox.session.add(OrderRow(id=event.order_id))

Each run opens a session and a transaction, inserts ``(handler, event id)`` (with ``ON CONFLICT
DO NOTHING`` on PostgreSQL and SQLite, in a SAVEPOINT elsewhere) and calls the handler, whose
work goes through :attr:`SqlAlchemyInbox.session`; the transaction commits when the handler
returns and rolls back if it raises (the retry runs it again). A duplicate's insert meets the
primary key: nothing is committed and the handler is skipped.
With PostgreSQL (READ COMMITTED, its default), a second delivery of an event being handled
waits on the first one's row, then is skipped, or runs if the first rolled back.

:class:`AsyncSqlAlchemyInbox` does the same with an ``async_sessionmaker`` for ``async def``
handlers. Rows older than a retention window are deleted with :meth:`SqlAlchemyInbox.purge`
(or ``celery -A proj domain-events inbox purge``).
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, Generic, TypeVar

from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Index,
    MetaData,
    String,
    Table,
    bindparam,
    delete,
    insert,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

__all__ = ["DEFAULT_INBOX_TABLE", "AsyncSqlAlchemyInbox", "SqlAlchemyInbox", "define_inbox_table"]

S = TypeVar("S")

#: Name of the inbox table unless you choose another.
DEFAULT_INBOX_TABLE = "domain_events_inbox"


def define_inbox_table(metadata: MetaData, name: str = DEFAULT_INBOX_TABLE) -> Table:
    """Return the inbox table ``name`` on ``metadata``, defining it if it is not there yet.

    Call it where your models are defined so the table is part of your migrations.
    """
    existing = metadata.tables.get(name)
    if existing is not None:
        return existing
    return Table(
        name,
        metadata,
        Column("handler", String(200), primary_key=True, comment="handler name"),
        Column("event_id", String(255), primary_key=True, comment="CloudEvents id"),
        Column("handled_at", DateTime(timezone=True), nullable=False),
        Index(f"ix_{name}_handled_at", "handled_at"),
    )


class _Inbox(Generic[S]):
    """What both inboxes share: the table, the claim's statement, the session of a run."""

    def __init__(
        self, sessions: Callable[[], Any], metadata: MetaData | None, table_name: str
    ) -> None:
        self.table = define_inbox_table(
            metadata if metadata is not None else MetaData(), table_name
        )
        self._sessions = sessions
        #: dialect name -> the claim's INSERT ... ON CONFLICT statement (None: use a SAVEPOINT)
        self._upserts: dict[str, Any] = {}
        self._current: contextvars.ContextVar[S | None] = contextvars.ContextVar(
            f"celery_domain_events_inbox_{id(self)}", default=None
        )

    @property
    def session(self) -> S:
        """The session of the handler run in progress: its work commits with the inbox row.

        A ``Session``; an ``AsyncSession`` for :class:`AsyncSqlAlchemyInbox`.

        Raises:
            RuntimeError: not inside a run of a handler that uses this inbox.
        """
        session = self._current.get()
        if session is None:
            raise RuntimeError(
                "inbox.session is the session of an idempotent handler's run; use it inside "
                "a handler declared with idempotent=this inbox"
            )
        return session

    @contextmanager
    def _running_in(self, session: S) -> Iterator[None]:
        """Make ``session`` :attr:`session` for the handler run inside the block."""
        token = self._current.set(session)
        try:
            yield
        finally:
            self._current.reset(token)

    def _insert_if_new(self, dialect: str) -> Any | None:
        """``INSERT ... ON CONFLICT DO NOTHING RETURNING`` where the dialect has it, else None.

        One statement instead of SAVEPOINT, INSERT, RELEASE: it halves the round trips of a
        claim. PostgreSQL makes it wait on a concurrent uncommitted insert of the same pair,
        then do nothing (that one committed) or insert (it rolled back), as the SAVEPOINT
        insert's unique violation would decide. Built once per dialect, with bound parameters
        ``handler``, ``event_id`` and ``handled_at`` (see row (f) of the benchmark in
        docs/operations/performance.md for what building it per run cost).
        """
        cached = self._upserts.get(dialect, ...)
        if cached is not ...:
            return cached
        dialect_insert: Any
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert  # noqa: PLC0415
        elif dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as dialect_insert  # noqa: PLC0415
        else:
            self._upserts[dialect] = None
            return None
        statement = (
            dialect_insert(self.table)
            .values(
                handler=bindparam("handler"),
                event_id=bindparam("event_id"),
                handled_at=bindparam("handled_at"),
            )
            .on_conflict_do_nothing(index_elements=["handler", "event_id"])
            .returning(self.table.c.handler)  # a row back: inserted; none: a duplicate
        )
        self._upserts[dialect] = statement
        return statement

    @staticmethod
    def _params(handler: str, event_id: str) -> dict[str, Any]:
        return {"handler": handler, "event_id": event_id, "handled_at": datetime.now(timezone.utc)}

    def _older_than(self, older_than: timedelta) -> Any:
        cutoff = datetime.now(timezone.utc) - older_than
        return delete(self.table).where(self.table.c.handled_at < cutoff)


class SqlAlchemyInbox(_Inbox[Session]):
    """An inbox in a SQLAlchemy database; see the module docstring.

    Args:
        sessions: makes a ``Session`` (a ``sessionmaker``) for each handler run.
        metadata: the ``MetaData`` to define the table on (default: a private one).
        table_name: the table's name.
    """

    def __init__(
        self,
        sessions: Callable[[], Session],
        metadata: MetaData | None = None,
        table_name: str = DEFAULT_INBOX_TABLE,
    ) -> None:
        super().__init__(sessions, metadata, table_name)

    @contextmanager
    def claim(self, handler: str, event_id: str) -> Iterator[bool]:
        """Begin a transaction, claim ``(handler, event_id)`` in it; see ``inbox.Inbox``."""
        with self._sessions() as session, session.begin():
            connection = session.connection()  # Core: the ORM adds nothing to this INSERT
            upsert = self._insert_if_new(connection.dialect.name)
            if upsert is not None:
                fresh = (
                    connection.execute(upsert, self._params(handler, event_id)).first() is not None
                )
            else:
                try:
                    with session.begin_nested():
                        session.execute(insert(self.table), self._params(handler, event_id))
                    fresh = True
                except IntegrityError:  # committed by an earlier delivery: a duplicate
                    fresh = False
            if not fresh:
                yield False
                return
            with self._running_in(session):
                yield True

    def purge(self, bind: Engine, older_than: timedelta) -> int:
        """Delete the rows of events handled more than ``older_than`` ago; return how many.

        A duplicate of a purged event would run the handler again: keep the window longer than
        redeliveries, relays and replays can lag (DLQs included).
        """
        with bind.begin() as conn:
            return int(conn.execute(self._older_than(older_than)).rowcount)


class AsyncSqlAlchemyInbox(_Inbox[Any]):
    """:class:`SqlAlchemyInbox` for ``async def`` handlers, with an ``async_sessionmaker``."""

    def __init__(
        self,
        sessions: Callable[[], Any],
        metadata: MetaData | None = None,
        table_name: str = DEFAULT_INBOX_TABLE,
    ) -> None:
        super().__init__(sessions, metadata, table_name)

    @asynccontextmanager
    async def aclaim(self, handler: str, event_id: str) -> AsyncIterator[bool]:
        """As :meth:`SqlAlchemyInbox.claim`, on the worker's event loop."""
        async with self._sessions() as session, session.begin():
            connection = await session.connection()
            upsert = self._insert_if_new(connection.dialect.name)
            if upsert is not None:
                result = await connection.execute(upsert, self._params(handler, event_id))
                fresh = result.first() is not None
            else:
                try:
                    async with session.begin_nested():
                        await session.execute(insert(self.table), self._params(handler, event_id))
                    fresh = True
                except IntegrityError:
                    fresh = False
            if not fresh:
                yield False
                return
            with self._running_in(session):
                yield True

    async def purge(self, bind: Any, older_than: timedelta) -> int:
        """:meth:`SqlAlchemyInbox.purge` on an ``AsyncEngine``."""
        async with bind.begin() as conn:
            return int((await conn.execute(self._older_than(older_than))).rowcount)
