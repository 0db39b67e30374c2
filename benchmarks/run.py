"""Throughput of celery-domain-events against raw kombu and plain Celery, side by side.

::

    python -m benchmarks.run                    # N=10000, 3 repeats, the main table (~4 min)
    python -m benchmarks.run --quick            # N=1000, 1 repeat: checks the harness (<1 min)
    python -m benchmarks.run --prefetch-sweep --no-main   # solo pool, prefetch multiplier 1/4/16
    python -m benchmarks.run --metrics-pair --quick       # (c) with metrics off and on, (i)/(c)
    python -m benchmarks.run --prefetch-sweep --no-main --hub-flush   # the stall experiment

Scenarios (see benchmarks/README.md for the method and how to read the output):

(a) raw kombu: publish N persistent messages on one confirm channel (batched confirms), then
    consume them with basic.consume (prefetch 100), acking each: the broker's ceiling.
(b) plain Celery: N no-op tasks pre-published, then a real ``celery worker`` drains them.
(c) this library: N events transmitted to an exchange with 2 bound handlers (2N handler runs),
    then a real worker with the same pool drains them. (c)/(b) compares handler runs/s with
    no-op tasks/s: both do the identical side effect (bench_app.record_completion).
(d) emit()+transmit() of N events vs raw kombu batched-confirm publishing of the same bodies
    to the same exchange and routing key.
(e) the same from asyncio: emit() N events in an asyncio task, then ``await transmit_async()``,
    vs a raw aio-pika publish of the same bodies and properties on one confirm channel (every
    ``exchange.publish`` future gathered). (e)/(d) puts async and sync transmit side by side.
(f) one PostgreSQL INSERT per event: a plain handler (its own committed transaction) vs an
    idempotent one (SqlAlchemyInbox, the INSERT through ``inbox.session``), one handler per
    run, drained by a real worker (prefork -c 2) as in (c).
(g) a batch handler (Batch(max_size=500)) with the no-op body in bulk, N events drained by a
    real worker (solo and prefork -c 2), vs (a)'s raw consume of N messages: events/s against
    msg/s.
(h) the (f) plain handler's INSERT done by a batch handler: one multi-row INSERT and one commit
    per batch of 500, vs (f)'s plain handler (one INSERT and commit per event), prefork -c 2.
(i) (c) with Prometheus metrics on (``BENCH_METRICS=1``: the worker serves them on a port, in
    prometheus-client's multiprocess mode); (i)/(c) is the cost of metrics, target >= 0.95.

Workers are timed from their ``worker_ready`` signal to the last completion, both recorded by
the worker itself in Redis, so neither publishing nor polling is part of a measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import amqp
import celery
import kombu
import redis
import sqlalchemy as sa
from kombu import Connection

from celery_domain_events import DomainEvents, emit, tracing, transmit, transmit_async
from celery_domain_events.amqp.queues import declare
from celery_domain_events.extension import _aio_url
from celery_domain_events.wire import envelope

from .bench_app import (
    BATCH_HANDLER,
    BENCH_BATCH,
    DEFAULT_PG_URL,
    EVENT_NAME,
    NOOP_TASK,
    PG_BATCH_HANDLER,
    PG_HANDLERS,
    BenchHappened,
    build_app,
    pg_tables,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BROKER = os.environ.get("DOMAIN_EVENTS_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
DEFAULT_REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
DEFAULT_PG = os.environ.get("BENCH_PG_URL", DEFAULT_PG_URL)
#: The PostgreSQL sides of (f) and (h): result key -> the one handler its worker runs.
PG_SIDES = {"f.plain": PG_HANDLERS[0], "f.inbox": PG_HANDLERS[1], "h.batch": PG_BATCH_HANDLER}
#: The pool of (f) and (h).
PG_POOL = "prefork"
#: Handlers whose runs need the PostgreSQL tables.
PG_TABLE_HANDLERS = frozenset({*PG_HANDLERS, PG_BATCH_HANDLER})
#: The pools of (g), the batch no-op handler, each against (a)'s raw consume.
BATCH_POOLS = ("solo", "prefork")

#: The two pools compared; (b) and (c) always use the same one.
POOLS: dict[str, tuple[str, ...]] = {
    "solo": ("--pool", "solo"),
    "prefork": ("--pool", "prefork", "--concurrency", "2"),
}
#: Celery's default worker_prefetch_multiplier, used by the main table.
DEFAULT_PREFETCH = 4
#: Celery sizes the prefetch as concurrency x multiplier, and a solo worker started without
#: -c has the default concurrency, the CPU count, although it runs one task at a time: on
#: this 2-CPU machine "solo, x4" allows 8 unacked deliveries, as does "prefork -c 2, x4".
SOLO_CONCURRENCY = os.cpu_count() or 1
SWEEP_PREFETCH = (1, 4, 16)
#: Prefetch of the raw consumer in (a): high enough that the broker, not round trips, limits it.
RAW_PREFETCH = 100
#: A gap this long between two consecutive completions counts as a stall.
STALL_GAP = 0.1
#: Payload size that makes an event body about 400 bytes, like a small real event.
PAYLOAD = "x" * 160
#: Events per transmit() when pre-publishing for (c): bounded memory, realistic batches.
PREPUBLISH_BATCH = 1000


@dataclass
class Bench:
    """Options shared by every scenario."""

    broker_url: str
    redis_url: str
    n: int
    repeat: int
    timeout: float
    log_dir: Path
    verbose: bool = False
    #: PostgreSQL for (f) (SQLAlchemy URL).
    pg_url: str = DEFAULT_PG
    #: Extra BENCH_* variables for every worker (the --hub-flush experiment).
    extra_env: dict[str, str] = field(default_factory=dict)

    def say(self, message: str) -> None:
        if self.verbose:
            print(f"  .. {message}", file=sys.stderr, flush=True)


@dataclass
class Drain:
    """One worker draining a pre-filled queue, as the worker recorded it."""

    label: str
    expected: int
    done: int
    #: Seconds from the worker's ready signal to the last completion (or to the timeout).
    wall: float
    #: Seconds from the ready signal to the first completion.
    startup: float
    #: Longest gap between two consecutive completions, in seconds.
    max_gap: float
    #: Seconds spent in gaps longer than STALL_GAP.
    stalled: float
    timed_out: bool
    duplicates: int = 0
    #: Worker CPU (main process and pool children, user + system) per completion, in us,
    #: sampled between ready and done. On a CPU-bound 2-core box this, not wall time, is the
    #: steadier measure of what each task costs.
    cpu_us: float = float("nan")

    @property
    def rate(self) -> float:
        return self.done / self.wall if self.wall > 0 else 0.0


@dataclass
class Results:
    """Per-repeat values of every metric, plus the worker diagnostics."""

    values: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    drains: dict[str, list[Drain]] = field(default_factory=lambda: defaultdict(list))

    def add(self, key: str, value: float) -> None:
        self.values[key].append(value)

    def add_drain(self, key: str, drain: Drain) -> None:
        self.drains[key].append(drain)
        self.add(key, drain.rate)

    def median(self, key: str) -> float:
        return statistics.median(self.values[key])


# --------------------------------------------------------------------------- raw AMQP


@dataclass
class Span:
    """Wall-clock and CPU seconds (this process, user + system) of one timed publish."""

    wall: float
    cpu: float


class Stopwatch:
    """Times a block: ``with Stopwatch() as watch: ...``, then ``watch.span``."""

    def __enter__(self) -> Stopwatch:
        self._cpu = time.process_time()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.span = Span(wall=time.perf_counter() - self._wall, cpu=time.process_time() - self._cpu)


class _ConfirmCounter:
    """Counts publisher confirms, single or ``multiple``, without scanning outstanding tags."""

    def __init__(self) -> None:
        self.upto = 0  # every tag <= upto is confirmed
        self.singles: set[int] = set()  # confirmed tags above upto
        self.nacked = 0

    @property
    def confirmed(self) -> int:
        return self.upto + len(self.singles)

    def on_ack(self, tag: int, multiple: bool) -> None:
        if multiple:
            self.upto = max(self.upto, tag)
            if self.singles:
                self.singles = {t for t in self.singles if t > self.upto}
        elif tag > self.upto:
            self.singles.add(tag)

    def on_nack(self, tag: int, multiple: bool) -> None:
        self.nacked += 1
        self.on_ack(tag, multiple)


def raw_publish(
    conn: Connection,
    exchange: str,
    routing_key: str,
    bodies: Sequence[bytes],
    content_type: str,
    *,
    properties: Sequence[dict[str, Any]] | None = None,
) -> Span:
    """Publish ``bodies`` on one confirm channel and wait for every confirm; return the time.

    The same py-amqp calls amqp/confirm.py makes, without the library's bookkeeping: the floor.
    ``properties`` (one dict per body) adds AMQP properties such as Celery's task headers.
    """
    channel = conn.channel()
    try:
        channel.confirm_select()
        counter = _ConfirmCounter()
        channel.events["basic_ack"].add(counter.on_ack)
        channel.events["basic_nack"].add(counter.on_nack)
        with Stopwatch() as watch:
            for body, extra in zip(bodies, properties or itertools.repeat({}), strict=False):
                message = amqp.Message(
                    body,
                    content_type=content_type,
                    content_encoding="utf-8",
                    delivery_mode=2,
                    **extra,
                )
                channel.basic_publish(message, exchange=exchange, routing_key=routing_key)
            while counter.confirmed < len(bodies):
                conn.drain_events(timeout=30)
    finally:
        channel.close()
    if counter.nacked:
        raise RuntimeError(f"the broker nacked {counter.nacked} raw publish(es)")
    return watch.span


def raw_consume(conn: Connection, queue: str, n: int, prefetch: int) -> Span:
    """Consume ``n`` messages from ``queue`` with basic.consume, acking each; return the time."""
    channel = conn.channel()
    received = 0

    def on_message(message: Any) -> None:
        nonlocal received
        channel.basic_ack(message.delivery_tag)
        received += 1

    try:
        channel.basic_qos(0, prefetch, False)
        with Stopwatch() as watch:
            tag = channel.basic_consume(queue, callback=on_message)
            while received < n:
                conn.drain_events(timeout=30)
        channel.basic_cancel(tag)
    finally:
        channel.close()
    return watch.span


def delete_entities(broker_url: str, queues: Sequence[str], exchanges: Sequence[str]) -> None:
    """Delete queues and exchanges, ignoring ones that are gone (each on a fresh channel)."""
    with Connection(broker_url) as conn:
        ops: list[Callable[[Any], Any]] = [
            *(lambda ch, q=q: ch.queue_delete(q) for q in queues),
            *(lambda ch, x=x: ch.exchange_delete(x) for x in exchanges),
        ]
        for op in ops:
            channel = conn.channel()
            try:
                op(channel)
                channel.close()
            except conn.channel_errors:
                pass  # the broker closed the channel; the next op opens a new one


def event_bodies(n: int, service: str) -> list[bytes]:
    """``n`` bodies exactly as transmit() encodes them (with a traceparent), for raw publishes."""
    traceparent = tracing.new_traceparent()
    return [
        envelope.encode(BenchHappened(seq=i, payload=PAYLOAD), service, traceparent=traceparent)
        for i in range(n)
    ]


def scenario_raw(b: Bench, res: Results) -> None:
    """(a) raw kombu publish (batched confirms, one channel) and consume (prefetch, ack each)."""
    queue = f"bench.{uuid.uuid4().hex[:8]}.raw"
    bodies = event_bodies(b.n, "bench")
    try:
        with Connection(b.broker_url) as conn:
            conn.connect()
            conn.default_channel.queue_declare(queue, durable=True, auto_delete=False)
            publish = raw_publish(conn, "", queue, bodies, envelope.CONTENT_TYPE)
            consume = raw_consume(conn, queue, b.n, RAW_PREFETCH)
    finally:
        delete_entities(b.broker_url, [queue], [])
    # CPU of this process too: (g) compares a batch worker's CPU per event with the consume's.
    add_publishes(res, b.n, {"a.publish": publish, "a.consume": consume})
    b.say(f"(a) publish {b.n / publish.wall:,.0f}/s consume {b.n / consume.wall:,.0f}/s")


# --------------------------------------------------------------------------- (d) transmit


def scenario_transmit(b: Bench, res: Results, transmit_first: bool) -> None:
    """(d) emit()+transmit() of N events vs raw publish of the same bodies, same destination.

    No handler is bound, so both go through the events exchange and its alternate exchange to
    the unrouted queue: identical broker work. Both sides are warmed up first (connection,
    channel, declarations), and their order alternates between repeats.
    """
    uid = uuid.uuid4().hex[:8]
    env = run_env(b, uid, "events", DEFAULT_PREFETCH, handlers="")
    app = build_app(env)
    ext = DomainEvents.of(app)
    events = [BenchHappened(seq=i, payload=PAYLOAD) for i in range(b.n)]
    bodies = event_bodies(b.n, ext.settings.service)

    def timed_transmit() -> Span:
        with Stopwatch() as watch:
            for event in events:
                emit(event)
            transmit(app)
        return watch.span

    try:
        with Connection(b.broker_url) as conn:
            conn.connect()

            def timed_raw() -> Span:
                return raw_publish(
                    conn, env["BENCH_EXCHANGE"], EVENT_NAME, bodies, envelope.CONTENT_TYPE
                )

            for event in events[:10]:  # declares the exchange, opens the pooled connection
                emit(event)
            transmit(app)
            raw_publish(conn, env["BENCH_EXCHANGE"], EVENT_NAME, bodies[:10], envelope.CONTENT_TYPE)
            timings: dict[str, Span] = {}
            order = ("d.transmit", "d.raw") if transmit_first else ("d.raw", "d.transmit")
            for key in order:
                conn.default_channel.queue_purge(env["BENCH_UNROUTED"])
                gc.collect()  # both sides start with no garbage pending (see README, Method)
                timings[key] = timed_transmit() if key == "d.transmit" else timed_raw()
    finally:
        app.close()
        delete_entities(
            b.broker_url,
            [env["BENCH_UNROUTED"]],
            [env["BENCH_EXCHANGE"], env["BENCH_UNROUTED"]],
        )
    add_publishes(res, b.n, timings)
    b.say(
        f"(d) transmit {res.values['d.transmit'][-1]:,.0f}/s raw {res.values['d.raw'][-1]:,.0f}/s"
    )


def add_publishes(res: Results, n: int, timings: dict[str, Span]) -> None:
    """Record each side's rate (``<key>``) and its CPU seconds for the N events (``<key>.cpu``)."""
    for key, span in timings.items():
        res.add(key, n / span.wall)
        res.add(f"{key}.cpu", span.cpu)


