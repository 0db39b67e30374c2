"""A Celery app for tests that run a real `celery worker` subprocess.

Configured from the environment by tests.conftest.WorkerProcess; its handlers leave files in
$TEST_MARKER_DIR so the test process can see what happened inside the worker's pool.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import ClassVar

import redis
import sqlalchemy as sa
from celery import Celery, current_task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import sessionmaker

from celery_domain_events import (
    Batch,
    BatchItemsFailed,
    DomainEvent,
    DomainEvents,
    GenericEvent,
    RetryPolicy,
    domain_event_handler,
    emit,
)
from celery_domain_events.consuming import aio_loop
from celery_domain_events.contrib.inbox import SqlAlchemyInbox
from celery_domain_events.contrib.redis_inbox import RedisInbox
from celery_domain_events.tracing import current_traceparent

from . import evolving  # noqa: F401 (registers evolve_v3, its event versions and upcasters)

app = Celery("worker_app", broker=os.environ["TEST_BROKER_URL"])
app.conf.update(
    broker_heartbeat=None,
    worker_send_task_events=True,
    task_send_sent_event=False,
    domain_events_exchange=os.environ["TEST_EXCHANGE"],
    domain_events_unrouted_queue=os.environ["TEST_UNROUTED"],
    domain_events_queue_type=os.environ.get("TEST_QUEUE_TYPE", "classic"),
    # Celery's own task queue, one per test (never the shared "celery" queue); in a cluster
    # it must survive a node too (quorum, set on private clusters only).
    task_default_queue=os.environ.get("TEST_TASK_QUEUE", "celery"),
    task_default_queue_type=os.environ.get("TEST_CELERY_QUEUE_TYPE", "classic"),
    domain_events_delivery_limit=int(os.environ["TEST_DELIVERY_LIMIT"])
    if os.environ.get("TEST_DELIVERY_LIMIT")
    else None,
)
if os.environ.get("TEST_NO_MISSING_QUEUES"):  # tests/test_cli.py: -Q with handler queues
    app.conf.task_create_missing_queues = False
if os.environ.get("TEST_UNROUTED_MAX"):
    app.conf.domain_events_unrouted_max_length = int(os.environ["TEST_UNROUTED_MAX"])
if os.environ.get("TEST_MANAGEMENT_URL"):
    app.conf.domain_events_management_url = os.environ["TEST_MANAGEMENT_URL"]
if os.environ.get("TEST_METRICS_PORT"):  # tests/test_metrics.py: the worker's metrics port
    app.conf.domain_events_metrics_port = int(os.environ["TEST_METRICS_PORT"])
    app.conf.domain_events_metrics_depth_interval = 0.5
if os.environ.get("TEST_PUBLISH_TIMEOUT"):
    app.conf.domain_events_publish_timeout = float(os.environ["TEST_PUBLISH_TIMEOUT"])
DomainEvents(
    app,
    service=os.environ["TEST_SERVICE"],
    handlers=[h for h in os.environ["TEST_HANDLERS"].split(",") if h],
)


class Probe(DomainEvent):
    event_name: ClassVar[str] = "probe.crash"
    n: int = 0


def _marker(*parts: str) -> Path:
    return Path(os.environ["TEST_MARKER_DIR"], "-".join(parts))


def _append(name: str, event: DomainEvent | GenericEvent) -> None:
    with _marker(name, str(event.event_id)).open("a") as f:
        f.write(f"{time.time()} {os.getpid()}\n")


@domain_event_handler("probe.crash.once", retry=None)
def crash_once(event: DomainEvent) -> None:
    """The first delivery kills its pool process; the redelivery completes."""
    _append("crash_once", event)
    first = _marker("crash_once", str(event.event_id), "crashed")
    if not first.exists():
        first.touch()
        os.kill(os.getpid(), signal.SIGKILL)


@domain_event_handler("probe.crash.always", retry=None)
def crash_always(event: DomainEvent) -> None:
    """Every delivery kills its pool process: a crash loop."""
    _append("crash_always", event)
    os.kill(os.getpid(), signal.SIGKILL)


@domain_event_handler("probe.hang", retry=None)
def hang_once(event: DomainEvent) -> None:
    """The first delivery hangs (the test SIGKILLs the whole worker); the next completes."""
    _append("hang_once", event)
    first = _marker("hang_once", str(event.event_id), "started")
    if not first.exists():
        first.touch()
        time.sleep(120)


@domain_event_handler("probe.retry", retry=RetryPolicy(max_retries=2, backoff=False, countdown=1))
def flaky(event: DomainEvent) -> None:
    """Always fails: retried twice, 1 s apart, then dead-lettered."""
    _append("flaky", event)
    raise RuntimeError("flaky handler failed")


# tests/test_inbox.py: a Redis-idempotent handler whose backoff (0.5 s) is shorter than the
# inbox's lease (4 s); the test holds the claim, as a delivery that crashed would.
BUSY_INBOX = RedisInbox(
    redis.Redis.from_url(os.environ.get("DOMAIN_EVENTS_REDIS_URL", "redis://127.0.0.1:6379/0")),
    lease=timedelta(seconds=4),
    prefix=f"test:busy:{os.environ['TEST_SERVICE']}:",
)


@domain_event_handler(
    "probe.busy",
    idempotent=BUSY_INBOX,
    retry=RetryPolicy(max_retries=2, backoff=False, countdown=0.5),
)
def busy_lease(event: DomainEvent) -> None:
    _append("busy_lease", event)


@domain_event_handler("probe.fail", retry=None)
def fails(event: DomainEvent) -> None:
    """Always fails, without retries: dead-lettered at once."""
    _append("fails", event)
    raise RuntimeError("fails handler failed")


@domain_event_handler("probe.fail.later", retry=None)
def fails_later(event: DomainEvent) -> None:
    """Fails once the test creates the marker ``go`` (waits for it for at most 60 s)."""
    _append("fails_later", event)
    go, deadline = _marker("go"), time.time() + 60
    while not go.exists() and time.time() < deadline:
        time.sleep(0.05)
    raise RuntimeError("fails_later handler failed")


@domain_event_handler("probe.retry", retry=None)
def sibling(event: DomainEvent) -> None:
    """Shares the routing key with `flaky`; must run exactly once."""
    _append("sibling", event)


@app.task(name="tests.plant_marker")
def plant_marker(path: str) -> None:
    """A task no message on a handler queue may ever cause to run: it leaves a file."""
    Path(path).touch()


@domain_event_handler("probe.timeout", retry=None, time_limit=1)
def times_out(event: DomainEvent) -> None:
    """Runs past its hard time limit every time: the pool process is killed."""
    _append("times_out", event)
    time.sleep(30)


class Typed(DomainEvent):
    event_name: ClassVar[str] = "probe.typed"
    n: int


@domain_event_handler("probe.typed", "probe.untyped", retry=None)
def typed_or_not(event: DomainEvent) -> None:
    """Records every event it handles, typed (probe.typed) or untyped."""
    _append("typed_or_not", event)


@domain_event_handler("probe.untyped", retry=None)
def also_untyped(event: DomainEvent) -> None:
    """A second handler of probe.untyped (for pausing one and not the other)."""
    _append("also_untyped", event)


# CloudEvents SDK interop (tests/test_binary_mode.py): each handler records what it received.
class CeTyped(DomainEvent):
    event_name: ClassVar[str] = "probe.ce.typed"
    event_version: ClassVar[int] = 2
    n: int
    note: str


def _record_event(name: str, event: DomainEvent | GenericEvent, fields: dict[str, object]) -> None:
    seen = {
        "class": type(event).__name__,
        "id": event.event_id,
        "version": event.event_version,
        "occurred_at": event.occurred_at.isoformat(),
        **fields,
    }
    with _marker(name, str(event.event_id)).open("a") as f:
        f.write(json.dumps(seen) + "\n")


@domain_event_handler("probe.ce.typed", retry=None)
def ce_typed(event: CeTyped) -> None:
    """A typed handler: records the event's fields."""
    _record_event("ce_typed", event, {"n": event.n, "note": event.note})


