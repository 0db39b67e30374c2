"""Prometheus metrics of publishing and handling events (docs/operations/metrics.md).

prometheus-client is optional (the ``metrics`` extra): it is imported when a process first
records a metric, and only if its settings ask for metrics (``domain_events_metrics``, or a
worker's ``domain_events_metrics_port``). Metrics live in prometheus-client's default registry
(or, with ``PROMETHEUS_MULTIPROC_DIR`` set, in its per-process files), so a publisher's own
``/metrics`` shows them; a worker serves them itself (``consuming.exposition``).

Labels are bounded: the service, the handler, the event name and the outcome, never an id. An
event name comes from the wire, so each process keeps at most :data:`MAX_EVENT_NAMES` of them
and counts any further name as ``other``.

Handler runs (outcomes, durations, lags) are counted into a buffer of the process first, which
a daemon thread applies to prometheus-client every :data:`FLUSH_SECONDS` (and :func:`flush`,
and the process's exit): a run then costs one uncontended lock and a few dict updates, where
recording it directly costs five locked value writes (to mmap'd files with prefork).
Publishing is counted directly, once per batch.
"""

from __future__ import annotations

import atexit
import bisect
import functools
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ParamSpec

from . import _compat
from .config import Settings
from .exceptions import ConfigurationError

__all__ = [
    "DEAD_LETTERED",
    "DROPPED",
    "DUPLICATE",
    "FLUSH_SECONDS",
    "HANDLED",
    "METRICS",
    "OUTCOMES",
    "RETRIED",
    "MetricInfo",
    "batch_ran",
    "flush",
    "handler_outcome",
    "handler_started",
    "publishing",
]


@dataclass(frozen=True)
class MetricInfo:
    """One metric as Prometheus shows it (counters with their ``_total`` suffix)."""

    name: str
    kind: str  # counter, histogram or gauge
    labels: tuple[str, ...]
    help: str


PUBLISHED = MetricInfo(
    "domain_events_published_total",
    "counter",
    ("service", "event"),
    "Events handed to the broker (transmit, transmit_async, an outbox relay).",
)
CONFIRMED = MetricInfo(
    "domain_events_publish_confirmed_total",
    "counter",
    ("service", "event"),
    "Published events the broker confirmed.",
)
FAILED = MetricInfo(
    "domain_events_publish_failed_total",
    "counter",
    ("service", "event"),
    "Published events not confirmed (PublishError).",
)
RUNS = MetricInfo(
    "domain_events_handler_runs_total",
    "counter",
    ("service", "handler", "event", "outcome"),
    "Handler runs by outcome; a batch handler counts each event of the batch.",
)
DURATION = MetricInfo(
    "domain_events_handler_duration_seconds",
    "histogram",
    ("service", "handler"),
    "Time a handler run took (a batch handler: the whole batch).",
)
LAG = MetricInfo(
    "domain_events_handler_lag_seconds",
    "histogram",
    ("service", "handler"),
    "Handler start minus the event's CloudEvents time, retries' delays included.",
)
QUEUE_DEPTH = MetricInfo(
    "domain_events_queue_messages",
    "gauge",
    ("service", "handler"),
    "Messages ready in a handler's queue, as a worker serving metrics last read it.",
)
DLQ_DEPTH = MetricInfo(
    "domain_events_dead_letter_queue_messages",
    "gauge",
    ("service", "handler"),
    "Messages in a handler's dead-letter queue, as a worker serving metrics last read it.",
)
#: Every metric of the library (the dashboard and the docs are tested against it).
METRICS = (PUBLISHED, CONFIRMED, FAILED, RUNS, DURATION, LAG, QUEUE_DEPTH, DLQ_DEPTH)

HANDLED = "handled"
DUPLICATE = "duplicate"
RETRIED = "retried"
DEAD_LETTERED = "dead_lettered"
#: A transient handler's final failure (it has no dead-letter queue).
DROPPED = "dropped"
OUTCOMES = (HANDLED, DUPLICATE, RETRIED, DEAD_LETTERED, DROPPED)

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400)
#: Distinct event names a process labels; further ones are counted as ``other``.
MAX_EVENT_NAMES = 500
OTHER = "other"


