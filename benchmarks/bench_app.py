"""The Celery app the benchmark workers run, configured from ``BENCH_*`` environment variables.

``benchmarks.run`` starts ``celery -A benchmarks.bench_app worker`` with the environment below and
builds the same app in its own process (:func:`build_app`) to declare the topology and publish.

Environment:
    BENCH_BROKER_URL: the AMQP broker.
    BENCH_REDIS_URL: where completions are counted.
    BENCH_KEY: per-run Redis key prefix (``<key>`` counter, ``<key>:times``, ``<key>:ready``).
    BENCH_MODE: ``plain`` (a Celery app, nothing else) or ``events`` (``DomainEvents`` installed).
    BENCH_TASK_QUEUE: the app's default task queue (unique per run, so that a benchmark worker
        never takes tasks from the shared ``celery`` queue other people use).
    BENCH_PREFETCH: ``worker_prefetch_multiplier`` (default 4, Celery's default).
    BENCH_EXCHANGE, BENCH_UNROUTED, BENCH_SERVICE, BENCH_HANDLERS: ``events`` mode only.
    BENCH_QUEUE_TYPE: ``classic`` (default) or ``quorum`` handler queues (``events`` mode).
    BENCH_METRICS: ``1`` turns Prometheus metrics on (``events`` mode): the worker serves them on a
        free port (``domain_events_metrics_port=0``), prometheus-client's multiprocess mode.
    BENCH_HUB_FLUSH: ``1`` adds :class:`FlushReadyBeforePoll`, an experiment (see there).
    BENCH_PG_URL, BENCH_PG_TABLE, BENCH_INBOX_TABLE: the PostgreSQL database and the tables of
        the (f) and (h) handlers (``bench_pg_plain``, ``bench_pg_inbox``, ``bench_pg_batch``);
        the benchmark creates and drops the tables.

Every piece of work (the plain no-op task and both handlers) does exactly the same thing,
:func:`record_completion`: one Redis round trip that counts it and stores its completion time.
So plain tasks/s and handler runs/s measure the same per-task work, and the times are taken in
the worker itself, not by a poller that could be late. The (f) handlers each add the same
PostgreSQL INSERT: the plain one in its own committed transaction, the idempotent one through
its inbox's session (the inbox row and the INSERT commit together).

The batch handlers of (g) and (h) do the same bookkeeping in bulk, :func:`record_completions`:
one pipelined Redis round trip per *batch* that counts every event of it (``INCRBY``) and
stores one completion time per event (a single ``RPUSH`` of that many copies of the time), so
their throughput is events/s, counted exactly as the per-event handlers count theirs.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import redis
import sqlalchemy as sa
from celery import Celery, bootsteps, shared_task
from celery.signals import worker_ready
from sqlalchemy.orm import sessionmaker

from celery_domain_events import Batch, DomainEvent, DomainEvents, _compat, domain_event_handler
from celery_domain_events.contrib.inbox import SqlAlchemyInbox, define_inbox_table

#: The task name of the plain no-op task.
NOOP_TASK = "bench.noop"
#: The routing key of the benchmark event; both handlers are bound to it.
EVENT_NAME = "bench.happened"
#: The benchmark's handlers (each one gets its own queue ``<service>.<name>``).
HANDLERS = ("bench_a", "bench_b")
#: The (f) pair: one PostgreSQL INSERT per event, plain and idempotent (one handler per run).
PG_HANDLERS = ("bench_pg_plain", "bench_pg_inbox")
#: (g): a batch handler with the no-op body, in bulk (one Redis round trip per batch).
BATCH_HANDLER = "bench_batch"
#: (h): a batch handler doing one multi-row INSERT and one commit per batch.
PG_BATCH_HANDLER = "bench_pg_batch"
#: The batch size of (g) and (h). 500 events make the per-batch costs (one task, one Redis
#: round trip, one commit) under 1% of a batch's events' own costs, keep the unacked budget
#: the worker adds (2 x 500) small, and divide N=1,000 and N=10,000, so no run ends on a
#: partial batch that waits ``max_wait``. 0.5 s only matters if a batch fills slowly.
BENCH_BATCH = Batch(max_size=500, max_wait=0.5)
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


class BenchHappened(DomainEvent):
    """A small typed event, about the size of a real one (~400 bytes on the wire)."""

    event_name: ClassVar[str] = EVENT_NAME
    event_version: ClassVar[int] = 1

    seq: int
    payload: str


class Completions:
    """Counts completions in Redis and keeps the wall-clock time of each one.

    One pipelined round trip per completion (INCR + RPUSH): the same cost for a plain task and a
    handler. ``time.time()`` is comparable across the worker's processes on one machine.
    """

    def __init__(self, redis_url: str, key: str) -> None:
        self.redis_url = redis_url
        self.key = key

    @functools.cached_property
    def client(self) -> redis.Redis:
        # Created on first use, so a prefork child gets its own connection (redis-py also
        # resets a pool inherited across fork, but not creating one in the parent is simpler).
        return redis.Redis.from_url(self.redis_url)

    def record(self) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.incr(self.key)
        pipe.rpush(f"{self.key}:times", repr(time.time()))
        pipe.execute()

    def record_many(self, count: int) -> None:
        """Count ``count`` completions at once: one round trip, one time stored per event."""
        pipe = self.client.pipeline(transaction=False)
        pipe.incrby(self.key, count)
        pipe.rpush(f"{self.key}:times", *[repr(time.time())] * count)
        pipe.execute()

    def mark_ready(self) -> None:
        self.client.set(f"{self.key}:ready", repr(time.time()))


# Set by build_app(); a worker process runs exactly one app, and prefork children inherit it.
_completions: list[Completions] = []


def record_completion() -> None:
    """The whole body of every benchmark task and handler."""
    _completions[-1].record()


def record_completions(count: int) -> None:
    """The bookkeeping of a batch handler: ``count`` completions in one Redis round trip."""
    _completions[-1].record_many(count)


@shared_task(name=NOOP_TASK, acks_late=True, ignore_result=True)
def noop() -> None:
    """Plain Celery baseline; ``acks_late`` and no result, exactly like a handler task."""
    record_completion()


@domain_event_handler(EVENT_NAME, name=HANDLERS[0], retry=None)
def bench_a(event: BenchHappened) -> None:
    record_completion()


@domain_event_handler(EVENT_NAME, name=HANDLERS[1], retry=None)
def bench_b(event: BenchHappened) -> None:
    record_completion()


@domain_event_handler(EVENT_NAME, name=BATCH_HANDLER, retry=None, batch=BENCH_BATCH)
def bench_batch(events: list[BenchHappened]) -> None:
    """(g): the no-op body for a whole batch (one Redis round trip counting every event)."""
    record_completions(len(events))


def pg_tables(env: Mapping[str, str]) -> tuple[sa.MetaData, sa.Table]:
    """Return the (f) handlers' table and a ``MetaData`` holding it and the inbox table.

    Named by ``BENCH_PG_TABLE`` and ``BENCH_INBOX_TABLE``; the benchmark creates and drops
    both around each (f) run.
    """
    metadata = sa.MetaData()
    rows = sa.Table(
        env.get("BENCH_PG_TABLE", "bench_pg_rows"),
        metadata,
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
    )
    define_inbox_table(metadata, env.get("BENCH_INBOX_TABLE", "bench_inbox"))
    return metadata, rows


# Built at import from this process's environment (a worker's is set before it starts; the
# benchmark process only uses pg_tables). The engine connects lazily, in each pool process.
_PG_METADATA, PG_ROWS = pg_tables(os.environ)
PG_SESSIONS = sessionmaker(sa.create_engine(os.environ.get("BENCH_PG_URL", DEFAULT_PG_URL)))
PG_INBOX = SqlAlchemyInbox(
    PG_SESSIONS, _PG_METADATA, os.environ.get("BENCH_INBOX_TABLE", "bench_inbox")
)


@domain_event_handler(EVENT_NAME, name=PG_HANDLERS[0], retry=None)
def bench_pg_plain(event: BenchHappened) -> None:
    """(f) baseline: one INSERT in its own session and transaction, committed."""
    with PG_SESSIONS.begin() as session:
        session.execute(sa.insert(PG_ROWS).values(event_id=str(event.event_id), seq=event.seq))
        record_completion()


@domain_event_handler(EVENT_NAME, name=PG_HANDLERS[1], idempotent=PG_INBOX, retry=None)
def bench_pg_inbox(event: BenchHappened) -> None:
    """(f) idempotent: the same INSERT through the inbox's session (commits after return)."""
    PG_INBOX.session.execute(sa.insert(PG_ROWS).values(event_id=str(event.event_id), seq=event.seq))
    record_completion()