# --------------------------------------------------------------------------- (e) transmit_async


@dataclass
class RawEvent:
    """What a raw publish needs of one event: the body transmit() would send, and properties."""

    body: bytes
    message_id: str
    occurred_at: Any  # datetime; pamqp writes it as the same whole seconds transmit() sends


def raw_events(n: int, service: str) -> list[RawEvent]:
    """``n`` events encoded as transmit() encodes them, with their message properties."""
    encode = envelope.encoder(service, traceparent=tracing.new_traceparent())
    raw = []
    for i in range(n):
        event = BenchHappened(seq=i, payload=PAYLOAD)
        body, event_id = encode(event)
        raw.append(RawEvent(body, event_id, event.occurred_at))
    return raw


async def raw_publish_async(
    exchange: aio_pika.abc.AbstractExchange,
    routing_key: str,
    events: Sequence[RawEvent],
    service: str,
) -> Span:
    """Publish ``events`` with aio-pika on a confirm channel, all at once; return the time.

    The fastest honest use of the client: one ``exchange.publish`` per message, every
    future gathered, so all messages are in flight before the first confirm is awaited. The
    same properties as transmit_async() (persistent, content type and encoding, message_id,
    type, timestamp, app_id) and the same ``mandatory`` (False: an unrouted queue is set).
    A nack raises ``DeliveryError`` here.
    """
    persistent = aio_pika.DeliveryMode.PERSISTENT
    content_type = envelope.CONTENT_TYPE
    with Stopwatch() as watch:
        await asyncio.gather(
            *(
                exchange.publish(
                    aio_pika.Message(
                        e.body,
                        content_type=content_type,
                        content_encoding="utf-8",
                        delivery_mode=persistent,
                        message_id=e.message_id,
                        type=routing_key,
                        timestamp=e.occurred_at,
                        app_id=service,
                    ),
                    routing_key,
                    mandatory=False,
                )
                for e in events
            )
        )
    return watch.span