class _Metrics:
    """The process's metric objects, and a cache of their labelled children."""

    def __init__(self) -> None:
        try:
            import prometheus_client  # noqa: PLC0415 (an optional dependency)
        except ImportError as exc:
            raise ConfigurationError(
                f"domain events metrics need prometheus-client ({exc}); "
                "pip install 'celery-domain-events[metrics]'"
            ) from exc

        def counter(info: MetricInfo) -> Any:
            return prometheus_client.Counter(
                info.name.removesuffix("_total"), info.help, info.labels
            )

        self.published = counter(PUBLISHED)
        self.confirmed = counter(CONFIRMED)
        self.failed = counter(FAILED)
        self.runs = counter(RUNS)
        self.duration = prometheus_client.Histogram(
            DURATION.name, DURATION.help, DURATION.labels, buckets=DURATION_BUCKETS
        )
        self.lag = prometheus_client.Histogram(LAG.name, LAG.help, LAG.labels, buckets=LAG_BUCKETS)
        # labels() takes a lock and builds a key on every call: cache the children.
        self._children: dict[tuple[Any, ...], Any] = {}
        self._names: set[str] = set()
        self._handlers: dict[tuple[str, str], _HandlerChildren] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def handler(self, service: str, name: str) -> _HandlerChildren:
        """The metric children of one handler (made once)."""
        found = self._handlers.get((service, name))
        if found is None:
            found = self._handlers[service, name] = _HandlerChildren(self, service, name)
        return found

    def event(self, name: str) -> str:
        if name in self._names:
            return name
        if len(self._names) >= MAX_EVENT_NAMES:
            return OTHER
        self._names.add(name)
        return name


class _HandlerChildren:
    """One handler's histogram children (with their bounds) and its runs counters."""

    __slots__ = (
        "duration",
        "duration_bounds",
        "lag",
        "lag_bounds",
        "metrics",
        "name",
        "runs",
        "service",
    )

    def __init__(self, metrics: _Metrics, service: str, name: str) -> None:
        self.metrics = metrics
        self.service = service
        self.name = name
        self.lag = metrics.child(metrics.lag, service, name)
        self.lag_bounds = _compat.histogram_bounds(self.lag)
        self.duration = metrics.child(metrics.duration, service, name)
        self.duration_bounds = _compat.histogram_bounds(self.duration)
        #: (event, outcome) -> the runs counter's child
        self.runs: dict[tuple[str, str], Any] = {}


#: Longest time a handler run's metrics wait in the process's buffer (see the module docstring).
FLUSH_SECONDS = 1.0


