"""Fixtures for tests against the real RabbitMQ and real Celery workers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from kombu import Connection, Queue

from celery_domain_events import DomainEvents, discard
from celery_domain_events.registry import HandlerRegistry

ROOT = Path(__file__).resolve().parent.parent
BROKER_URL = os.environ.get("DOMAIN_EVENTS_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _broker_reachable(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 5672), 2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def broker_url() -> str:
    if not _broker_reachable(BROKER_URL):
        message = f"RabbitMQ is not reachable at {BROKER_URL.split('@')[-1]}"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must never skip the real-broker tests
        pytest.skip(message)
    return BROKER_URL


class Recorder:
    """What handlers saw, by handler name; handlers running in any thread append here."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: dict[str, list[Any]] = defaultdict(list)

    def record(self, handler: str, value: Any) -> None:
        with self._lock:
            self.calls[handler].append(value)

    def get(self, handler: str) -> list[Any]:
        with self._lock:
            return list(self.calls.get(handler, []))

    def clear(self) -> None:
        with self._lock:
            self.calls.clear()


#: Shared by the handlers in tests/handlers.py.
RECORDER = Recorder()


@pytest.fixture(autouse=True)
def _empty_event_buffer() -> Iterator[None]:
    """Each test starts and ends with an empty emit() buffer in the test thread."""
    discard()
    yield
    discard()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    RECORDER.clear()
    yield RECORDER
    RECORDER.clear()


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0, interval: float = 0.05) -> None:
    """Poll ``predicate`` until it is true; fail the test with a clear message otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


class Topology:
    """Per-test names, and the cleanup of every entity a test declared."""

    def __init__(self, broker_url: str) -> None:
        self.broker_url = broker_url
        self.uid = uuid.uuid4().hex[:10]
        self.exchange = f"test.{self.uid}.events"
        self.unrouted = f"test.{self.uid}.unrouted"
        # Celery's own task queue: a worker on the shared "celery" queue would also take (and
        # drop as unregistered) the task messages of every other test run on the same broker.
        self.tasks = f"test.{self.uid}.celery"
        self.apps: list[Celery] = []

    def service(self, name: str = "svc") -> str:
        return f"t{self.uid}-{name}"

    def app(
        self,
        service: str = "svc",
        handlers: list[Any] | None = None,
        registry: HandlerRegistry | None = None,
        **conf: Any,
    ) -> Celery:
        app = Celery(f"test-{service}", broker=self.broker_url, set_as_current=False)
        conf.setdefault("task_default_queue", self.tasks)
        app.conf.update(
            broker_heartbeat=None,
            broker_connection_retry_on_startup=True,
            worker_hijack_root_logger=False,
            domain_events_exchange=self.exchange,
            domain_events_unrouted_queue=self.unrouted,
            **conf,
        )
        if registry is None:
            DomainEvents(app, service=self.service(service), handlers=handlers or [])
        else:
            DomainEvents(app, service=self.service(service), handler_registry=registry)
        self.apps.append(app)
        return app

    def queue_depth(self, name: str) -> int:
        with Connection(self.broker_url) as conn:
            _, count, _ = conn.default_channel.queue_declare(name, passive=True)
            return int(count)

    def cleanup(self) -> None:
        with Connection(self.broker_url) as conn:
            for app in self.apps:
                ext = DomainEvents.of(app)
                for spec in ext.handlers:
                    for queue in (
                        ext.topology.handler_queue_name(spec),
                        ext.topology.handler_queue_name(spec) + ".dlq",
                    ):
                        _ignore(conn, lambda q=queue: conn.default_channel.queue_delete(q))
            _ignore(conn, lambda: conn.default_channel.queue_delete(self.unrouted))
            _ignore(conn, lambda: conn.default_channel.queue_delete(self.tasks))
            _ignore(conn, lambda: conn.default_channel.exchange_delete(self.tasks))
            _ignore(conn, lambda: conn.default_channel.queue_delete(f"test.{self.uid}.probe"))
            _ignore(conn, lambda: conn.default_channel.exchange_delete(self.exchange))
            _ignore(conn, lambda: conn.default_channel.exchange_delete(self.exchange + ".retry"))
            _ignore(conn, lambda: conn.default_channel.exchange_delete(self.unrouted))


def _ignore(conn: Connection, fn: Callable[[], Any]) -> None:
    try:
        fn()
    except conn.channel_errors:
        conn.close()  # the channel is closed by the broker on a failed delete; start afresh
        conn.connect()


@pytest.fixture
def topology(broker_url: str) -> Iterator[Topology]:
    topo = Topology(broker_url)
    yield topo
    topo.cleanup()


@contextmanager
def running_worker(app: Celery, **kwargs: Any) -> Iterator[Any]:
    """A real Celery worker (solo pool, in a thread) consuming the app's handler queues."""
    kwargs.setdefault("pool", "solo")
    kwargs.setdefault("perform_ping_check", False)
    kwargs.setdefault("shutdown_timeout", 30)
    kwargs.setdefault("loglevel", "WARNING")
    with start_worker(app, **kwargs) as worker:
        yield worker


