"""The worker's metrics port (``domain_events_metrics_port``): every pool process, one scrape.

Prefork runs handlers in child processes, each with its own counters. prometheus-client's
multiprocess mode keeps every process's values in files under ``PROMETHEUS_MULTIPROC_DIR``
(this worker's own temporary directory unless the variable is set), and the port, served by
a thread of the worker's main process, merges them (``MultiProcessCollector``). Everything is
prepared before the pool forks (:func:`prepare`, from the worker step's constructor), so the
children inherit the variable. A child that exits cleanly is marked dead
(``mark_process_dead``: the live gauges of any metrics of the user's own go); the counters of
a dead child stay, so totals never go down. In the worker's own directory a thread merges the
counter, histogram and summary files of exited children into one file per type every
:data:`COMPACT_SECONDS` (``_compat.compact_metric_files``), under a lock the scrapes hold too:
a worker that replaces its children (``worker_max_tasks_per_child``) keeps a few files, not
two per child ever started.

Queue depths are not counted by any process: a thread of the worker's main process reads
them from the broker every ``domain_events_metrics_depth_interval`` seconds on a connection
of its own (a passive declare per handler queue and per DLQ on one channel), and a collector
in the main process reports the last values. Never on the consumer's connection or its event
loop: a synchronous call there waits among the deliveries (a solo worker stalled on it). A
scrape therefore costs no broker round trip, and the broker sees the same few declares
whatever the scrape rate. A transient queue is reported under its handler; it has no DLQ.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

from celery import signals

from celery_domain_events import _compat, metrics
from celery_domain_events.amqp.queues import depths
from celery_domain_events.exceptions import ConfigurationError
from celery_domain_events.extension import DomainEvents

__all__ = ["close", "prepare", "serve"]

log = logging.getLogger(__name__)

_MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
#: How often the worker merges the metric files of its exited pool processes (seconds).
COMPACT_SECONDS = 10.0


class _State:
    """What this worker process set up (one per process: the port is the process's)."""

    def __init__(self) -> None:
        self.prepared = False
        self.own_dir: str | None = None
        self.server: Any = None
        #: (service, handler) -> (handler queue depth, DLQ depth), None where unknown.
        self.depths: dict[tuple[str, str], tuple[int | None, int | None]] = {}
        #: Held by a scrape and by the merging of exited processes' files: a scrape never
        #: sees a file both merged and not yet removed.
        self.files = threading.Lock()
        self.compactor: _Periodic | None = None
        self.compact_failed = False


_state = _State()


def prepare(ext: DomainEvents) -> None:
    """Before the pool forks: multiprocess mode for every process of a worker serving metrics.

    Raises:
        ConfigurationError: prometheus-client is not installed.
    """
    if ext.settings.metrics_port is None or _state.prepared:
        return
    try:
        import prometheus_client  # noqa: F401, PLC0415 (an optional dependency)
    except ImportError as exc:
        raise ConfigurationError(
            f"domain_events_metrics_port needs prometheus-client ({exc}); "
            "pip install 'celery-domain-events[metrics]'"
        ) from exc
    if not os.environ.get(_MULTIPROC_DIR):
        _state.own_dir = tempfile.mkdtemp(prefix="domain-events-metrics-")
        os.environ[_MULTIPROC_DIR] = _state.own_dir
    _compat.prometheus_multiprocess_values()
    signals.worker_process_init.connect(_child_started, weak=False)
    signals.worker_process_shutdown.connect(_child_exits, weak=False)
    _state.prepared = True


def _child_started(**_: Any) -> None:
    # A pool process forked after the port opened holds a copy of its socket: let it go, so
    # that the port closes with the main process.
    if _state.server is not None:
        _state.server.socket.close()
        _state.server = None


def _child_exits(pid: int | None = None, **_: Any) -> None:
    from prometheus_client import multiprocess  # noqa: PLC0415 (an optional dependency)

    metrics.flush()  # a pool process ends with os._exit: atexit would not run
    multiprocess.mark_process_dead(pid or os.getpid())  # type: ignore[no-untyped-call]


class _DepthCollector:
    """Reports the queue depths the worker last read (a prometheus-client collector)."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily  # noqa: PLC0415

        queue = GaugeMetricFamily(
            metrics.QUEUE_DEPTH.name, metrics.QUEUE_DEPTH.help, labels=metrics.QUEUE_DEPTH.labels
        )
        dlq = GaugeMetricFamily(
            metrics.DLQ_DEPTH.name, metrics.DLQ_DEPTH.help, labels=metrics.DLQ_DEPTH.labels
        )
        for labels, (ready, dead) in sorted(_state.depths.items()):
            if ready is not None:
                queue.add_metric(labels, ready)
            if dead is not None:
                dlq.add_metric(labels, dead)
        yield queue
        yield dlq


def serve(
    ext: DomainEvents, parent: Any, queues: Callable[[], list[tuple[str, str, str | None]]]
) -> list[Any]:
    """Open the metrics port once, and read the queue depths now and periodically.

    Args:
        ext: the app's extension.
        parent: Celery's consumer (its app).
        queues: returns ``(handler, queue, DLQ or None)`` for each handler queue consumed
            (called from the depth reader's thread).

    Returns:
        What to cancel when the consumer stops (the depth reader).
    """
    settings = ext.settings
    if settings.metrics_port is None:
        return []
    if _state.server is None and _state.prepared:
        _open_port(settings.metrics_address, settings.metrics_port)
    service = settings.service
    app = parent.app

    def refresh() -> None:
        wanted = queues()
        names = [name for _, queue, dlq in wanted for name in (queue, dlq) if name is not None]
        with app.connection_for_read() as conn:
            found = depths(conn, names)
        _state.depths = {
            (service, handler): (found.get(queue), None if dlq is None else found.get(dlq))
            for handler, queue, dlq in wanted
        }

    reader = _Periodic("domain-events-queue-depths", refresh, settings.metrics_depth_interval)
    reader.start()
    return [reader]


class _Periodic(threading.Thread):
    """Calls ``fn`` now and every ``interval`` seconds until cancelled (a timer entry)."""

    def __init__(self, name: str, fn: Callable[[], None], interval: float) -> None:
        super().__init__(name=name, daemon=True)
        self.fn = fn
        self.interval = interval
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.fn()
            except Exception as exc:  # the broker is away, a file is busy: try again later
                log.debug("Domain events: %s failed: %r", self.name, exc)
            self.stopped.wait(self.interval)

    def cancel(self) -> None:
        self.stopped.set()


class _Locked:
    """A collector that holds ``_state.files`` while it reads the multiprocess files."""

    def __init__(self, collector: Any) -> None:
        self.collector = collector

    def collect(self) -> list[Any]:
        with _state.files:
            return list(self.collector.collect())


def _compact(directory: str) -> None:
    try:
        with _state.files:
            merged = _compat.compact_metric_files(directory, _exited)
    except Exception as exc:
        if not _state.compact_failed:  # once: it is tried again every COMPACT_SECONDS
            _state.compact_failed = True
            log.warning(
                "Domain events: could not merge the metric files of exited pool processes "
                "in %s (%r); they are still scraped, one by one",
                directory,
                exc,
            )
        return
    if merged:
        log.debug("Domain events: merged the metric files of %d exited process(es)", merged)


def _exited(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # the pid is someone else's now: ours has exited
        return True
    return False  # running, or exited and not yet reaped (merged next time)


def _open_port(address: str, port: int) -> None:
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server  # noqa: PLC0415

    registry = CollectorRegistry()
    directory = os.environ[_MULTIPROC_DIR]
    registry.register(_Locked(multiprocess.MultiProcessCollector(None, directory)))  # type: ignore[no-untyped-call]
    registry.register(_DepthCollector())
    if directory == _state.own_dir and _state.compactor is None:
        # Only a directory of the worker's own: another process may read or merge a shared one.
        _state.compactor = _Periodic(
            "domain-events-metric-files", lambda: _compact(directory), COMPACT_SECONDS
        )
        _state.compactor.start()
    try:
        _state.server, _ = start_http_server(port, address, registry=registry)
    except OSError as exc:
        # Metrics are not worth stopping the handlers for: say so, and run on.
        log.error("Domain events: cannot serve metrics on %s:%d (%s)", address, port, exc)
        return
    log.info(
        "Domain events: serving metrics on http://%s:%d/metrics (multiprocess directory %s)",
        address,
        _state.server.server_port,
        os.environ[_MULTIPROC_DIR],
    )


def close() -> None:
    """At worker shutdown: close the port, drop this worker's own multiprocess directory."""
    if _state.server is not None:
        _state.server.shutdown()
        _state.server.server_close()
        _state.server = None
    if _state.compactor is not None:
        _state.compactor.cancel()
        _state.compactor.join(timeout=10)  # before its directory is removed below
        _state.compactor = None
    if _state.prepared:
        _child_exits(os.getpid())
    if _state.own_dir is not None:
        shutil.rmtree(_state.own_dir, ignore_errors=True)
        if os.environ.get(_MULTIPROC_DIR) == _state.own_dir:
            del os.environ[_MULTIPROC_DIR]
        _state.own_dir = None
    _state.prepared = False
    _state.depths = {}
