"""SQLAlchemy inboxes on the real PostgreSQL: once per (handler, event id), in one transaction."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import redis
import sqlalchemy as sa
from celery import Celery
from click.testing import CliRunner
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

from celery_domain_events import (
    NON_RETRYABLE,
    ConfigurationError,
    DomainEvent,
    DomainEvents,
    DomainEventsError,
    InboxBusy,
    RetryPolicy,
    domain_event_handler,
    emit,
    transmit,
)
from celery_domain_events.consuming.bootstep import hold_limit
from celery_domain_events.contrib.inbox import AsyncSqlAlchemyInbox, SqlAlchemyInbox
from celery_domain_events.contrib.redis_inbox import RedisInbox
from celery_domain_events.ops.inbox_cli import inbox as inbox_cli
from celery_domain_events.testing import capture_events

from .conftest import DB_URL, Topology, WorkerProcess, wait_for

UID = uuid.uuid4().hex[:8]
METADATA = sa.MetaData()
ROWS = sa.Table(
    f"inbox_rows_{UID}",
    METADATA,
    sa.Column("handler", sa.String(50), primary_key=True),
    sa.Column("order_id", sa.Integer, primary_key=True),
)
ENGINE = sa.create_engine(DB_URL)
INBOX = SqlAlchemyInbox(sessionmaker(ENGINE), METADATA, table_name=f"inbox_{UID}")
ASYNC_INBOX = AsyncSqlAlchemyInbox(lambda: None, METADATA, table_name=f"inbox_{UID}")
FAILURES = {"left": 0}


class InboxOrder(DomainEvent):
    event_name: ClassVar[str] = "ib.order.placed"
    order_id: int


@domain_event_handler("ib.order.placed", idempotent=INBOX, retry=RetryPolicy(max_retries=2))
def ib_project(event: InboxOrder) -> None:
    INBOX.session.execute(sa.insert(ROWS).values(handler="ib_project", order_id=event.order_id))
    if FAILURES["left"]:
        FAILURES["left"] -= 1
        raise ConnectionError("flaky downstream: the row above is rolled back")


@domain_event_handler("ib.order.placed", idempotent=ASYNC_INBOX, retry=None)
async def ib_project_async(event: InboxOrder) -> None:
    await ASYNC_INBOX.session.execute(
        sa.insert(ROWS).values(handler="ib_project_async", order_id=event.order_id)
    )


@pytest.fixture(scope="module", autouse=True)
def tables(engine: Any) -> Iterator[None]:
    try:
        METADATA.create_all(engine)
    except sa.exc.OperationalError as exc:  # as conftest's engine fixture: CI fails, a laptop skips
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL is not reachable: {exc}")
    yield
    METADATA.drop_all(engine)
    ENGINE.dispose()


@pytest.fixture(scope="module")
def engine() -> sa.Engine:  # module-scoped twin of conftest's
    return ENGINE


def rows(handler: str) -> list[int]:
    with ENGINE.connect() as conn:
        result = conn.execute(sa.select(ROWS.c.order_id).where(ROWS.c.handler == handler))
        return sorted(result.scalars())


def app_with(*handlers: Any) -> Celery:
    app = Celery("inbox", broker="memory://", set_as_current=False)
    DomainEvents(app, service="ib", handlers=list(handlers), discover_handlers=False)
    return app


def test_a_duplicate_delivery_is_skipped_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    app = app_with(ib_project)
    event = InboxOrder(order_id=1)
    with capture_events(app) as events, caplog.at_level("INFO"):
        emit(event)
        emit(event)  # the same event id twice: a relay's or a publisher's duplicate
        transmit(app)
        events.join()
    assert rows("ib_project") == [1]
    assert events.handled(ib_project) == [event, event]  # both acked; one ran the handler
    assert f"Skipped ib.order.placed id={event.event_id}: ib_project already handled it" in (
        caplog.text
    )


def test_a_failed_attempt_commits_nothing_and_its_retry_runs_again() -> None:
    app = app_with(ib_project)
    FAILURES["left"] = 1
    with capture_events(app) as events:
        emit(InboxOrder(order_id=2))
        transmit(app)
        events.join()
    assert FAILURES["left"] == 0
    assert rows("ib_project") == [1, 2]  # once, though the handler ran twice


def test_the_database_decides_between_two_concurrent_deliveries() -> None:
    event_id = str(uuid.uuid4())
    outcomes: list[bool] = []
    first_inside = threading.Event()

    def deliver(pause: float) -> None:
        with INBOX.claim("ib_race", event_id) as fresh:
            outcomes.append(fresh)
            first_inside.set()
            time.sleep(pause)  # the other delivery's insert waits on this row meanwhile

    first = threading.Thread(target=deliver, args=(0.5,))
    first.start()
    first_inside.wait(5)
    started = time.monotonic()
    deliver(0)
    waited = time.monotonic() - started
    first.join()
    assert outcomes == [True, False]
    assert waited >= 0.3  # it waited for the first transaction instead of guessing


def test_an_async_handler_uses_the_async_inbox() -> None:
    async_engine = create_async_engine(DB_URL)
    ASYNC_INBOX._sessions = async_sessionmaker(async_engine)
    app = app_with(ib_project_async)
    event = InboxOrder(order_id=3)
    try:
        with capture_events(app) as events:
            emit(event)
            emit(event)
            transmit(app)
            events.join()
    finally:
        from celery_domain_events.consuming import aio_loop

        aio_loop.run(async_engine.dispose())
    assert rows("ib_project_async") == [3]


def test_purge_deletes_rows_older_than_the_window() -> None:
    with INBOX.claim("ib_purge", "old") as fresh:
        assert fresh
    with ENGINE.begin() as conn:
        conn.execute(
            sa.update(INBOX.table)
            .where(INBOX.table.c.handler == "ib_purge")
            .values(handled_at=sa.func.now() - sa.text("interval '10 days'"))
        )
    with INBOX.claim("ib_purge", "new") as fresh:
        assert fresh
    assert INBOX.purge(ENGINE, timedelta(days=7)) == 1
    with INBOX.claim("ib_purge", "new") as fresh:
        assert not fresh  # still remembered
    with INBOX.claim("ib_purge", "old") as fresh:
        assert fresh  # forgotten: a duplicate this late would run again


def test_the_session_exists_only_inside_a_run() -> None:
    with pytest.raises(RuntimeError, match="inside a handler declared with idempotent"):
        _ = INBOX.session


def test_an_inbox_that_cannot_serve_the_handler_is_refused_at_decoration() -> None:
    with pytest.raises(ConfigurationError, match="has no claim"):

        @domain_event_handler("ib.#", idempotent=object())  # type: ignore[arg-type]
        def not_an_inbox(event: InboxOrder) -> None: ...

    with pytest.raises(ConfigurationError, match="has no aclaim"):

        @domain_event_handler("ib.#", idempotent=INBOX)
        async def sync_inbox_for_async(event: InboxOrder) -> None: ...


# --- RedisInbox, on the real Redis --------------------------------------------------------

REDIS_URL = os.environ.get("DOMAIN_EVENTS_REDIS_URL", "redis://127.0.0.1:6379/0")
REDIS_INBOX = RedisInbox(
    redis.Redis.from_url(REDIS_URL),
    ttl=timedelta(hours=1),
    lease=timedelta(seconds=60),
    prefix=f"test:inbox:{UID}:",
)
NOTIFIED: list[int] = []


@domain_event_handler("ib.order.placed", idempotent=REDIS_INBOX, retry=RetryPolicy(max_retries=2))
def ib_notify(event: InboxOrder) -> None:
    if FAILURES["left"]:
        FAILURES["left"] -= 1
        raise ConnectionError("flaky downstream")
    NOTIFIED.append(event.order_id)


@pytest.fixture
def redis_keys() -> Iterator[redis.Redis]:
    client = REDIS_INBOX.client
    try:
        client.ping()
    except redis.ConnectionError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"Redis is not reachable: {exc}")
    NOTIFIED.clear()
    yield client
    for key in client.scan_iter(f"{REDIS_INBOX.prefix}*"):
        client.delete(key)


def test_redis_a_duplicate_is_skipped_and_the_done_mark_expires(redis_keys: redis.Redis) -> None:
    app = app_with(ib_notify)
    event = InboxOrder(order_id=10)
    with capture_events(app) as events:
        emit(event)
        emit(event)
        transmit(app)
        events.join()
    assert NOTIFIED == [10]
    key = REDIS_INBOX.key("ib_notify", str(event.event_id))
    assert redis_keys.get(key) == b"done"
    assert 3_590_000 < redis_keys.pttl(key) <= 3_600_000  # ttl, not the lease


def test_redis_a_failure_frees_the_key_and_the_retry_runs(redis_keys: redis.Redis) -> None:
    app = app_with(ib_notify)
    FAILURES["left"] = 1
    event = InboxOrder(order_id=11)
    with capture_events(app) as events:
        emit(event)
        transmit(app)
        events.join()
    assert FAILURES["left"] == 0
    assert NOTIFIED == [11]
    assert redis_keys.get(REDIS_INBOX.key("ib_notify", str(event.event_id))) == b"done"


def test_redis_a_claim_in_progress_is_retried_after_its_lease_not_dead_lettered(
    redis_keys: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery_domain_events.consuming.task import DomainEventTask

    app = app_with(ib_notify)
    event = InboxOrder(order_id=12)
    key = REDIS_INBOX.key("ib_notify", str(event.event_id))
    redis_keys.set(key, "processing", px=30_000)  # a delivery that crashed mid-handler
    retries: list[tuple[float, BaseException]] = []
    original = DomainEventTask.retry

    def retry(self: Any, *args: Any, **kwargs: Any) -> Any:
        retries.append((kwargs["countdown"], kwargs["exc"]))
        redis_keys.delete(key)  # the harness retries at once: let the lease be over by then
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DomainEventTask, "retry", retry)
    with capture_events(app, fail_fast=False) as events:
        emit(event)
        transmit(app)
        events.join()
    assert events.dead_letters == []
    assert NOTIFIED == [12]
    [(countdown, exc)] = retries
    assert isinstance(exc, InboxBusy)
    assert "lease expires in 30 s" in str(exc)
    assert 29 < countdown <= 31  # the lease left (+1 s), not the 1 s backoff


@pytest.mark.rabbitmq
@pytest.mark.worker
def test_redis_a_busy_retry_is_held_for_the_lease_not_the_shorter_backoff(
    redis_keys: redis.Redis, topology: Topology, worker_process: Callable[..., WorkerProcess]
) -> None:
    # tests/worker_app.py's busy_lease: a 4 s lease, retries 0.5 s apart. The worker holds
    # each retry until its x-retry-at, which it caps by the handler's longest delay: the
    # lease's, not the backoff's, or the retries would find the claim each time and be spent.
    worker = worker_process(["busy_lease"]).start()
    event = emit("probe.busy", {})
    key = f"test:busy:{topology.service('proc')}:busy_lease:{event.event_id}"
    redis_keys.set(key, "processing", px=4_000)  # a delivery that crashed mid-handler
    try:
        claimed = time.time()
        transmit(topology.app("pub"))
        wait_for(lambda: bool(worker.marker_lines("busy_lease", event.event_id)), timeout=30)
        [line] = worker.marker_lines("busy_lease", event.event_id)
        assert float(line.split()[0]) - claimed >= 3.9  # after the lease, at its first retry
        assert "lease expires in 4 s" in worker.log()
        assert topology.queue_depth(worker.queue("busy_lease") + ".dlq") == 0
        assert redis_keys.get(key) == b"done"
    finally:
        redis_keys.delete(key)


def test_hold_limit_is_the_longer_of_the_backoff_and_a_busy_inbox() -> None:
    spec = SimpleNamespace(
        retry=RetryPolicy(backoff=False, countdown=0.5),
        idempotent=RedisInbox(redis.Redis(), lease=timedelta(seconds=31)),
    )
    assert hold_limit(spec) == 32.0  # type: ignore[arg-type]
    spec.retry = RetryPolicy(backoff_max=600)
    assert hold_limit(spec) == 601.0  # type: ignore[arg-type]
    spec.idempotent = INBOX  # a database inbox is never busy
    assert hold_limit(spec) == 601.0  # type: ignore[arg-type]
    spec.retry = None
    assert hold_limit(spec) == 1.0  # type: ignore[arg-type]


def test_redis_inbox_busy_is_retryable_by_default() -> None:
    assert not issubclass(InboxBusy, NON_RETRYABLE)
    assert issubclass(InboxBusy, RetryPolicy().autoretry_for)
    assert issubclass(InboxBusy, DomainEventsError)


# --- celery -A proj domain-events inbox purge ----------------------------------------------


def test_cli_purge_deletes_rows_older_than_the_window() -> None:
    box = SqlAlchemyInbox(sessionmaker(ENGINE), table_name=f"inbox_cli_{UID}")
    box.table.create(ENGINE)
    try:
        with ENGINE.begin() as conn:
            for event_id, age in (("old", "2 hours"), ("new", "1 minute")):
                conn.execute(
                    sa.insert(box.table).values(
                        handler="h",
                        event_id=event_id,
                        handled_at=sa.func.now() - sa.text(f"interval '{age}'"),
                    )
                )
        app = app_with()
        app.conf.domain_events_inbox_retention = 3 * 3600
        runner, obj = CliRunner(), SimpleNamespace(app=app)
        env = {"DOMAIN_EVENTS_INBOX_URL": DB_URL}
        table = ["purge", "--table", box.table.name]
        kept = runner.invoke(inbox_cli, table, obj=obj, env=env)  # the setting: 3 hours
        assert kept.exit_code == 0, kept.output
        assert kept.output.startswith("0 inbox row(s) older than 10800 s deleted")
        purged = runner.invoke(inbox_cli, [*table, "--older-than", "3600"], obj=obj, env=env)
        assert purged.exit_code == 0, purged.output
        assert purged.output.startswith("1 inbox row(s) older than 3600 s deleted")
        with ENGINE.connect() as conn:
            assert list(conn.execute(sa.select(box.table.c.event_id)).scalars()) == ["new"]
        missing = runner.invoke(inbox_cli, ["purge", "--table", "nope"], obj=obj, env=env)
        assert missing.exit_code == 1
        assert "database error" in missing.output
    finally:
        box.table.drop(ENGINE)


def test_redis_inbox_durations_are_timedeltas_with_a_hint() -> None:
    with pytest.raises(TypeError, match=r"ttl must be a timedelta, e.g. ttl=timedelta\(days=7\)"):
        RedisInbox(redis.Redis(), ttl=5)  # type: ignore[arg-type]


def test_without_on_conflict_the_claim_uses_a_savepoint(monkeypatch: pytest.MonkeyPatch) -> None:
    # Databases other than PostgreSQL and SQLite: the same outcomes, through a SAVEPOINT.
    monkeypatch.setattr(INBOX, "_insert_if_new", lambda dialect: None)
    event_id = str(uuid.uuid4())
    with INBOX.claim("ib_savepoint", event_id) as fresh:
        assert fresh
        INBOX.session.execute(sa.insert(ROWS).values(handler="ib_savepoint", order_id=1))
    with INBOX.claim("ib_savepoint", event_id) as fresh:
        assert not fresh
    assert rows("ib_savepoint") == [1]