@domain_event_handler("probe.ce.untyped", retry=None)
def ce_untyped(event: GenericEvent) -> None:
    """An untyped handler: records the event's data."""
    _record_event("ce_untyped", event, {"name": event.event_name, "data": event.data})


@domain_event_handler(
    "probe.ce.retry", retry=RetryPolicy(max_retries=1, backoff=False, countdown=0)
)
def ce_flaky(event: GenericEvent) -> None:
    """Always fails: retried once at once, then dead-lettered."""
    _record_event("ce_flaky", event, {"data": event.data})
    raise RuntimeError("ce_flaky handler failed")


# Transient handlers (tests/test_transient.py): each line names the worker (TEST_WORKER_TAG).
def _append_tagged(name: str, event: DomainEvent) -> None:
    # Fields: time, pid, the worker's tag, the queue the event came from.
    queue = ((current_task.request.kwargs or {}).get("meta") or {}).get("queue", "-")
    with _marker(name, str(event.event_id)).open("a") as f:
        f.write(f"{time.time()} {os.getpid()} {os.environ.get('TEST_WORKER_TAG', '-')} {queue}\n")


@domain_event_handler("probe.transient", transient=True, retry=None)
def transient_seen(event: DomainEvent) -> None:
    """Records every event this worker's own transient queue delivers."""
    _append_tagged("transient_seen", event)