def read_log(path: Path) -> str:
    """The text of a worker's log so far ("" before it exists)."""
    return path.read_text(errors="replace") if path.exists() else ""


def spawn_worker(
    app: str, *args: str, cwd: Path, env: dict[str, str], log_path: Path, ready: bool = True
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``celery -A APP worker ARGS`` logging to ``log_path``; return it once ready.

    With ``ready=False`` it returns at once (a worker whose broker is down is never ready).

    Returns:
        The process (its own session, so a kill reaches its pool) and its hostname.
    """
    hostname = f"t{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
    cmd = [sys.executable, "-m", "celery", "-A", app, "worker", "--loglevel", "INFO"]
    cmd += ["--without-mingle", "--without-gossip", "--hostname", hostname, *args]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    if ready:
        wait_for(lambda: " ready." in read_log(log_path) or proc.poll() is not None, timeout=60)
        assert proc.poll() is None, read_log(log_path)
    return proc, hostname


class WorkerProcess:
    """A real `celery worker` subprocess running tests/worker_app.py (prefork by default)."""

    __test__ = False

    def __init__(self, topology: Topology, tmp_path: Any, handlers: list[str], **env: str) -> None:
        self.topology = topology
        self.markers = tmp_path / "markers"
        self.markers.mkdir(exist_ok=True)
        self.log_path = tmp_path / f"worker-{uuid.uuid4().hex[:6]}.log"
        self.handlers = handlers
        self.env = {
            **os.environ,
            "TEST_BROKER_URL": topology.broker_url,
            "TEST_EXCHANGE": topology.exchange,
            "TEST_UNROUTED": topology.unrouted,
            "TEST_TASK_QUEUE": topology.tasks,
            "TEST_SERVICE": topology.service("proc"),
            "TEST_HANDLERS": ",".join(handlers),
            "TEST_MARKER_DIR": str(self.markers),
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str, ready: bool = True) -> WorkerProcess:
        self.proc, self.hostname = spawn_worker(
            "tests.worker_app",
            *(args or ("-P", "prefork", "-c", "2")),
            cwd=ROOT,
            env=self.env,
            log_path=self.log_path,
            ready=ready,
        )
        return self

    def log(self) -> str:
        return read_log(self.log_path)

    def celery(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``celery -A tests.worker_app ARGS`` with this worker's environment."""
        result = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "tests.worker_app", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes (a power cut, not a shutdown)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()

    def marker_lines(self, name: str, event_id: Any) -> list[str]:
        path = self.markers / f"{name}-{event_id}"
        return path.read_text().splitlines() if path.exists() else []

    def queue(self, handler: str) -> str:
        return f"{self.topology.service('proc')}.{handler}"

    def cleanup(self) -> None:
        self.stop()
        with Connection(self.topology.broker_url) as conn:
            for handler in self.handlers:
                for queue in (self.queue(handler), self.queue(handler) + ".dlq"):
                    _ignore(conn, lambda q=queue: conn.default_channel.queue_delete(q))


@pytest.fixture
def worker_process(topology: Topology, tmp_path: Any) -> Iterator[Callable[..., WorkerProcess]]:
    """Build WorkerProcess objects; every one is stopped and its queues deleted afterwards."""
    made: list[WorkerProcess] = []

    def make(handlers: list[str], **env: str) -> WorkerProcess:
        worker = WorkerProcess(topology, tmp_path, handlers, **env)
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.cleanup()


DB_URL = os.environ.get("DOMAIN_EVENTS_DB_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture
def engine() -> Iterator[Any]:
    """A SQLAlchemy engine on the local PostgreSQL (skipped locally if down, failed in CI)."""
    import sqlalchemy as sa

    parsed = urlparse(DB_URL)
    try:
        socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 5432), 2).close()
    except OSError:
        message = f"PostgreSQL is not reachable at {parsed.hostname}:{parsed.port}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    engine = sa.create_engine(DB_URL)
    yield engine
    engine.dispose()