@domain_event_handler(EVENT_NAME, name=PG_BATCH_HANDLER, retry=None, batch=BENCH_BATCH)
def bench_pg_batch(events: list[BenchHappened]) -> None:
    """(h): the (f) plain handler's INSERT for a whole batch: one executemany, one commit."""
    with PG_SESSIONS.begin() as session:
        session.execute(
            sa.insert(PG_ROWS), [{"event_id": str(e.event_id), "seq": e.seq} for e in events]
        )
        record_completions(len(events))


class FlushReadyBeforePoll(bootsteps.StartStopStep):
    """The library's fix of kombu's late-ack stall, in a plain Celery worker too (``--hub-flush``).

    kombu 5.7's ``Hub.create_loop`` runs the ready callbacks and then polls for up to 1 s
    without looking at callbacks made ready in between; with the solo pool the late ack is one
    of them, so a worker whose every prefetched delivery waits for its ack stalls until a timer
    fires. ``DomainEventsStep`` installs ``_compat.flush_ready_before_poll`` in every worker
    that runs handlers; this step installs the same hook in the plain (b) worker as well, to
    compare the two pools without the stall. The real fix belongs in kombu.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, parent: Any) -> None:
        hub = getattr(parent.controller, "hub", None)
        if hub is not None:  # none with synloop: nothing to flush
            _compat.flush_ready_before_poll(hub)


def build_app(env: Mapping[str, str]) -> Celery:
    """Build the benchmark app from ``BENCH_*`` settings (see the module docstring)."""
    completions = Completions(env["BENCH_REDIS_URL"], env["BENCH_KEY"])
    _completions.append(completions)
    app = Celery("bench", broker=env["BENCH_BROKER_URL"], set_as_current=True)
    app.conf.update(
        # With heartbeats on, a worker takes ~9 s to shut down: benchmarks start many.
        broker_heartbeat=None,
        broker_connection_retry_on_startup=True,
        task_default_queue=env["BENCH_TASK_QUEUE"],
        worker_prefetch_multiplier=int(env.get("BENCH_PREFETCH", "4")),
        worker_send_task_events=False,
        task_ignore_result=True,
    )
    if env["BENCH_MODE"] == "events":
        app.conf.update(
            domain_events_exchange=env["BENCH_EXCHANGE"],
            domain_events_unrouted_queue=env["BENCH_UNROUTED"],
            domain_events_queue_type=env.get("BENCH_QUEUE_TYPE", "classic"),
        )
        if env.get("BENCH_METRICS") == "1":
            app.conf.domain_events_metrics_port = 0
        handlers = [h for h in env.get("BENCH_HANDLERS", ",".join(HANDLERS)).split(",") if h]
        DomainEvents(app, service=env["BENCH_SERVICE"], handlers=handlers)

    if env.get("BENCH_HUB_FLUSH") == "1":
        app.steps["consumer"].add(FlushReadyBeforePoll)

    def on_ready(**_: Any) -> None:
        completions.mark_ready()

    # Only worker processes send worker_ready; the benchmark process never does.
    worker_ready.connect(on_ready, weak=False)
    return app


@functools.cache
def worker_app() -> Celery:
    """The app of ``celery -A benchmarks.bench_app worker``, from this process's environment."""
    return build_app(os.environ)


def __getattr__(name: str) -> Any:
    # `celery -A benchmarks.bench_app` looks up `app` on the module; building it lazily lets
    # benchmarks.run import this module (for build_app and the event class) without BENCH_* set.
    if name == "app":
        return worker_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