@domain_event_handler(
    "probe.transient.fail",
    transient=True,
    retry=RetryPolicy(max_retries=2, backoff=False, countdown=1),
)
def transient_fails(event: DomainEvent) -> None:
    """Always fails: retried twice, 1 s apart, through this worker's queue; then dropped."""
    _append_tagged("transient_fails", event)
    raise RuntimeError("transient_fails handler failed")


# async def handlers (tests/test_async_handlers.py): each line records where the coroutine ran.
def _where() -> str:
    """``<pid> <id of the running loop> <native id of its thread> <thread name>``."""
    loop = asyncio.get_running_loop()
    thread = threading.current_thread()
    return f"{os.getpid()} {id(loop)} {threading.get_native_id()} {thread.name}"


def _record(name: str, key: str, *fields: object) -> None:
    with _marker(name, key).open("a") as f:
        f.write(" ".join([str(time.time()), *map(str, fields)]) + "\n")


async def _where_async() -> str:
    return _where()


if os.environ.get("TEST_AIO_PRESTART"):
    # The worker's main process uses a loop before it forks its pool: children must not.
    _record("aio_parent", "loop", aio_loop.run(_where_async()))


class AioPing(DomainEvent):
    event_name: ClassVar[str] = "probe.aio"
    n: int


@domain_event_handler("probe.aio", retry=None)
async def aio_ping(event: AioPing) -> None:
    """Awaits, then records the event's type and n and where it ran."""
    await asyncio.sleep(0.05)
    _record("aio_ping", str(event.event_id), type(event).__name__, event.n, _where())


@domain_event_handler(
    "probe.aio.flaky", retry=RetryPolicy(max_retries=2, backoff=False, countdown=1)
)
async def aio_flaky(event: DomainEvent) -> None:
    """Fails its first attempt; the retry, 1 s later, succeeds."""
    first = not _marker("aio_flaky", str(event.event_id)).exists()
    _record("aio_flaky", str(event.event_id), "fail" if first else "ok")
    await asyncio.sleep(0.01)
    if first:
        raise ConnectionError("aio_flaky: transient")


@domain_event_handler("probe.aio.fail", retry=RetryPolicy(max_retries=1, backoff=False))
async def aio_fails(event: DomainEvent) -> None:
    """Always fails: retried once, then dead-lettered."""
    _record("aio_fails", str(event.event_id))
    await asyncio.sleep(0.01)
    raise RuntimeError(f"aio_fails failed {event.event_id}")


