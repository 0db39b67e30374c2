"""Opt-in pytest fixtures for testing domain-event handlers, in process and for real.

Enable it in your root ``conftest.py`` (it is never loaded automatically)::

    pytest_plugins = ["celery_domain_events.testing.pytest_plugin"]


    def test_welcome_mail(domain_events_app, domain_events_worker):
        app = domain_events_app(handlers=[send_welcome_email])
        with domain_events_worker(app):
            emit(UserCreated(user_id=1))
            transmit(app)
            ...  # wait for the handler's side effect


    def test_welcome_mail_in_process(domain_events_capture):
        app = Celery("billing", broker="memory://", set_as_current=False)
        DomainEvents(app, service="billing", handlers=[send_welcome_email])
        events = domain_events_capture(app)
        ...

=========================== =========================================================
``domain_events_broker_url``  session: ``$DOMAIN_EVENTS_BROKER_URL`` or the local RabbitMQ;
                              unreachable: skip, or fail when ``$CI`` is set
``domain_events_prefix``      a unique name prefix for this test
``domain_events_app``         factory ``(service="svc", handlers=None, **conf) -> Celery``;
                              every entity it names carries the prefix and is deleted after
``domain_events_worker``      ``with domain_events_worker(app): ...``: a real worker in a thread
``domain_events_capture``     ``domain_events_capture(app) -> EventCapture`` (no broker)
=========================== =========================================================

A test module may opt in through its own ``pytest_plugins`` as well, but it is imported before
the plugin registers its markers: under ``--strict-markers`` its decorators cannot name them
unless the ini declares them (the automatic marking below still works).

Tests using the broker fixtures get the ``rabbitmq`` marker, and those using
``domain_events_worker`` the ``worker`` marker, so ``-m "not rabbitmq"`` runs the rest. The
names never clash with pytest-celery or ``celery.contrib.pytest`` (``celery_app``,
``celery_worker``, ``celery_config``), which may be installed alongside.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from kombu import Connection
from kombu.common import ignore_errors

from celery_domain_events import _compat
from celery_domain_events.extension import DomainEvents
from celery_domain_events.publishing.api import discard
from celery_domain_events.urls import redact

from . import EventCapture, capture_events

__all__ = [
    "BROKER_URL_ENV",
    "DEFAULT_BROKER_URL",
    "domain_events_app",
    "domain_events_broker_url",
    "domain_events_capture",
    "domain_events_prefix",
    "domain_events_worker",
]

#: Environment variable naming the broker of the real-broker fixtures.
BROKER_URL_ENV = "DOMAIN_EVENTS_BROKER_URL"
#: The broker used when the variable is not set.
DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"

_MARKERS = {
    "rabbitmq": "needs a live RabbitMQ (domain_events_broker_url)",
    "worker": "starts a real celery worker (domain_events_worker)",
}
#: A test using one of these fixtures (directly or not) gets the marker.
_MARKED_BY = {"domain_events_broker_url": "rabbitmq", "domain_events_worker": "worker"}


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``rabbitmq`` and ``worker`` markers (``--strict-markers`` safe)."""
    for name, description in _MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that use the real broker or a real worker."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        for fixture, marker in _MARKED_BY.items():
            if fixture in names and item.get_closest_marker(marker) is None:
                item.add_marker(marker)


def _unreachable(url: str) -> str | None:
    conn = Connection(url, connect_timeout=3)
    errors: tuple[type[BaseException], ...] = (OSError, *conn.connection_errors)
    try:
        conn.connect()
    except errors as exc:
        return repr(exc)
    finally:
        conn.release()
    return None


@pytest.fixture(scope="session")
def domain_events_broker_url() -> str:
    """The RabbitMQ URL of the real-broker fixtures (``$DOMAIN_EVENTS_BROKER_URL``).

    An unreachable broker skips the test locally and fails it when ``$CI`` is set, so CI
    never passes by skipping.
    """
    url = os.environ.get(BROKER_URL_ENV) or DEFAULT_BROKER_URL
    problem = _unreachable(url)
    if problem is not None:
        message = f"RabbitMQ is not reachable at {redact(url)}: {problem}"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return url


@pytest.fixture
def domain_events_prefix() -> str:
    """A prefix unique to this test, for exchange, queue and service names (one word)."""
    return f"test-{uuid.uuid4().hex[:12]}"


