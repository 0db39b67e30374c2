"""Details of Celery, kombu, py-amqp and Django that this library relies on beyond their API.

Each one lives here, behind a function of ours, with a canary test in ``tests/test_compat.py``
that fails on an upgrade that changes it. No other module touches a private name of theirs.

- py-amqp: the table decoder and the Basic properties decoder (hardened against hostile
  headers), the encoder (header sizes), ``Channel._basic_publish`` (publish without waiting
  for each confirm).
- kombu: ``Connection._connection`` (the transport connection a confirm channel belongs to);
  ``Message._state`` (a batch's task message settles through its deliveries, then marks itself).
- Celery: which of ``app.amqp.queues`` its task consumer reads (``consume_from``); the worker's
  task consumer and remote control (``consume``, ``cancel_task_queue``,
  ``add_task_queue``); a task message whose body is already decoded (``content_type=None`` in
  ``celery.app.trace``); ``@shared_task``'s registration on every app (``_get_active_apps``,
  ``_finalize_mutex``, ``_task_from_fun``); the task being traced (``celery._state``); the
  current app slot that ``celery.contrib.testing`` changes; the app behind the
  ``current_app`` proxy (``Proxy._get_current_object``); a cold shutdown in progress
  (``celery.worker.state.should_terminate``); which pools hand a task its arguments as the
  same objects (every pool but prefork: ``runs_in_process``).
- Django: ``connection.run_on_commit`` entries ``(savepoint ids, func, robust)``.
- prometheus-client: ``prometheus_client.values.ValueClass`` (chosen once, when it is first
  imported, from ``PROMETHEUS_MULTIPROC_DIR``) and ``values.MultiProcessValue``; a histogram
  child's ``_upper_bounds``, ``_buckets`` and ``_sum`` (to add many observations at once).
- OpenTelemetry: ``opentelemetry.trace._TRACER_PROVIDER`` (whether a global tracer provider is
  set, without the environment lookup ``get_tracer_provider()`` makes on every call).
- CPython: ``_sha1``, its built-in SHA-1 (``hashlib.sha1`` is OpenSSL's where it is linked,
  and OpenSSL 3 looks the algorithm up on every call: about 4 us per task id in a worker).
- SQLAlchemy: ``sqlalchemy.util.await_only`` (await a coroutine from the sync code an
  ``AsyncSession`` runs in its greenlet; documented for dialect authors, not in ``__all__``).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from struct import unpack_from
from typing import TYPE_CHECKING, Any, TypeVar

from amqp import serialization
from celery import _state as celery_state
from celery.worker import state as celery_worker_state
from kombu.exceptions import MessageStateError
from kombu.message import Message

if TYPE_CHECKING:
    from celery import Celery, Task

T = TypeVar("T")

__all__ = [
    "MAX_DECODED_TABLE_DEPTH",
    "SUMMED_METRIC_FILES",
    "UNDECODABLE_HEADER",
    "add_unconsumed_queue",
    "app_behind_proxy",
    "batch_task_message",
    "compact_metric_files",
    "current_traced_task",
    "decoded_task_message",
    "django_append_on_commit",
    "django_on_commit_funcs",
    "django_remove_on_commit",
    "encoded_table_size",
    "harden_amqp_decoder",
    "histogram_add",
    "histogram_bounds",
    "on_every_app",
    "otel_provider_set",
    "prometheus_multiprocess_values",
    "restored_current_app",
    "route_queue_control",
    "runs_in_process",
    "sha1",
    "sqlalchemy_await",
    "start_with_task_consumer",
    "task_from_fun",
    "transport_connection",
    "unconfirmed_basic_publish",
    "worker_terminating",
]

#: Nesting of AMQP tables and arrays that py-amqp decodes; deeper ones stay raw bytes.
MAX_DECODED_TABLE_DEPTH = 32


def encoded_table_size(table: Mapping[str, Any]) -> int:
    """Return the bytes ``table`` takes as AMQP application headers (py-amqp's encoder).

    Raises:
        Exception: the table cannot be encoded (a key over 255 bytes, an unsupported value).
    """
    return len(serialization.dumps("F", (table,)))


_TABLE, _ARRAY = ord("F"), ord("A")
_local = threading.local()
_original_read_item: Callable[[Any, int], tuple[Any, int]] | None = None


def _read_item_bounded(buf: Any, offset: int) -> tuple[Any, int]:
    # py-amqp decodes tables and arrays by recursion with no depth limit: a header nested a
    # thousand levels deep (7 KB, which RabbitMQ forwards) raises RecursionError inside the
    # connection's frame handler, and Celery exits with "Unrecoverable error" on every restart.
    # Past MAX_DECODED_TABLE_DEPTH the value is skipped by its length prefix and returned as
    # its raw bytes, so the frame stays in sync and the message is delivered, to be refused.
    assert _original_read_item is not None
    if buf[offset] not in (_TABLE, _ARRAY):
        return _original_read_item(buf, offset)
    depth: int = getattr(_local, "depth", 0)
    if depth >= MAX_DECODED_TABLE_DEPTH:
        (length,) = unpack_from(">I", buf, offset + 1)
        end = offset + 5 + length
        return bytes(buf[offset:end]), end
    _local.depth = depth + 1
    try:
        return _original_read_item(buf, offset)
    finally:
        _local.depth = depth


#: Set instead of the application headers when py-amqp cannot decode them: the error's text.
UNDECODABLE_HEADER = "x-undecodable-headers"
# basic.properties in wire order: (flag bit, name, kind); kind "s" short string, "F" table,
# "o" octet, "Q" 64-bit timestamp (AMQP 0-9-1, section 4.2.6 / py-amqp's PROPERTIES).
_BASIC_PROPERTIES = (
    (0x8000, "content_type", "s"),
    (0x4000, "content_encoding", "s"),
    (0x2000, "application_headers", "F"),
    (0x1000, "delivery_mode", "o"),
    (0x0800, "priority", "o"),
    (0x0400, "correlation_id", "s"),
    (0x0200, "reply_to", "s"),
    (0x0100, "expiration", "s"),
    (0x0080, "message_id", "s"),
    (0x0040, "timestamp", "Q"),
    (0x0020, "type", "s"),
    (0x0010, "user_id", "s"),
    (0x0008, "app_id", "s"),
    (0x0004, "cluster_id", "s"),
)
_original_decode_properties: Callable[[Any, int], tuple[dict[str, Any], int]] | None = None


def _salvage_properties(buf: Any, offset: int, error: Exception) -> tuple[dict[str, Any], int]:
    # The content-header frame is a buffer of its own: reading it again, tolerantly, keeps the
    # connection in sync. Text that is not UTF-8 is replaced; a header table that does not
    # decode is replaced by one header naming the error, so the message can be refused.
    properties: dict[str, Any] = {}
    headers: dict[str, Any] = {}
    try:
        (flags,) = unpack_from(">H", buf, offset)
        offset += 2
        for bit, name, kind in _BASIC_PROPERTIES:
            if not flags & bit:
                continue
            if kind == "s":
                size = buf[offset]
                properties[name] = bytes(buf[offset + 1 : offset + 1 + size]).decode(
                    "utf-8", "replace"
                )
                offset += 1 + size
            elif kind == "o":
                properties[name] = buf[offset]
                offset += 1
            elif kind == "Q":
                (properties[name],) = unpack_from(">Q", buf, offset)
                offset += 8
            else:
                (size,) = unpack_from(">I", buf, offset)
                try:
                    headers = serialization.loads("F", buf, offset)[0][0]
                except Exception as table_error:
                    headers = {UNDECODABLE_HEADER: repr(table_error)[:200]}
                offset += 4 + size
    except Exception as frame_error:
        headers = {UNDECODABLE_HEADER: repr(frame_error)[:200]}
    headers.setdefault(UNDECODABLE_HEADER, repr(error)[:200])
    properties["application_headers"] = headers
    return properties, offset


def _decode_properties_safely(buf: Any, offset: int) -> tuple[dict[str, Any], int]:
    # py-amqp turns table values into Python objects that can fail on values RabbitMQ
    # forwards: a timestamp past year 9999 (OverflowError, ValueError, or OSError, which
    # kombu takes for a lost connection: a reconnect-and-redeliver loop), a short string that
    # is not UTF-8 (UnicodeDecodeError). Raised in the frame handler, each stops a worker.
    assert _original_decode_properties is not None
    try:
        return _original_decode_properties(buf, offset)
    except Exception as error:
        return _salvage_properties(buf, offset, error)


def harden_amqp_decoder() -> None:
    """Make py-amqp's decoding of message properties safe against any sender (idempotent).

    Two replacements, in the places py-amqp looks them up: ``serialization._read_item`` (a
    module global, used by ``loads`` and by its own recursion) bounds table nesting, and
    ``serialization.PROPERTY_CLASSES`` (the content-header decoder per class) never raises.
    """
    global _original_read_item, _original_decode_properties  # noqa: PLW0603 (once per process)
    current = getattr(serialization, "_read_item")  # noqa: B009 (missing from the stubs)
    if current is not _read_item_bounded:
        _original_read_item = current
        setattr(serialization, "_read_item", _read_item_bounded)  # noqa: B010
    classes: dict[int, Any] = getattr(serialization, "PROPERTY_CLASSES")  # noqa: B009
    basic = serialization.Basic.CLASS_ID
    if classes[basic] is not _decode_properties_safely:
        _original_decode_properties = classes[basic]
        classes[basic] = _decode_properties_safely


def route_queue_control(
    consumer: Any,
    owns: Callable[[str], bool],
    pause: Callable[[str], None],
    resume: Callable[[str], None],
) -> None:
    """Send Celery's ``cancel_consumer`` / ``add_consumer`` for queues we consume to us.

    Celery's remote control commands (``celery.worker.control``) call the worker consumer's
    ``cancel_task_queue`` and ``add_task_queue``, which know only Celery's own task consumer:
    a handler queue would keep being consumed, and ``add_consumer`` would even make Celery's
    task consumer read raw events. Instance attributes shadow those methods (idempotent: a
    restarted consumer keeps Celery's originals underneath).
    """
    cancel = getattr(consumer.cancel_task_queue, "__wrapped__", consumer.cancel_task_queue)
    add = getattr(consumer.add_task_queue, "__wrapped__", consumer.add_task_queue)

    def cancel_task_queue(queue: str) -> Any:
        return pause(queue) if owns(queue) else cancel(queue)

    def add_task_queue(queue: str, *args: Any, **kwargs: Any) -> Any:
        return resume(queue) if owns(queue) else add(queue, *args, **kwargs)

    cancel_task_queue.__wrapped__ = cancel  # type: ignore[attr-defined]
    add_task_queue.__wrapped__ = add  # type: ignore[attr-defined]
    consumer.cancel_task_queue = cancel_task_queue
    consumer.add_task_queue = add_task_queue


def add_unconsumed_queue(queues: Any, queue: Any) -> None:
    """Add ``queue`` to ``app.amqp.queues`` without Celery's task consumer reading it.

    Celery's quorum-queue detection and its DelayedDelivery bindings look at every queue in
    ``app.amqp.queues``; its task consumer reads ``queues.consume_from``. From Celery 5.7 that
    is the queues defined at construction (or chosen by ``-Q``) plus ``select_add`` ones; on
    5.5 and 5.6, with no ``-Q``, it is every queue, so an added handler queue was consumed as a
    task queue too and its events refused as undecodable task messages. ``deselect`` keeps it
    out on each.
    """
    queues.add(queue)
    queues.deselect(queue.name)


def start_with_task_consumer(task_consumer: Any, start: Callable[[], None]) -> None:
    """Call ``start`` right after each time Celery starts its own task consumer.

    Celery's event loops (``asynloop`` and ``synloop`` in ``celery.worker.loops``) call
    ``task_consumer.consume()`` once per blueprint start, when the pool can take work: handler
    queues consumed then share the task consumer's channel and QoS, and never deliver to a pool
    that is not ready. An instance attribute shadows the method (idempotent).
    """
    consume = getattr(task_consumer.consume, "__wrapped__", task_consumer.consume)

    def consume_then_start(*args: Any, **kwargs: Any) -> Any:
        result = consume(*args, **kwargs)
        start()
        return result

    consume_then_start.__wrapped__ = consume  # type: ignore[attr-defined]
    task_consumer.consume = consume_then_start


class _DecodedTaskMessage(Message):
    """A task message whose body is the ``(args, kwargs, embed)`` tuple itself."""

    def _decode(self) -> Any:
        return self.body


def decoded_task_message(
    delivery: Message,
    body: tuple[list[Any], dict[str, Any], dict[str, Any]],
    headers: dict[str, Any],
    properties: dict[str, Any],
) -> Message:
    """Return a protocol-2 task message on ``delivery``'s channel and tag, body already Python.

    ``content_type`` None makes Celery's tracer (``celery.app.trace``) take the body as decoded,
    so nothing is serialized and parsed back on the way to the pool; acking the task acks the
    delivery.
    """
    return _DecodedTaskMessage(**_on_delivery(delivery, body, headers, properties))


def _on_delivery(
    delivery: Message, body: Any, headers: dict[str, Any], properties: dict[str, Any]
) -> dict[str, Any]:
    # A task message on the delivery's channel and tag, its body Python (content_type None).
    return {
        "body": body,
        "delivery_tag": delivery.delivery_tag,
        "content_type": None,
        "content_encoding": None,
        "delivery_info": delivery.delivery_info,
        "properties": properties,
        "headers": headers,
        "channel": delivery.channel,
    }


class _BatchTaskMessage(_DecodedTaskMessage):
    """One task message standing for several deliveries: acking it acks each of them."""

    def __init__(self, deliveries: Sequence[Message], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.deliveries = list(deliveries)

    def ack(self, multiple: bool = False) -> None:
        # Never basic.ack(multiple=True): other handlers' deliveries share the channel.
        self._settle("ACK", lambda delivery: delivery.ack())

    def reject(self, requeue: bool = False) -> None:
        self._settle("REJECTED", lambda delivery: delivery.reject(requeue=requeue))

    def requeue(self) -> None:
        self._settle("REQUEUED", lambda delivery: delivery.requeue())

    def _settle(self, state: str, settle: Callable[[Message], Any]) -> None:
        if self.acknowledged:
            raise MessageStateError(f"Message already acknowledged: {self!r}")
        for delivery in self.deliveries:
            if not delivery.acknowledged:
                settle(delivery)
        self._state = state


def batch_task_message(
    deliveries: Sequence[Message],
    body: tuple[list[Any], dict[str, Any], dict[str, Any]],
    headers: dict[str, Any],
    properties: dict[str, Any],
) -> Message:
    """Return a task message for several deliveries of one channel, body already Python.

    Celery acks, rejects or requeues it as one message (``acks_late``, worker lost): each of
    its deliveries is settled the same way, one ``basic.ack``/``basic.reject`` per delivery.
    """
    return _BatchTaskMessage(deliveries, **_on_delivery(deliveries[0], body, headers, properties))


#: SHA-1 for short inputs (task ids): CPython's own, else ``hashlib.sha1``. Not for security.
sha1: Callable[[bytes], Any]
try:  # typeshed has no stub for it
    sha1 = importlib.import_module("_sha1").sha1
except ImportError:  # pragma: no cover - a CPython built without its own hashes
    sha1 = hashlib.sha1


#: The modules of Celery's pools that run tasks in the worker's own process.
_IN_PROCESS_POOLS = frozenset(
    f"celery.concurrency.{name}" for name in ("solo", "thread", "gevent", "eventlet")
)


def runs_in_process(pool: Any) -> bool:
    """Whether ``pool`` runs a task in the worker's own process, with its arguments unpickled.

    Solo, threads, gevent and eventlet call the task with the objects of its request; prefork
    pickles them to a child process. A pool not known to Celery counts as pickling. Matched by
    class, without importing the pool modules (eventlet's and gevent's need greenlet).
    """
    return any(
        cls.__name__ == "TaskPool" and cls.__module__ in _IN_PROCESS_POOLS
        for cls in type(pool).__mro__
    )


def flush_ready_before_poll(hub: Any) -> Callable[[], None]:
    """Have kombu's event loop run its ready callbacks right before it polls; return the hook.

    ``Hub.create_loop`` runs the callbacks ready at the top of each turn, then fires timers and
    the ``on_tick`` hooks, then polls for up to a second. A callback made ready in between (a
    late ack ``call_soon``-ed by a task that a timer or a tick ran, with the solo pool) waits
    out that poll: with every prefetched delivery waiting for such an ack, the broker sends
    nothing and the worker stalls for up to a second (kombu PR #1587, celery#7718). Remove the
    hook with ``hub.on_tick.discard(hook)``.
    """

    def run_ready() -> None:
        # One batch per turn, as create_loop runs them: a callback that makes itself ready
        # again must not keep the loop from polling.
        if hub._ready:
            for callback in hub._pop_ready():
                if callback:  # a cancelled promise is falsy, as create_loop checks
                    callback()

    hub.on_tick.add(run_ready)
    return run_ready


def on_every_app(bind: Callable[[Celery], Any]) -> None:
    """Run ``bind`` on every app as ``@shared_task`` does: finalized ones now, others later."""
    celery_state.connect_on_app_finalize(bind)
    for app in celery_state._get_active_apps():  # type: ignore[attr-defined]
        if app.finalized:
            with app._finalize_mutex:
                bind(app)


def task_from_fun(app: Celery, fun: Callable[..., Any], **options: Any) -> Task[Any, Any]:
    """Create a task from ``fun`` as ``@app.task`` does, on a finalized app too.

    Celery wraps ``task.run`` in its autoretry here (``celery.app.autoretry``), so a wrapper
    installed afterwards sees the outcome once retries are spent.
    """
    task: Task[Any, Any] = app._task_from_fun(fun, **options)
    return task


# Where Celery's tracer lives; a task run pushes its request from there.
_TRACER = "celery.app.trace"


def current_traced_task() -> Task[Any, Any] | None:
    """Return the task Celery is running in this thread, if any.

    Cheap when no task was ever traced in this process (a web process, say): Celery's
    thread-local stack raises and catches two exceptions per lookup when it is empty.
    """
    if _TRACER not in sys.modules:
        return None
    task: Task[Any, Any] | None = celery_state.get_current_task()
    return task


def app_behind_proxy(app: Celery) -> Celery:
    """Return the app itself when ``app`` is a proxy of one (``celery.current_app``)."""
    unwrap = getattr(app, "_get_current_object", None)
    if unwrap is None:
        return app
    current: Celery = unwrap()
    return current


def worker_terminating() -> bool:
    """Whether this worker is in a cold shutdown (Celery's own ``Request.on_failure`` asks)."""
    return bool(celery_worker_state.should_terminate)


@contextmanager
def restored_current_app() -> Iterator[None]:
    """Restore Celery's current and default app afterwards (``start_worker`` changes both)."""
    state: Any = celery_state
    current, default = getattr(state._tls, "current_app", None), state.default_app
    try:
        yield
    finally:
        state._tls.current_app = current
        state.default_app = default


def unconfirmed_basic_publish(channel: Any) -> Callable[..., Any]:
    """py-amqp's publish that does not wait for the confirm (kombu waits for each one)."""
    publish: Callable[..., Any] = getattr(channel, "_basic_publish", channel.basic_publish)
    return publish


def transport_connection(conn: Any) -> Any | None:
    """The transport connection behind a kombu ``Connection``, without connecting it."""
    return getattr(conn, "_connection", None)


def django_on_commit_funcs(connection: Any) -> list[Any]:
    """The callbacks registered with ``on_commit`` on ``connection``, oldest first."""
    return [entry[1] for entry in connection.run_on_commit]


def django_remove_on_commit(connection: Any, funcs: list[Any]) -> None:
    """Unregister the ``on_commit`` callbacks ``funcs`` of ``connection``."""
    gone = {id(func) for func in funcs}
    connection.run_on_commit[:] = [e for e in connection.run_on_commit if id(e[1]) not in gone]


def django_append_on_commit(connection: Any, func: Callable[[], Any], *, robust: bool) -> None:
    """Register ``func`` to run on commit, no savepoint able to drop it.

    Django (>= 4.2) keeps ``(savepoint ids active at registration, func, robust)`` and drops
    an entry when one of its savepoints rolls back; with no ids, none can.
    """
    connection.run_on_commit.append((set(), func, robust))


def sqlalchemy_await(awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` from sync code that an ``AsyncSession`` runs (its event hooks).

    Raises:
        sqlalchemy.exc.MissingGreenlet: not called from within an ``AsyncSession`` call.
    """
    from sqlalchemy.util import await_only  # noqa: PLC0415 (an optional dependency)

    return await_only(awaitable)


def prometheus_multiprocess_values() -> None:
    """Have prometheus-client metrics created from now on write to ``PROMETHEUS_MULTIPROC_DIR``.

    prometheus-client picks the class of its values when first imported, from that variable:
    a worker that sets it after something imported prometheus-client switches the class here.
    """
    from prometheus_client import values  # noqa: PLC0415 (an optional dependency)

    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


#: The prometheus-client multiprocess files that hold sums: one per type and process,
#: ``<type>_<pid>.db``, and ``<type>_compacted.db`` for the merged ones of exited processes.
SUMMED_METRIC_FILES = ("counter", "histogram", "summary")


def compact_metric_files(directory: str, exited: Callable[[int], bool]) -> int:
    """Merge the counter, histogram and summary files of exited processes, one file per type.

    prometheus-client's multiprocess mode keeps one file per process and type for good, so
    the counts of exited processes stay in the totals; a worker that replaces its pool
    processes (``worker_max_tasks_per_child``) would gather files without end, and every
    scrape reads them all. Values of the same sample are summed, as the scrape sums them;
    ``exited(pid)`` says which processes' files to merge. Each is first renamed out of the
    scrape's sight (``*.merging``), so a process that takes the pid again starts a new file,
    and a file merged once is never merged again. Not safe against another process merging
    or scraping the same directory at the same time: the caller serializes.

    Returns:
        How many files were merged away.
    """
    merged = 0
    for kind in SUMMED_METRIC_FILES:
        taken: list[Path] = []
        for path in Path(directory).glob(f"{kind}_*.db"):
            pid = path.name[len(kind) + 1 : -len(".db")]
            if pid.isdigit() and exited(int(pid)):
                moved = path.with_suffix(".merging")
                try:
                    path.rename(moved)
                except OSError:
                    continue  # gone or busy: next time
                taken.append(moved)
        if not taken:
            continue
        target = Path(directory, f"{kind}_compacted.db")
        try:
            _merge_into(target, taken)
        except BaseException:
            for path in taken:  # back in sight, unless a process took the pid meanwhile
                if not path.with_suffix(".db").exists():
                    path.rename(path.with_suffix(".db"))
            raise
        for path in taken:
            path.unlink(missing_ok=True)
        merged += len(taken)
    return merged


def _merge_into(target: Path, sources: list[Path]) -> None:
    # target := target + sources, sample by sample, replaced at once (os.replace).
    from prometheus_client.mmap_dict import MmapedDict  # noqa: PLC0415 (optional dependency)

    totals: dict[str, list[float]] = {}
    for path in [target, *sources] if target.exists() else sources:
        for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(str(path)):  # type: ignore[no-untyped-call]
            entry = totals.setdefault(key, [0.0, 0.0])
            entry[0] += value
            entry[1] = max(entry[1], timestamp)
    partial = target.with_suffix(".partial")  # not *.db: never read by a scrape
    partial.unlink(missing_ok=True)
    out = MmapedDict(str(partial))  # type: ignore[no-untyped-call]
    try:
        for key, (value, timestamp) in totals.items():
            out.write_value(key, value, timestamp)  # type: ignore[no-untyped-call]
    finally:
        out.close()  # type: ignore[no-untyped-call]
    os.replace(partial, target)


def histogram_bounds(child: Any) -> list[float]:
    """The upper bounds of a prometheus-client histogram child's buckets (``+Inf`` last)."""
    return list(child._upper_bounds)


def histogram_add(child: Any, counts: Sequence[float], total: float) -> None:
    """Add observations to a histogram child at once: ``counts[i]`` in bucket ``i``, sum ``total``.

    What as many ``observe()`` calls would record (prometheus-client stores each bucket's own
    count, not the cumulative one), with one value write per bucket touched.
    """
    for bucket, count in zip(child._buckets, counts, strict=False):
        if count:
            bucket.inc(count)
    child._sum.inc(total)


def otel_provider_set(trace: Any) -> bool:
    """Whether ``opentelemetry.trace`` (passed in) has a global tracer provider set.

    ``trace.get_tracer_provider()`` looks ``OTEL_PYTHON_TRACER_PROVIDER`` up in ``os.environ``
    on every call while none is set, which every handler run would pay.
    """
    return trace._TRACER_PROVIDER is not None