@domain_event_handler("probe.aio.fail", retry=None)
async def aio_fail_sibling(event: DomainEvent) -> None:
    """Shares the routing key with aio_fails; must run exactly once."""
    _record("aio_fail_sibling", str(event.event_id))


@domain_event_handler("probe.aio.emit", retry=RetryPolicy(max_retries=1, backoff=False))
async def aio_emits(event: DomainEvent) -> None:
    """Emits probe.aio.emitted on each attempt, and fails the first one after emitting."""
    attempt = len(_lines("aio_emits", str(event.event_id))) + 1
    _record("aio_emits", str(event.event_id), attempt, current_traceparent())
    emit("probe.aio.emitted", {"after": str(event.event_id), "attempt": attempt})
    await asyncio.sleep(0.01)
    if attempt == 1:
        raise RuntimeError("aio_emits: the event emitted by this attempt must not go out")


@domain_event_handler("probe.aio.emitted", retry=None)
async def aio_receiver(event: GenericEvent) -> None:
    """Records the events aio_emits emitted, under the id of the event that caused them."""
    data = event.event_data()
    _record("aio_receiver", data["after"], data["attempt"], current_traceparent())


def _lines(name: str, key: str) -> list[str]:
    path = _marker(name, key)
    return path.read_text().splitlines() if path.exists() else []


@domain_event_handler(
    "probe.soft", retry=RetryPolicy(max_retries=1, backoff=False), soft_time_limit=1, time_limit=10
)
async def aio_soft(event: DomainEvent) -> None:
    """Awaits past its soft time limit: records the CancelledError it gets, and re-raises it."""
    _record("aio_soft", str(event.event_id), "started", _where())
    try:
        await asyncio.sleep(6)
    except asyncio.CancelledError:
        _record("aio_soft", str(event.event_id), "cancelled", _where())
        raise
    _record("aio_soft", str(event.event_id), "finished")


@domain_event_handler(
    "probe.soft", retry=RetryPolicy(max_retries=1, backoff=False), soft_time_limit=1, time_limit=10
)
def sync_soft(event: DomainEvent) -> None:
    """The plain-function twin of aio_soft: sleeps past its soft time limit."""
    _record("sync_soft", str(event.event_id), "started")
    try:
        time.sleep(6)
    except SoftTimeLimitExceeded:
        _record("sync_soft", str(event.event_id), "soft-time-limit")
        raise
    _record("sync_soft", str(event.event_id), "finished")