def scenario_transmit_async(b: Bench, res: Results, transmit_first: bool) -> None:
    """(e) emit()+await transmit_async() of N events vs raw aio-pika, same destination.

    As (d), no handler is bound. Each repeat runs one event loop (``asyncio.run``) holding two
    connections: the library's (one per loop, opened by its first transmit_async) and the raw
    side's. Both are warmed up in that loop (connection, confirm channel, declarations) before
    either is timed, so neither timing includes connecting; both are closed at the end of the
    repeat. Each side runs in its own asyncio task, the order alternating between repeats.
    """
    uid = uuid.uuid4().hex[:8]
    env = run_env(b, uid, "events", DEFAULT_PREFETCH, handlers="")
    app = build_app(env)
    ext = DomainEvents.of(app)
    service = ext.settings.service
    exchange_name, unrouted = env["BENCH_EXCHANGE"], env["BENCH_UNROUTED"]
    events = [BenchHappened(seq=i, payload=PAYLOAD) for i in range(b.n)]
    raw = raw_events(b.n, service)

    async def timed_transmit(batch: Sequence[BenchHappened]) -> Span:
        with Stopwatch() as watch:
            for event in batch:
                emit(event)
            await transmit_async(app)
        return watch.span

    async def pair() -> dict[str, Span]:
        # The URL the library's own aio-pika connection uses.
        connection = await aio_pika.connect(_aio_url(Connection(b.broker_url)))
        try:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(exchange_name, ensure=False)
            admin = await connection.channel(publisher_confirms=False)
            queue = await admin.get_queue(unrouted, ensure=False)

            async def timed_raw(batch: Sequence[RawEvent]) -> Span:
                return await raw_publish_async(exchange, EVENT_NAME, batch, service)

            # Warm-up: the library's first transmit declares the exchange and opens the
            # loop's connection and confirm channel; the raw side publishes once too.
            await asyncio.create_task(timed_transmit(events[:10]))
            await asyncio.create_task(timed_raw(raw[:10]))
            timings: dict[str, Span] = {}
            order = ("e.transmit", "e.raw") if transmit_first else ("e.raw", "e.transmit")
            for key in order:
                await queue.purge()
                gc.collect()  # as in (d): no garbage pending from earlier scenarios
                side = timed_transmit(events) if key == "e.transmit" else timed_raw(raw)
                timings[key] = await asyncio.create_task(side)
            return timings
        finally:
            await ext.aclose()
            await connection.close()

    try:
        timings = asyncio.run(pair())
    finally:
        app.close()
        delete_entities(b.broker_url, [unrouted], [exchange_name, unrouted])
    add_publishes(res, b.n, timings)
    b.say(
        f"(e) transmit_async {res.values['e.transmit'][-1]:,.0f}/s "
        f"raw aio-pika {res.values['e.raw'][-1]:,.0f}/s"
    )