class _Pending:
    """Handler-run observations of this process not yet applied to prometheus-client."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: counter child -> amount
        self.counts: dict[Any, float] = {}
        #: histogram child -> [count per bucket ..., sum]
        self.histograms: dict[Any, list[float]] = {}
        self.thread: threading.Thread | None = None

    def inc(self, child: Any, amount: float = 1) -> None:
        self._started()
        with self.lock:
            self.counts[child] = self.counts.get(child, 0) + amount

    def observe(self, child: Any, bounds: list[float], value: float) -> None:
        """One observation of histogram ``child``, whose buckets' upper bounds are ``bounds``."""
        self._started()
        with self.lock:
            self._add(child, bounds, value)

    def run(
        self,
        handler: _HandlerChildren,
        event: str,
        outcome: str,
        count: int,
        *,
        lag: float | None,
        duration: float | None,
    ) -> None:
        """Count one handler run (``count`` events): its outcome, lag and duration, if known."""
        self._started()
        runs = handler.runs.get((event, outcome))
        if runs is None:
            runs = handler.runs[event, outcome] = handler.metrics.child(
                handler.metrics.runs, handler.service, handler.name, event, outcome
            )
        with self.lock:
            if lag is not None:
                self._add(handler.lag, handler.lag_bounds, lag)
            if duration is not None:
                self._add(handler.duration, handler.duration_bounds, duration)
            self.counts[runs] = self.counts.get(runs, 0) + count

    def _add(self, child: Any, bounds: list[float], value: float) -> None:
        # Under the lock (flush() swaps the dict): one observation of ``value``, in
        # prometheus-client's bucket for it, the first whose upper bound is >= the value.
        sums = self.histograms.get(child)
        if sums is None:
            sums = self.histograms[child] = [0.0] * (len(bounds) + 1)
        sums[bisect.bisect_left(bounds, value)] += 1
        sums[-1] += value

    def flush(self) -> None:
        with self.lock:
            counts, histograms = self.counts, self.histograms
            self.counts, self.histograms = {}, {}
        # Histograms first: a scrape that sees a run counted sees its duration and lag too.
        for child, sums in histograms.items():
            _compat.histogram_add(child, sums[:-1], sums[-1])
        for child, amount in counts.items():
            child.inc(amount)

    def _started(self) -> None:
        if self.thread is None:
            with self.lock:
                if self.thread is None:
                    self.thread = threading.Thread(
                        target=self._run, name="domain-events-metrics", daemon=True
                    )
                    self.thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(FLUSH_SECONDS)
            try:
                self.flush()
            except Exception:
                log.exception("Domain events: could not apply buffered metrics")


_pending = _Pending()


def flush() -> None:
    """Apply this process's buffered handler-run metrics to prometheus-client now."""
    _pending.flush()


def _forget_in_child() -> None:
    # A forked process starts empty: what its parent buffered is the parent's to apply (a copy
    # would count twice), and the parent's flushing thread does not exist here.
    global _pending  # noqa: PLW0603
    _pending = _Pending()


os.register_at_fork(after_in_child=_forget_in_child)
atexit.register(flush)

_lock = threading.Lock()
log = logging.getLogger(__name__)
_P = ParamSpec("_P")
_failed = False