# Idempotent handlers (tests/test_inbox_chaos.py): each run inserts one row into a plain table
# (no unique key, so a second run of an event would show as a second row) through the inbox's
# session, sleeping a little in between so that a SIGKILL of the worker lands mid-handler.
def _inbox() -> tuple[SqlAlchemyInbox, sa.Table]:
    engine = sa.create_engine(
        os.environ.get("DOMAIN_EVENTS_DB_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    )
    metadata = sa.MetaData()
    rows = sa.Table(
        os.environ.get("TEST_INBOX_ROWS", "inbox_chaos_rows"),
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("handler", sa.String(50), nullable=False),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
    )
    inbox = SqlAlchemyInbox(
        sessionmaker(engine), metadata, os.environ.get("TEST_INBOX_TABLE", "inbox_chaos")
    )
    return inbox, rows


INBOX, INBOX_ROWS = _inbox()


def _handle_once(handler: str, event: DomainEvent) -> None:
    with _marker("inbox_started").open("a") as f:  # one short O_APPEND write per run
        f.write(f"{handler} {event.event_id} {os.getpid()}\n")
    INBOX.session.execute(
        sa.insert(INBOX_ROWS).values(handler=handler, event_id=str(event.event_id), pid=os.getpid())
    )
    time.sleep(random.uniform(0.005, 0.015))  # the transaction is open: a kill rolls it back


@domain_event_handler("probe.inbox", idempotent=INBOX, retry=None)
def inbox_a(event: DomainEvent) -> None:
    """Inserts one row per run of an event, through the inbox's session."""
    _handle_once("inbox_a", event)


@domain_event_handler("probe.inbox", idempotent=INBOX, retry=None)
def inbox_b(event: DomainEvent) -> None:
    """inbox_a's twin: each handler must see each event exactly once."""
    _handle_once("inbox_b", event)


# Batch handlers (tests/test_batch.py).
class BatchItem(DomainEvent):
    event_name: ClassVar[str] = "batch.item"
    n: int


def _record_batch(name: str, events: list[BatchItem]) -> None:
    _record(f"{name}_batch", uuid.uuid4().hex, len(events), os.getpid())
    for event in events:
        _append(name, event)


@domain_event_handler(
    "batch.item",
    batch=Batch(max_size=50, max_wait=0.5),
    retry=RetryPolicy(max_retries=1, backoff=False, countdown=0.5),
)
def batch_sink(events: list[BatchItem]) -> None:
    """Records each batch; events whose n ends in 7 fail (alone), are retried once, then
    dead-lettered."""
    _record_batch("batch_sink", events)
    failing = [event for event in events if event.n % 10 == 7]
    if failing:
        raise BatchItemsFailed((event, RuntimeError(f"n={event.n} fails")) for event in failing)


@domain_event_handler("batch.item", retry=None)
def batch_peer(event: BatchItem) -> None:
    """A plain handler of the same events: it must run exactly once per event."""
    _append("batch_peer", event)


@domain_event_handler("batch.slow", batch=Batch(max_size=20, max_wait=2.0), retry=None)
def batch_slow(events: list[GenericEvent]) -> None:
    """Records the batch, then takes 3 s (the crash test kills the worker meanwhile)."""
    _record_batch("batch_slow", events)  # type: ignore[arg-type]
    time.sleep(3)
    _record("batch_slow_done", uuid.uuid4().hex, len(events))


@domain_event_handler("batch.crash", batch=Batch(max_size=10, max_wait=2.0), retry=None)
def batch_crash_once(events: list[GenericEvent]) -> None:
    """The first run kills its pool process; the whole batch comes again and completes."""
    _record_batch("batch_crash_once", events)  # type: ignore[arg-type]
    first = _marker("batch_crash_once", "crashed")
    if not first.exists():
        first.touch()
        os.kill(os.getpid(), signal.SIGKILL)


# OpenTelemetry (tests/test_otel.py): with TEST_OTEL set, every process that runs handlers
# configures an SDK tracer provider as docs/operations/tracing.md says (prefork children after
# the fork, a solo worker in its main process), exporting each span as a JSON line to
# $TEST_MARKER_DIR/spans-<pid>.jsonl for the test to read.
def _setup_tracing() -> None:
    from collections.abc import Sequence

    from opentelemetry import trace
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class JsonLinesExporter(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            with _marker("spans", f"{os.getpid()}.jsonl").open("a") as f:
                f.writelines(span.to_json(indent=None) + "\n" for span in spans)
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter()))
    trace.set_tracer_provider(provider)


if os.environ.get("TEST_OTEL"):
    from celery.concurrency import get_implementation
    from celery.concurrency.prefork import TaskPool as PreforkPool
    from celery.signals import worker_init, worker_process_init

    @worker_process_init.connect(weak=False)
    def _tracing_after_fork(**_: object) -> None:
        _setup_tracing()

    @worker_init.connect(weak=False)
    def _tracing_without_fork(sender: object, **_: object) -> None:
        if not issubclass(get_implementation(sender.pool_cls), PreforkPool):  # type: ignore[attr-defined]
            _setup_tracing()


class OtelStart(DomainEvent):
    event_name: ClassVar[str] = "otel.start"
    order: int


@domain_event_handler("otel.start", retry=None)
def otel_first(event: OtelStart) -> None:
    """Emits otel.next: the trace goes on to otel_second."""
    emit("otel.next", {"order": event.order})


@domain_event_handler("otel.next", retry=None)
def otel_second(event: GenericEvent) -> None:
    """Receives what otel_first emitted."""
    _append("otel_second", event)