# --------------------------------------------------------------------------- workers


def run_env(
    b: Bench, uid: str, mode: str, prefetch: int, handlers: str | None = None
) -> dict[str, str]:
    """The BENCH_* environment of one run; every name is unique to the run."""
    env = {
        "BENCH_BROKER_URL": b.broker_url,
        "BENCH_REDIS_URL": b.redis_url,
        "BENCH_KEY": f"bench:{uid}",
        "BENCH_MODE": mode,
        "BENCH_TASK_QUEUE": f"bench.{uid}.tasks",
        "BENCH_PREFETCH": str(prefetch),
        "BENCH_EXCHANGE": f"bench.{uid}.events",
        "BENCH_UNROUTED": f"bench.{uid}.unrouted",
        "BENCH_SERVICE": f"b{uid}",
        "BENCH_PG_URL": b.pg_url,
        "BENCH_PG_TABLE": f"bench_{uid}_rows",
        "BENCH_INBOX_TABLE": f"bench_{uid}_inbox",
    }
    if handlers is not None:
        env["BENCH_HANDLERS"] = handlers
    return {**env, **b.extra_env}


def prepublish_tasks(app: Any, queue_name: str, n: int) -> None:
    """Publish ``n`` no-op task messages, as ``send_task`` would build them, in one batch.

    ``app.send_task`` in a loop takes ~4 s per 10k here; building the same protocol-2 messages
    with ``app.amqp.as_task_v2`` and publishing them in one confirmed batch keeps the default
    run inside its time budget. Only the worker side is measured, so this changes no result.
    """
    body = json.dumps([[], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    bodies = [body.encode()] * n
    properties = []
    for _ in range(n):
        task = app.amqp.as_task_v2(str(uuid.uuid4()), NOOP_TASK, ignore_result=True)
        properties.append({"application_headers": task.headers, **task.properties})
    with Connection(app.conf.broker_url) as conn:
        conn.connect()
        raw_publish(conn, "", queue_name, bodies, "application/json", properties=properties)


def prepublish(app: Any, mode: str, n: int) -> int:
    """Fill the queues before the worker starts; return the number of completions to expect."""
    queue_name = app.conf.task_default_queue
    with app.connection_for_write() as conn:
        app.amqp.queues[queue_name].declare(channel=conn.default_channel)
        if mode == "events":
            # Handler queues normally appear when a worker starts; declare them now so the
            # events are waiting for it.
            ext = DomainEvents.of(app)
            declare(ext.topology.worker_entities(ext.handlers), conn.default_channel)
    if mode == "plain":
        prepublish_tasks(app, queue_name, n)
        return n
    for start in range(0, n, PREPUBLISH_BATCH):
        for seq in range(start, min(n, start + PREPUBLISH_BATCH)):
            emit(BenchHappened(seq=seq, payload=PAYLOAD))
        transmit(app)
    return n * len(DomainEvents.of(app).handlers)


def start_worker(
    env: dict[str, str], pool: str, log_path: Path, uid: str
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "benchmarks.bench_app",
        "worker",
        # WARNING: per-task INFO lines would measure log formatting, not the message path.
        "--loglevel",
        "WARNING",
        "--without-mingle",
        "--without-gossip",
        "--without-heartbeat",
        "--hostname",
        f"bench-{uid}@%h",
        *POOLS[pool],
    ]
    with log_path.open("ab") as log:
        return subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so prefork children can be killed
        )


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # warm shutdown: the queues are drained by now
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _log_tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its descendants so far, from /proc (Linux)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            # Fields after the ")" that ends the command name: utime and stime are 12th, 13th.
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{current}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile (a lower bound then); without /proc the total is 0
    return total


def wait_ready(r: redis.Redis, key: str, proc: subprocess.Popen[bytes], log: Path) -> float:
    """Return the time the worker's worker_ready signal recorded."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready = r.get(f"{key}:ready")
        if ready is not None:
            return float(ready)
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with {proc.returncode}:\n{_log_tail(log)}")
        time.sleep(0.05)
    raise RuntimeError(f"the worker was not ready within 60 s:\n{_log_tail(log)}")


def wait_done(
    r: redis.Redis, key: str, expected: int, timeout: float, proc: subprocess.Popen[bytes]
) -> bool:
    """Wait until ``expected`` completions are counted; return False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if int(r.get(key) or 0) >= expected:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def analyse(label: str, ready: float, times: list[float], expected: int, end: float) -> Drain:
    """Turn the worker's completion times into a rate and its stall diagnostics."""
    times = sorted(times)
    done = min(len(times), expected)
    timed_out = len(times) < expected
    last = end if timed_out or not times else times[expected - 1]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    return Drain(
        label=label,
        expected=expected,
        done=done,
        wall=last - ready,
        startup=(times[0] - ready) if times else float("nan"),
        max_gap=max(gaps, default=0.0),
        stalled=sum(g for g in gaps if g > STALL_GAP),
        timed_out=timed_out,
        duplicates=max(0, len(times) - expected),
    )


@contextmanager
def pg_run_tables(url: str, env: dict[str, str], needed: bool) -> Iterator[None]:
    """Create the (f) tables of one run (``needed``), and drop them afterwards."""
    if not needed:
        yield
        return
    metadata, _ = pg_tables(env)
    engine = sa.create_engine(url)
    metadata.create_all(engine)
    try:
        yield
    finally:
        metadata.drop_all(engine)
        engine.dispose()


def scenario_worker(
    b: Bench,
    mode: str,
    pool: str,
    prefetch: int,
    handler: str | None = None,
    *,
    metrics: bool = False,
) -> Drain:
    """(b), (c) or one side of (f), (g), (h): pre-fill the queue(s), start a worker, time it.

    ``handler`` ((f), (g), (h)): the worker runs only this handler; for the PostgreSQL ones the
    tables are created before it starts and dropped afterwards.
    """
    uid = uuid.uuid4().hex[:8]
    env = run_env(b, uid, mode, prefetch, handlers=handler)
    if metrics:
        env["BENCH_METRICS"] = "1"
    key = env["BENCH_KEY"]
    label = f"{'i' if metrics else 'c' if mode == 'events' else 'b'}.{pool}.pf{prefetch}"
    if handler is not None:
        label = f"{handler}.{pool}"
    log_path = b.log_dir / f"{label}-{uid}.log"
    app = build_app(env)
    r = redis.Redis.from_url(b.redis_url)
    queues = [env["BENCH_TASK_QUEUE"]]
    exchanges = [env["BENCH_TASK_QUEUE"]]  # Celery's default exchange is named after the queue
    if mode == "events":
        ext = DomainEvents.of(app)
        for spec in ext.handlers:
            queues += [
                ext.topology.handler_queue_name(spec),
                ext.topology.handler_queue_name(spec) + ".dlq",
            ]
        queues.append(env["BENCH_UNROUTED"])
        exchanges += [
            env["BENCH_EXCHANGE"],
            env["BENCH_EXCHANGE"] + ".retry",
            env["BENCH_UNROUTED"],
        ]
    with pg_run_tables(b.pg_url, env, handler in PG_TABLE_HANDLERS):
        try:
            started = time.monotonic()
            expected = prepublish(app, mode, b.n)
            b.say(
                f"{label}: pre-published {expected} completions' worth "
                f"in {time.monotonic() - started:.1f} s"
            )
            proc = start_worker(env, pool, log_path, uid)
            try:
                ready = wait_ready(r, key, proc, log_path)
                cpu_start, count_start = tree_cpu(proc.pid), int(r.get(key) or 0)
                finished = wait_done(r, key, expected, b.timeout, proc)
                end = time.time()
                cpu_end, count_end = tree_cpu(proc.pid), int(r.get(key) or 0)
            finally:
                stop_worker(proc)
            times = [float(t) for t in r.lrange(f"{key}:times", 0, -1)]
            drain = analyse(label, ready, times, expected, end)
            if count_end > count_start and cpu_end > 0:
                drain.cpu_us = (cpu_end - cpu_start) / (count_end - count_start) * 1e6
            if drain.duplicates:
                print(
                    f"WARNING {label}: {drain.duplicates} completion(s) more than expected "
                    "(redeliveries?)",
                    file=sys.stderr,
                )
            if not finished:
                print(
                    f"WARNING {label}: {drain.done}/{expected} done within {b.timeout:g} s "
                    f"(worker log: {log_path})",
                    file=sys.stderr,
                )
            b.say(
                f"{label}: {drain.rate:,.0f}/s, startup {drain.startup:.2f} s, "
                f"max gap {drain.max_gap * 1000:.0f} ms, stalled {drain.stalled:.2f} s, "
                f"worker CPU {drain.cpu_us:.0f} us/task"
            )
            return drain
        finally:
            app.close()
            r.delete(key, f"{key}:times", f"{key}:ready")
            delete_entities(b.broker_url, queues, exchanges)


# --------------------------------------------------------------------------- report

MAIN_ROWS = (
    ("a.publish", "(a) raw kombu publish, batched confirms", "msg/s"),
    ("a.consume", f"(a) raw kombu consume, prefetch {RAW_PREFETCH}, ack each", "msg/s"),
    ("b.solo", "(b) plain Celery no-op, solo", "tasks/s"),
    ("c.solo", "(c) domain events, solo, 2 handlers", "runs/s"),
    ("b.prefork", "(b) plain Celery no-op, prefork -c 2", "tasks/s"),
    ("c.prefork", "(c) domain events, prefork -c 2", "runs/s"),
    ("i.solo", "(i) = (c) solo, metrics on", "runs/s"),
    ("i.prefork", "(i) = (c) prefork -c 2, metrics on", "runs/s"),
    ("d.transmit", "(d) emit()+transmit(), one batch", "ev/s"),
    ("d.raw", "(d) raw kombu publish, same bodies", "msg/s"),
    ("e.transmit", "(e) emit()+await transmit_async(), one batch", "ev/s"),
    ("e.raw", "(e) raw aio-pika publish, same bodies", "msg/s"),
    ("f.plain", "(f) PostgreSQL INSERT, plain, prefork -c 2", "runs/s"),
    ("f.inbox", "(f) same INSERT, idempotent (inbox)", "runs/s"),
    ("g.solo", f"(g) batch no-op handler, solo, {BENCH_BATCH.max_size}/batch", "ev/s"),
    ("g.prefork", "(g) batch no-op handler, prefork -c 2", "ev/s"),
    ("h.batch", "(h) PostgreSQL bulk INSERT, batch, prefork", "ev/s"),
)
#: (title, numerator, denominator, target or None for an informative ratio).
MAIN_RATIOS: tuple[tuple[str, str, str, float | None], ...] = (
    ("(c)/(b) solo", "c.solo", "b.solo", 1.0),
    ("(c)/(b) prefork -c 2", "c.prefork", "b.prefork", 1.0),
    ("(i)/(c) metrics on/off solo", "i.solo", "c.solo", 0.95),
    ("(i)/(c) metrics on/off prefork", "i.prefork", "c.prefork", 0.95),
    ("(d) transmit/raw", "d.transmit", "d.raw", 0.8),
    ("(e) async transmit/raw aio-pika", "e.transmit", "e.raw", 0.8),
    ("(e)/(d) async/sync transmit", "e.transmit", "d.transmit", None),
    ("(e)/(d) raw aio-pika/raw kombu", "e.raw", "d.raw", None),
    ("(f) inbox/plain prefork -c 2", "f.inbox", "f.plain", 0.85),
    ("(g) batch solo/raw consume", "g.solo", "a.consume", 0.5),
    ("(g) batch prefork/raw consume", "g.prefork", "a.consume", 0.5),
    ("(h) batch/per-event INSERT", "h.batch", "f.plain", 5.0),
)
#: CPU per task: (title, A, B); the ratio is A/B, so above 1.0 means B costs less per task.
#: Worker rows use the worker's CPU; (a) consume that of this process (it is the consumer).
CPU_RATIOS = (
    ("solo (b)/(c)", "b.solo", "c.solo"),
    ("prefork (b)/(c)", "b.prefork", "c.prefork"),
    ("metrics off/on (c)/(i), solo", "c.solo", "i.solo"),
    ("metrics off/on (c)/(i), prefork", "c.prefork", "i.prefork"),
    ("(f) plain/inbox, prefork", "f.plain", "f.inbox"),
    ("(g) raw consume/batch, solo", "a.consume", "g.solo"),
    ("(g) raw consume/batch, prefork", "a.consume", "g.prefork"),
    ("(h) per-event/batch, prefork", "f.plain", "h.batch"),
)
#: Publisher CPU of this process: (title, side A, side B); the ratio is B/A, so below 1.0 means
#: A costs more CPU than B (for (d) and (e): what the library adds to the raw publish).
PUBLISHER_CPU = (
    ("(d) A transmit(), B raw kombu", "d.transmit", "d.raw"),
    ("(e) A transmit_async(), B raw aio-pika", "e.transmit", "e.raw"),
    ("A transmit_async(), B transmit()", "e.transmit", "d.transmit"),
    ("A raw aio-pika, B raw kombu", "e.raw", "d.raw"),
)


def _fmt_runs(values: Sequence[float], digits: int = 0) -> str:
    return "[" + ", ".join(f"{v:,.{digits}f}" for v in values) + "]"


def print_table(res: Results, rows: Sequence[tuple[str, str, str]], n: int = 0) -> None:
    """The rows' medians and runs; ``cpu/task`` is per event of this process for publishers."""
    print(
        f"{'scenario':<44} {'median':>9} {'unit':<8} {'max gap':>8} {'stalled':>8} "
        f"{'startup':>8} {'cpu/task':>9}  runs"
    )
    for key, title, unit in rows:
        if key not in res.values:
            continue
        drains = res.drains.get(key)
        if drains:
            diag = (
                f"{statistics.median(d.max_gap for d in drains) * 1000:>6.0f}ms "
                f"{statistics.median(d.stalled for d in drains):>7.2f}s "
                f"{statistics.median(d.startup for d in drains):>7.2f}s "
                f"{statistics.median(d.cpu_us for d in drains):>7.0f}us"
            )
            if any(d.timed_out for d in drains):
                diag += "  TIMED OUT"
        elif n and f"{key}.cpu" in res.values:  # a publisher: CPU of this process per event
            cpu_us = res.median(f"{key}.cpu") / n * 1e6
            diag = f"{'-':>8} {'-':>8} {'-':>8} {cpu_us:>7.0f}us"
        else:
            diag = f"{'-':>8} {'-':>8} {'-':>8} {'-':>9}"
        print(
            f"{title:<44} {res.median(key):>9,.0f} {unit:<8} {diag}  {_fmt_runs(res.values[key])}"
        )


def cpu_per_task(res: Results, key: str, n: int) -> list[float] | None:
    """CPU us per task of each repeat: the worker's for a worker row, else this process's."""
    if key in res.drains:
        return [d.cpu_us for d in res.drains[key]]
    if n and f"{key}.cpu" in res.values:
        return [cpu / n * 1e6 for cpu in res.values[f"{key}.cpu"]]
    return None


def cpu_ratio(res: Results, a: str, b: str, n: int) -> dict[str, Any] | None:
    """A/B of CPU per task: of the medians, per repeat (paired) and their median."""
    a_cpu, b_cpu = cpu_per_task(res, a, n), cpu_per_task(res, b, n)
    if a_cpu is None or b_cpu is None:
        return None
    paired = [x / y for x, y in zip(a_cpu, b_cpu, strict=False)]
    return {
        "of_medians": statistics.median(a_cpu) / statistics.median(b_cpu),
        "paired": statistics.median(paired),
        "per_repeat": paired,
    }


def print_cpu_ratios(res: Results, pairs: Sequence[tuple[str, str, str]], n: int = 0) -> None:
    """CPU per task, A/B: for (b)/(c), 1.0 means a handler run costs what a no-op task costs.

    Same direction as the throughput ratio, and what it converges to when the worker is
    CPU-bound, but much less sensitive to other load on the machine.
    """
    print(f"\n{'worker CPU per task A/B':<30} {'of medians':>10}  per repeat (paired)")
    for title, a, b in pairs:
        value = cpu_ratio(res, a, b, n)
        if value is None:
            continue
        print(f"{title:<30} {value['of_medians']:>10.2f}  {_fmt_runs(value['per_repeat'], 2)}")


def ratio(res: Results, num: str, den: str) -> dict[str, Any] | None:
    """``num``/``den``: ratio of the medians, per-repeat (paired) ratios and their median."""
    if num not in res.values or den not in res.values:
        return None
    paired = [a / c for a, c in zip(res.values[num], res.values[den], strict=False)]
    return {
        "of_medians": res.median(num) / res.median(den),
        "paired": statistics.median(paired),
        "per_repeat": paired,
    }


def all_ratios(res: Results, n: int) -> dict[str, dict[str, Any]]:
    """Every ratio of the main table, for --json: throughput, publisher CPU, worker CPU."""
    ratios: dict[str, dict[str, Any]] = {}
    for title, num, den, target in MAIN_RATIOS:
        value = ratio(res, num, den)
        if value is not None:
            ratios[title] = {**value, "target": target}
    for title, a, b in PUBLISHER_CPU:
        value = ratio(res, f"{b}.cpu", f"{a}.cpu")
        if value is not None:
            ratios[f"publisher CPU B/A, {title}"] = {**value, "target": None}
    for title, a, b in CPU_RATIOS:
        value = cpu_ratio(res, a, b, n)
        if value is not None:
            ratios[f"worker CPU per task A/B, {title}"] = {**value, "target": None}
    return ratios


def print_publisher_cpu(res: Results, pairs: Sequence[tuple[str, str, str]]) -> None:
    """CPU seconds of the benchmark process per run of N events: A, B (medians) and B/A.

    ``time.process_time()`` (user + system, all threads) around exactly what the throughput
    times; the broker's CPU is not in it. B/A = 1.0 means A costs the publishing process what
    B costs; below 1.0, A costs more.
    """
    print(
        f"\n{'publisher CPU, s per run of N':<40} {'A':>6} {'B':>6} "
        f"{'B/A':>10} {'paired':>7}  per repeat (paired)"
    )
    for title, a, b in pairs:
        value = ratio(res, f"{b}.cpu", f"{a}.cpu")
        if value is None:
            continue
        print(
            f"{title:<40} {res.median(f'{a}.cpu'):>6.3f} {res.median(f'{b}.cpu'):>6.3f} "
            f"{value['of_medians']:>10.2f} {value['paired']:>7.2f}  "
            f"{_fmt_runs(value['per_repeat'], 2)}"
        )


def print_ratios(res: Results, ratios: Sequence[tuple[str, str, str, float | None]]) -> None:
    """Ratio of the medians and median of the paired ratios, each judged against the target.

    The two halves of a pair ran back to back, so paired ratios cancel slow drift; when only
    one of the two meets the target, the run was too noisy to conclude. A ratio without a
    target is informative only.
    """
    print(f"\n{'ratio':<30} {'of medians':>10} {'paired':>7}  {'target':<8} per repeat (paired)")
    for title, num, den, target in ratios:
        computed = ratio(res, num, den)
        if computed is None:
            continue
        value, paired_median, paired = (
            computed["of_medians"],
            computed["paired"],
            computed["per_repeat"],
        )
        if target is None:
            print(
                f"{title:<30} {value:>10.2f} {paired_median:>7.2f}  {'-':<8} {_fmt_runs(paired, 2)}"
            )
            continue
        met = (value >= target, paired_median >= target)
        verdict = "ok" if all(met) else "BELOW" if not any(met) else "unclear (noisy)"
        print(
            f"{title:<30} {value:>10.2f} {paired_median:>7.2f}  >= {target:<5} "
            f"{_fmt_runs(paired, 2)} {verdict}"
        )


# --------------------------------------------------------------------------- main


def source_digest() -> str:
    """A short hash of the library's sources.

    Workers import the sources afresh in every run, so a change in the middle of a benchmark
    (someone's commit or edit) would mix two versions; main() warns when the hash moved.
    """
    digest = hashlib.sha1(usedforsecurity=False)
    for path in sorted((ROOT / "celery_domain_events").rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:8]


def code_version() -> str:
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except OSError:
        described = ""
    return (
        f"library {described or '?'} (sources {source_digest()}), "
        f"celery {celery.__version__}, kombu {kombu.__version__}"
    )


def run_main(b: Bench, res: Results) -> None:
    for i in range(b.repeat):
        print(f"repeat {i + 1}/{b.repeat} ...", file=sys.stderr, flush=True)
        # (g) runs next to (a), before it in one repeat and after it in the next.
        if i % 2 == 1:
            scenario_batch_noop(b, res, BATCH_POOLS[::-1])
        scenario_raw(b, res)
        if i % 2 == 0:
            scenario_batch_noop(b, res, BATCH_POOLS)
        for pool in POOLS:
            # Alternate which of (b) and (c) goes first, so slow drift on a shared machine
            # does not always favour the same one.
            modes = ("plain", "events", "metrics")
            for mode in modes if i % 2 == 0 else reversed(modes):
                drain = scenario_worker(
                    b,
                    "plain" if mode == "plain" else "events",
                    pool,
                    DEFAULT_PREFETCH,
                    metrics=mode == "metrics",
                )
                res.add_drain(
                    {"plain": "b", "events": "c", "metrics": "i"}[mode] + f".{pool}", drain
                )
        scenario_transmit(b, res, transmit_first=i % 2 == 0)
        scenario_transmit_async(b, res, transmit_first=i % 2 == 0)
        # (f) plain, (f) inbox and (h) batch. (h) is paired with (f)'s plain run of the same
        # repeat, always next to it: (h) batch, (f) plain, (f) inbox, then the reverse, so
        # both pairs alternate which side goes first.
        sides = ("h.batch", "f.plain", "f.inbox")
        for side in sides if i % 2 == 0 else reversed(sides):
            drain = scenario_worker(b, "events", PG_POOL, DEFAULT_PREFETCH, PG_SIDES[side])
            res.add_drain(side, drain)


def scenario_batch_noop(b: Bench, res: Results, pools: Sequence[str]) -> None:
    """(g) the batch no-op handler with each of ``pools``, N events each (solo next to (a))."""
    for pool in pools:
        drain = scenario_worker(b, "events", pool, DEFAULT_PREFETCH, BATCH_HANDLER)
        res.add_drain(f"g.{pool}", drain)


METRICS_ROWS = tuple(row for row in MAIN_ROWS if row[0][0] in "ci")
METRICS_RATIOS = tuple(r for r in MAIN_RATIOS if r[1].startswith("i."))
#: Worker CPU per run, metrics off/on: below 1.0, a run costs more CPU with metrics on.
METRICS_CPU_RATIOS = tuple(r for r in CPU_RATIOS if r[2].startswith("i."))


PER_EVENT_ROWS = tuple(row for row in MAIN_ROWS if row[0][0] in "bc")
PER_EVENT_RATIOS = tuple(r for r in MAIN_RATIOS if r[2].startswith("b."))
#: Worker CPU per task, no-op/handler run: below 1.0, a handler run costs more CPU.
PER_EVENT_CPU_RATIOS = tuple(r for r in CPU_RATIOS if r[1].startswith("b."))


@dataclass(frozen=True)
class Pair:
    """A pair run: two scenarios alone, with more repeats than the full run affords."""

    #: What it compares, for the progress lines and the table's title.
    title: str
    #: Its two sides: (label prefix, worker mode, metrics on).
    sides: tuple[tuple[str, str, bool], tuple[str, str, bool]]
    rows: tuple[tuple[str, str, str], ...]
    ratios: tuple[tuple[str, str, str, float | None], ...]
    cpu_ratios: tuple[tuple[str, str, str], ...]


PAIRS = {
    "metrics": Pair(
        "metrics on/off",
        (("c", "events", False), ("i", "events", True)),
        METRICS_ROWS,
        METRICS_RATIOS,
        METRICS_CPU_RATIOS,
    ),
    "per-event": Pair(
        "no-op tasks/handler runs",
        (("b", "plain", False), ("c", "events", False)),
        PER_EVENT_ROWS,
        PER_EVENT_RATIOS,
        PER_EVENT_CPU_RATIOS,
    ),
}


def run_pair(b: Bench, res: Results, pair: Pair) -> None:
    """The two sides of ``pair`` alone, with each pool, alternating which goes first."""
    title, sides = pair.title, pair.sides
    for i in range(b.repeat):
        print(f"{title}, repeat {i + 1}/{b.repeat} ...", file=sys.stderr, flush=True)
        for pool in POOLS:
            for prefix, mode, metrics in sides if i % 2 == 0 else sides[::-1]:
                drain = scenario_worker(b, mode, pool, DEFAULT_PREFETCH, metrics=metrics)
                res.add_drain(f"{prefix}.{pool}", drain)


def run_sweep(b: Bench, res: Results) -> None:
    for i in range(b.repeat):
        print(f"prefetch sweep, repeat {i + 1}/{b.repeat} ...", file=sys.stderr, flush=True)
        for prefetch in SWEEP_PREFETCH:
            modes = ("plain", "events") if i % 2 == 0 else ("events", "plain")
            for mode in modes:
                drain = scenario_worker(b, mode, "solo", prefetch)
                res.add_drain(f"{'c' if mode == 'events' else 'b'}.solo.pf{prefetch}", drain)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--events", type=int, help="N per scenario (default 10000; quick 1000)")
    parser.add_argument("--repeat", type=int, help="runs per scenario (default 3; quick 1)")
    parser.add_argument("--quick", action="store_true", help="small N, one repeat: a smoke test")
    parser.add_argument(
        "--prefetch-sweep",
        action="store_true",
        help=f"also run (b) and (c) with the solo pool at prefetch {SWEEP_PREFETCH}",
    )
    parser.add_argument("--no-main", action="store_true", help="skip the main table")
    parser.add_argument(
        "--metrics-pair",
        action="store_true",
        help="only (c) and (i): the handler scenario, metrics off and on",
    )
    parser.add_argument(
        "--per-event-pair",
        action="store_true",
        help="only (b) and (c): plain no-op tasks and handler runs",
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="also count instructions per task with valgrind's callgrind (noise-free; ~5 min; "
        "see benchmarks/instructions.py)",
    )
    parser.add_argument(
        "--hub-flush",
        action="store_true",
        help="EXPERIMENT: workers flush kombu's ready callbacks before polling "
        "(bench_app.FlushReadyBeforePoll), to test the solo-pool stall diagnosis",
    )
    parser.add_argument(
        "--timeout", type=float, help="seconds a worker may take to drain (default 120; quick 30)"
    )
    parser.add_argument("--broker", default=DEFAULT_BROKER, help="AMQP URL (RabbitMQ)")
    parser.add_argument("--redis", default=DEFAULT_REDIS, help="Redis URL for the counters")
    parser.add_argument(
        "--pg", default=DEFAULT_PG, help="PostgreSQL (SQLAlchemy URL) for the (f) handlers"
    )
    parser.add_argument("--json", type=Path, help="also write every value to this JSON file")
    parser.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    args = parser.parse_args(argv)
    if args.events is None:
        args.events = 1000 if args.quick else 10000
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.timeout is None:
        args.timeout = 30.0 if args.quick else 120.0
    return args


def bench_of(args: argparse.Namespace) -> Bench:
    """The run's settings, from the command line."""
    log_dir = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    return Bench(
        broker_url=args.broker,
        redis_url=args.redis,
        n=args.events,
        repeat=args.repeat,
        timeout=args.timeout,
        log_dir=log_dir,
        verbose=args.verbose,
        extra_env={"BENCH_HUB_FLUSH": "1"} if args.hub_flush else {},
        pg_url=args.pg,
    )


def pair_main(args: argparse.Namespace, pair: Pair) -> int:
    """``--metrics-pair``, ``--per-event-pair``: the pair's scenarios only, rows and ratios."""
    b = bench_of(args)
    redis.Redis.from_url(b.redis_url).ping()
    res = Results()
    digest = source_digest()
    run_pair(b, res, pair)
    print(f"\n{pair.title}: N={b.n}, {b.repeat} repeat(s), medians; {code_version()}")
    if source_digest() != digest:
        print("WARNING: the library's sources changed during the run; results mix versions")
    print_table(res, pair.rows, b.n)
    print_ratios(res, pair.ratios)
    print_cpu_ratios(res, pair.cpu_ratios, b.n)
    if args.json:
        write_json(args.json, b, res, None)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.metrics_pair:
        return pair_main(args, PAIRS["metrics"])
    if args.per_event_pair:
        return pair_main(args, PAIRS["per-event"])
    return run_all(args)


def run_all(args: argparse.Namespace) -> int:
    """The main table, and the runs the options add."""
    b = bench_of(args)
    log_dir = b.log_dir
    redis.Redis.from_url(b.redis_url).ping()  # fail now, not after the first worker run
    if not args.no_main:
        with sa.create_engine(b.pg_url).connect() as conn:  # and PostgreSQL, for (f)
            conn.execute(sa.text("SELECT 1"))
    res = Results()
    version = code_version()
    digest = source_digest()
    started = time.monotonic()
    if not args.no_main:
        run_main(b, res)
    if args.prefetch_sweep:
        run_sweep(b, res)
    counts = None
    if args.instructions:
        from . import instructions

        if not instructions.available():
            raise SystemExit("--instructions needs valgrind (callgrind_control) on PATH")
        print("instruction counts (callgrind) ...", file=sys.stderr, flush=True)
        counts = instructions.run_instructions(b)
    elapsed = time.monotonic() - started

    print(
        f"\ncelery-domain-events benchmarks: N={b.n} per scenario, {b.repeat} repeat(s), "
        f"medians; {os.cpu_count()} CPUs; {elapsed:.0f} s; worker logs in {log_dir}"
    )
    print(version)
    if source_digest() != digest:
        print("WARNING: the library's sources changed during the run; results mix versions")
    if args.hub_flush:
        print("EXPERIMENT --hub-flush: workers run bench_app.FlushReadyBeforePoll")
    if not args.no_main:
        print_table(res, MAIN_ROWS, b.n)
        print_ratios(res, MAIN_RATIOS)
        print_cpu_ratios(res, CPU_RATIOS, b.n)
        print_publisher_cpu(res, PUBLISHER_CPU)
    if args.prefetch_sweep:
        print(
            f"\nsolo pool by worker_prefetch_multiplier x{{1,4,16}} = unacked deliveries "
            f"(N={b.n}; (c) = 2N handler runs)"
        )
        sweep_rows = []
        sweep_ratios = []
        for p in SWEEP_PREFETCH:
            sweep_rows += [
                (
                    f"b.solo.pf{p}",
                    f"(b) plain no-op, solo, x{p} = {SOLO_CONCURRENCY * p}",
                    "tasks/s",
                ),
                (
                    f"c.solo.pf{p}",
                    f"(c) domain events, solo, x{p} = {SOLO_CONCURRENCY * p}",
                    "runs/s",
                ),
            ]
            sweep_ratios.append(
                (f"(c)/(b) solo prefetch x{p}", f"c.solo.pf{p}", f"b.solo.pf{p}", 1.0)
            )
        print_table(res, sweep_rows)
        print_ratios(res, sweep_ratios)
        print_cpu_ratios(
            res,
            [(f"solo prefetch x{p}", f"b.solo.pf{p}", f"c.solo.pf{p}") for p in SWEEP_PREFETCH],
        )
    if counts is not None:
        from . import instructions

        instructions.print_instructions(counts)
    if args.json:
        write_json(args.json, b, res, counts)
    return 0


def write_json(path: Path, b: Bench, res: Results, counts: Any) -> None:
    """Every value, drain and ratio of the run (and the instruction counts, if any)."""
    path.write_text(
        json.dumps(
            {
                "n": b.n,
                "repeat": b.repeat,
                "values": res.values,
                "drains": {k: [asdict(d) for d in v] for k, v in res.drains.items()},
                "ratios": all_ratios(res, b.n),
                "instructions": counts,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