class _Apps:
    """Builds prefixed apps and deletes what their names point to on the broker."""

    def __init__(self, broker_url: str, prefix: str) -> None:
        self.broker_url = broker_url
        self.prefix = prefix
        self.apps: list[Celery] = []

    def __call__(
        self, service: str = "svc", handlers: Iterable[Any] | None = None, **conf: Any
    ) -> Celery:
        name = f"{self.prefix}-{service}"
        app = Celery(name, broker=self.broker_url, set_as_current=False)
        app.conf.update(
            broker_heartbeat=None,  # else each worker shutdown waits for a heartbeat
            broker_connection_retry_on_startup=True,
            worker_hijack_root_logger=False,
            # The worker consumes the default queue: never a shared "celery" queue.
            task_default_queue=f"{self.prefix}.celery",
            domain_events_exchange=f"{self.prefix}.events",
            domain_events_unrouted_queue=f"{self.prefix}.unrouted",
            **conf,
        )
        DomainEvents(app, service=name, handlers=handlers)
        self.apps.append(app)
        return app

    def entities(self) -> tuple[set[str], set[str]]:
        """Return the (queues, exchanges) the apps may have declared that carry the prefix."""
        queues: set[str] = set()
        exchanges: set[str] = set()
        for app in self.apps:
            ext = DomainEvents.of(app)
            for spec in ext.handlers:
                queues |= {
                    ext.topology.handler_queue_name(spec),
                    ext.topology.dead_letter_queue(spec).name,
                }
            default_queue = str(app.conf.task_default_queue)  # a queue and its exchange
            queues.add(default_queue)
            exchanges |= {default_queue, ext.settings.exchange, ext.topology.retry_exchange().name}
            unrouted = ext.settings.unrouted_queue  # a queue and its alternate exchange
            if unrouted:
                queues.add(unrouted)
                exchanges.add(unrouted)
        # Names overridden through **conf may be shared: only what the prefix marks is ours.
        marks = (f"{self.prefix}.", f"{self.prefix}-")
        return (
            {q for q in queues if q.startswith(marks)},
            {x for x in exchanges if x.startswith(marks)},
        )

    def cleanup(self) -> None:
        """Delete every prefixed queue, dead-letter queue and exchange of the apps."""
        if not self.apps:
            return
        queues, exchanges = self.entities()
        with Connection(self.broker_url) as conn:
            for queue in sorted(queues):
                _delete(conn, "queue_delete", queue)
            for exchange in sorted(exchanges):
                _delete(conn, "exchange_delete", exchange)


def _delete(conn: Connection, method: str, name: str) -> None:
    # A fresh channel per delete: the broker closes the channel on an error.
    channel: Any = conn.channel()
    try:
        getattr(channel, method)(name)
    except conn.channel_errors:
        pass  # already gone
    finally:
        ignore_errors(conn, channel.close)


@pytest.fixture
def domain_events_app(domain_events_broker_url: str, domain_events_prefix: str) -> Iterator[_Apps]:
    """Build apps on the real broker: ``domain_events_app(service="svc", handlers=None, **conf)``.

    The exchange (``<prefix>.events``), unrouted queue (``<prefix>.unrouted``), default task
    queue (``<prefix>.celery``) and service (``<prefix>-<service>``, so handler queues are
    ``<prefix>-<service>.<handler>``) carry the test's prefix; ``broker_heartbeat`` is off.
    ``handlers=None`` means every registered handler, as for ``DomainEvents``. ``conf`` is
    applied to ``app.conf`` last. In teardown every queue, DLQ and exchange named with the
    prefix is deleted; names without it (overridden through ``conf``) are left alone.
    """
    apps = _Apps(domain_events_broker_url, domain_events_prefix)
    yield apps
    apps.cleanup()


@contextmanager
def _worker(app: Celery, **options: Any) -> Iterator[Any]:
    options.setdefault("pool", "solo")
    options.setdefault("perform_ping_check", False)  # no celery.ping task on our apps
    options.setdefault("shutdown_timeout", 30)
    options.setdefault("loglevel", "WARNING")
    with _compat.restored_current_app(), start_worker(app, **options) as worker:
        yield worker


@pytest.fixture
def domain_events_worker(
    domain_events_app: _Apps,
) -> Callable[..., AbstractContextManager[Any]]:
    """Run a real worker in a thread for an app.

    Use it as ``with domain_events_worker(app, **options) as worker:``. It is Celery's
    ``start_worker`` (solo pool, no ping check, WARNING log level unless ``options`` say
    otherwise); the handler queues are declared and consumed once the block is entered, and
    Celery's current and default app are restored when it exits. The fixture depends on
    ``domain_events_app`` so that the apps' queues are deleted only after every worker stopped.
    """
    return _worker


@pytest.fixture
def domain_events_capture() -> Iterator[Callable[..., EventCapture]]:
    """Capture an app's events in memory, with no broker.

    ``events = domain_events_capture(app, fail_fast=True)`` returns an ``EventCapture`` (see
    :func:`celery_domain_events.testing.capture_events`). The capture ends, restoring the
    app's transport, in teardown; the test thread's ``emit()`` buffer is emptied before and
    after the test.
    """
    discard()
    with ExitStack() as stack:

        def capture(app: Celery, *, fail_fast: bool = True) -> EventCapture:
            return stack.enter_context(capture_events(app, fail_fast=fail_fast))

        try:
            yield capture
        finally:
            discard()