def _never_raises(record: Callable[_P, None]) -> Callable[_P, None]:
    """Make a recording function log (once per process) instead of failing a handler run."""

    @functools.wraps(record)
    def safe(*args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            record(*args, **kwargs)
        except ConfigurationError:
            raise
        except Exception:
            _record_failed()

    return safe


def _record_failed() -> None:
    # Called from an except block: logs the exception being handled, once per process.
    global _failed  # noqa: PLW0603
    if not _failed:
        _failed = True
        log.exception("Domain events: could not record a metric; handlers run on")


_metrics: _Metrics | None = None


def _get() -> _Metrics:
    global _metrics  # noqa: PLW0603 (one set of metric objects per process)
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = _Metrics()
    return _metrics


class _Publishing:
    """Counts a batch as published, then as confirmed or failed (see :func:`publishing`)."""

    __slots__ = ("messages", "service")

    def __init__(self, service: str, messages: Sequence[Any]) -> None:
        self.service = service
        self.messages = messages

    def _count(self, metric: Any, messages: Iterable[Any]) -> None:
        m = _get()
        by_name = Counter(msg.properties.get("type", "") for msg in messages)
        for name, count in by_name.items():
            m.child(metric, self.service, m.event(str(name))).inc(count)

    def __enter__(self) -> None:
        self._count(_get().published, self.messages)

    def __exit__(self, typ: Any, exc: BaseException | None, tb: Any) -> None:
        m = _get()
        if exc is None:
            self._count(m.confirmed, self.messages)
            return
        # PublishError.events holds the source of each unconfirmed message (the very objects).
        unconfirmed = {id(e) for e in getattr(exc, "events", None) or ()}
        failed = [
            msg
            for msg in self.messages
            if not unconfirmed or id(msg if msg.source is None else msg.source) in unconfirmed
        ]
        self._count(m.failed, failed)
        if len(failed) < len(self.messages):
            failed_ids = {id(msg) for msg in failed}
            self._count(m.confirmed, (msg for msg in self.messages if id(msg) not in failed_ids))


class _Off:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None


_OFF = _Off()


def publishing(settings: Settings, messages: Sequence[Any]) -> _Publishing | _Off:
    """Wrap the publish of event ``messages`` (``OutboundMessage``, named by their ``type``).

    On entry each counts as published; when the block returns, as confirmed; when it raises
    ``PublishError``, the messages whose source it names as failed and the others as
    confirmed (any other exception: all failed). Does nothing unless metrics are on.
    """
    if not settings.metrics_enabled:
        return _OFF
    return _Publishing(settings.service, messages)


class _Run:
    __slots__ = ("event", "event_time", "run_id", "started", "started_wall")

    def __init__(self, run_id: str | None, event: str, event_time: datetime | None) -> None:
        self.run_id = run_id
        self.event = event
        self.event_time = event_time
        self.started = time.monotonic()
        self.started_wall = time.time()


_current = threading.local()


def _lag(event_time: datetime | None, now: float) -> float | None:
    if event_time is None:
        return None
    return max(0.0, now - event_time.timestamp())  # a producer's clock may be ahead


def handler_started(
    settings: Settings, handler: str, run_id: str | None, event: str, event_time: datetime | None
) -> None:
    """A run of ``handler`` on ``event`` (its CloudEvents time) starts.

    The run is remembered in this thread until :func:`handler_outcome` ends it with the same
    ``run_id``, which records its lag (from this moment), its duration and its outcome; one
    with another id ends a run that never started (a run that failed to decode).
    """
    if settings.metrics_enabled:
        _current.run = _Run(run_id, event, event_time)


def handler_outcome(
    settings: Settings, handler: str, outcome: str, run_id: str | None = None, count: int = 1
) -> None:
    """Count a run of ``handler`` that ended with ``outcome``.

    The run started in this thread with the same ``run_id`` gives the event label, the lag
    and the duration; without one (poison, a hard time limit seen by the worker's main
    process) the event label is empty and nothing is timed. Never raises (see
    :func:`_never_raises`; written out here, as every handler run calls it).
    """
    if not settings.metrics_enabled:
        return
    try:
        m = _metrics or _get()
        children = m.handler(settings.service, handler)
        run: _Run | None = getattr(_current, "run", None)
        if run is not None and run_id is not None and run.run_id == run_id:
            _current.run = None
            _pending.run(
                children,
                m.event(run.event),
                outcome,
                count,
                lag=_lag(run.event_time, run.started_wall),
                duration=time.monotonic() - run.started,
            )
        else:
            _pending.run(children, "", outcome, count, lag=None, duration=None)
    except ConfigurationError:
        raise
    except Exception:
        _record_failed()


@_never_raises
def batch_ran(
    settings: Settings,
    handler: str,
    events: Sequence[Any],
    outcome: Mapping[str, Sequence[Any]],
    started: float,
) -> None:
    """Count each event of a batch handler's run by its outcome, lag and the run's duration.

    Args:
        settings: the app's settings.
        handler: the batch handler's name.
        events: the events that decoded (those that did not count with an empty event label).
        outcome: event ids ``handled``, ``retried`` and ``dead_lettered``.
        started: ``time.monotonic()`` when the handler was called.
    """
    if not settings.metrics_enabled:
        return
    m = _get()
    service = settings.service
    children = m.handler(service, handler)
    now = time.monotonic()
    start_wall = time.time() - (now - started)
    names = {str(e.event_id): e.event_name for e in events}
    for event in events:
        value = _lag(getattr(event, "occurred_at", None), start_wall)
        if value is not None:
            _pending.observe(children.lag, children.lag_bounds, value)
    if events:
        _pending.observe(children.duration, children.duration_bounds, now - started)
    for key, label in ((HANDLED, HANDLED), ("retried", RETRIED), ("dead_lettered", DEAD_LETTERED)):
        by_name = Counter(names.get(str(i), "") for i in outcome.get(key, ()))
        for name, count in by_name.items():
            _pending.inc(m.child(m.runs, service, handler, m.event(name), label), count)