@pytest.fixture
def inbox_tables(engine: Any) -> Iterator[dict[str, str]]:
    """The PostgreSQL tables of tests/worker_app.py's inbox handlers (inbox_a, inbox_b).

    A side-effect table (no unique key on the event) and an inbox table, as the worker's
    ``TEST_INBOX_ROWS`` and ``TEST_INBOX_TABLE``; dropped afterwards.
    """
    import sqlalchemy as sa

    from celery_domain_events.contrib.inbox import define_inbox_table

    uid = uuid.uuid4().hex[:8]
    names = {"TEST_INBOX_ROWS": f"chaos_rows_{uid}", "TEST_INBOX_TABLE": f"chaos_inbox_{uid}"}
    metadata = sa.MetaData()
    sa.Table(
        names["TEST_INBOX_ROWS"],
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("handler", sa.String(50), nullable=False),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
    )
    define_inbox_table(metadata, names["TEST_INBOX_TABLE"])
    try:
        metadata.create_all(engine)
    except sa.exc.OperationalError as exc:
        pytest.skip(f"PostgreSQL is not usable: {exc}")
    yield names
    metadata.drop_all(engine)


def probe(topology: Topology, app: Celery) -> str:
    """Bind a queue to the test exchange by ``#``: it keeps every event published there.

    Its name is the one ``Topology.cleanup`` deletes.
    """
    name = f"test.{topology.uid}.probe"
    with Connection(topology.broker_url) as conn:
        exchange = DomainEvents.of(app).topology.exchange()
        Queue(name, exchange, routing_key="#", auto_delete=False)(conn.default_channel).declare()
    return name


def unwritable_dlq(broker_url: str, dlq: str) -> None:
    """Replace ``dlq`` by a queue that nacks every publish (an operator's mistake, or full)."""
    with Connection(broker_url) as conn:
        conn.default_channel.queue_delete(dlq)
        conn.default_channel.queue_declare(
            dlq,
            durable=True,
            auto_delete=False,
            arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
        )


def drain(broker_url: str, queue: str) -> list[Any]:
    """Take every message out of ``queue`` (acked): the test owns the queue."""
    messages = []
    with Connection(broker_url) as conn:
        channel = conn.channel()
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            messages.append(message)
    return messages


@pytest.fixture
def private_node(tmp_path: Path) -> Iterator[Any]:
    """A RabbitMQ node of this test's own (ports, data, logs), stopped afterwards.

    For tests that stop or break a broker: the suite's own broker is never touched.
    """
    from .rabbitnode import RabbitNode, node_support

    why_not = node_support()
    if why_not is not None:
        if os.environ.get("CI"):
            pytest.fail(why_not)
        pytest.skip(why_not)
    node = RabbitNode(f"de{uuid.uuid4().hex[:8]}")
    try:
        yield node.start()
    finally:
        node.stop()
