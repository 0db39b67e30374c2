"""``DomainEvents(app, service=...)``: the one entry point that touches a Celery app."""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from typing import Any
from urllib.parse import quote

from celery import Celery
from kombu import Connection

from . import _compat
from .amqp.transport import AmqpTransport, Transport
from .config import Settings, setting_name
from .events import DomainEvent
from .exceptions import ConfigurationError
from .registry import EventRegistry, HandlerRegistry, HandlerSpec, default_events, default_handlers
from .upcasting import UpcasterRegistry, check_handlers, default_upcasters
from .urls import RedactedURL, redact
from .wire.message import OutboundMessage
from .wire.topology import Topology

__all__ = ["DomainEvents"]

_installed: weakref.WeakKeyDictionary[Celery, DomainEvents] = weakref.WeakKeyDictionary()
_lock = threading.Lock()

# The worker steps, by dotted path: Celery imports them when a worker starts, so a web process
# that installs DomainEvents never imports the worker side.
_WORKER_STEP = "celery_domain_events.consuming.bootstep:DomainEventsTopology"
_CONSUMER_STEP = "celery_domain_events.consuming.bootstep:DomainEventsStep"


def _aio_url(conn: Connection) -> str:
    """The URL aio-pika understands for a kombu connection (its defaults filled in)."""
    info = conn.info()
    vhost = info["virtual_host"] or "/"
    return "{}://{}:{}@{}:{}/{}".format(
        "amqps" if info["ssl"] else "amqp",
        quote(str(info["userid"]), safe=""),
        quote(str(info["password"]), safe=""),
        info["hostname"],
        info["port"],
        "" if vhost == "/" else quote(vhost, safe=""),
    )


def _on_configure(sender: Celery, **_: Any) -> None:
    # Celery's own publishing (tasks, task events, worker heartbeats) is left as configured:
    # events, retries and dead letters go through amqp.confirm's own confirm channel under
    # domain_events_publish_timeout. Turning confirm_publish on for all of Celery made a
    # worker's heartbeat wait for a confirm without a deadline, and a broker memory alarm
    # stopped every handler of the worker until it cleared.
    _mask_urls(sender)


def _mask_urls(app: Celery) -> None:
    # Celery's report and inspect conf mask only the settings they know: hide our URL's
    # password from them too. Also when the settings are read, for a URL set after the app
    # was configured.
    for key in [k for k in list(app.conf) if isinstance(k, str)]:
        if setting_name(key, getattr(app, "namespace", None)) != "management_url":
            continue
        url = app.conf.get(key)
        if isinstance(url, str):
            app.conf[key] = RedactedURL(url)


def _published(publishes: Iterable[Any], events: EventRegistry) -> tuple[type[DomainEvent], ...]:
    """``publishes=``, checked: concrete event classes, one per name and version.

    Raises:
        ConfigurationError: one line, saying what to pass instead.
    """
    if isinstance(publishes, (str, bytes)) or not isinstance(publishes, Iterable):
        raise ConfigurationError(
            f"publishes= takes a list of event classes, got {type(publishes).__name__}: "
            "write publishes=[UserCreated, ...]"
        )
    found: dict[tuple[str, int], type[DomainEvent]] = {}
    for item in publishes:
        if isinstance(item, str):
            named = [m.__name__ for m in events.all() if m.event_name == item]
            raise ConfigurationError(
                f"publishes= takes event classes, not names: for {item!r} pass "
                f"{' or '.join(named) or 'the DomainEvent subclass that declares it'}"
            )
        if isinstance(item, DomainEvent):
            name = type(item).__name__
            raise ConfigurationError(
                f"publishes= takes event classes, got a {name} event: pass the class, {name}"
            )
        if not (isinstance(item, type) and issubclass(item, DomainEvent)):
            raise ConfigurationError(
                f"publishes= takes DomainEvent subclasses, got {repr(item)[:80]}: pass the event "
                "class itself, publishes=[UserCreated]"
            )
        if "event_name" not in vars(item):
            raise ConfigurationError(
                f"publishes= got {item.__name__}, which declares no event_name (an abstract "
                "base): list the event classes that do"
            )
        key = (item.event_name, item.event_version)
        other = found.setdefault(key, item)
        if other is not item:
            raise ConfigurationError(
                f"publishes= lists both {other.__name__} and {item.__name__} for "
                f"{key[0]!r} v{key[1]}: keep one"
            )
    return tuple(found.values())


class DomainEvents:
    """Install domain events on a Celery app.

    ::

        app = Celery("billing", broker="amqp://guest:guest@127.0.0.1:5672//")
        DomainEvents(app, service="billing")

    Settings come from ``app.conf`` (``domain_events_*`` keys) and are read when first needed, so
    ``app.config_from_object(...)`` may come before or after; keyword arguments win. The worker
    bootstep is added to ``app.steps["consumer"]``, and handler tasks ack late, so the
    worker's own settings (prefetch, pool, time limits) apply to handlers unchanged.

    Args:
        app: the Celery app.
        handlers: restrict this app to these handler names or ``Handler`` objects (default:
            every registered handler).
        publishes: the event classes this service publishes (``[UserCreated, OrderPlacedV2]``),
            which ``celery -A proj domain-events catalogue`` lists as ``send`` operations;
            the default is every event model in ``events`` (the classes the code declares),
            and ``publishes=`` narrows that to what the service really sends. It describes;
            ``emit()`` does not check it.
        events: the event registry (default: the one ``DomainEvent`` subclasses fill).
        handler_registry: the handler registry (default: the one the decorator fills).
        upcasters: the upcasters (default: the ones ``@upcaster`` registers).
        transport: where messages are published (default: the app's broker, with confirms);
            the in-process test harness passes its own.
        discover_handlers: import the ``handlers`` module of every package Celery discovers
            tasks in by itself (the installed apps of a Django project), when a worker or a
            ``celery`` command starts: ``app.autodiscover_tasks(related_name="handlers")``.
        overrides: settings, as keyword arguments (``service="billing"``).

    Raises:
        ConfigurationError: an override is not a known setting, or ``publishes`` holds
            something other than concrete ``DomainEvent`` subclasses.
    """

    def __init__(
        self,
        app: Celery,
        *,
        handlers: Iterable[Any] | None = None,
        publishes: Iterable[type[DomainEvent]] | None = None,
        events: EventRegistry = default_events,
        handler_registry: HandlerRegistry = default_handlers,
        upcasters: UpcasterRegistry = default_upcasters,
        transport: Transport | None = None,
        discover_handlers: bool = True,
        **overrides: Any,
    ) -> None:
        unknown = set(overrides) - set(Settings.model_fields)
        if unknown:
            raise ConfigurationError(
                f"unknown DomainEvents option(s): {', '.join(sorted(unknown))}"
            )
        self.app = app
        self.events = events
        self.upcasters = upcasters
        self._handler_registry = handler_registry
        self._handler_names = (
            None if handlers is None else [getattr(h, "name", h) for h in handlers]
        )
        #: The ``publishes=`` argument, checked; None if it was not given.
        self.publishes = None if publishes is None else _published(publishes, events)
        self._overrides = overrides
        self._transport = transport
        self._broker_checked = False
        # Every process that uses the library reads messages others may have published.
        _compat.harden_amqp_decoder()
        with _lock:
            _installed[app] = self
        app.steps["worker"].add(_WORKER_STEP)
        app.steps["consumer"].add(_CONSUMER_STEP)
        if discover_handlers:
            # Lazy, as Celery's own discovery: run when the worker imports its modules.
            app.autodiscover_tasks(related_name="handlers")
        if app.configured:  # type: ignore[attr-defined]  # missing from celery-types
            _on_configure(app)
        else:
            app.on_after_configure.connect(_on_configure, sender=app, weak=False)

    @classmethod
    def of(cls, app: Celery) -> DomainEvents:
        """Return the ``DomainEvents`` installed on ``app``.

        Raises:
            ConfigurationError: none is installed.
        """
        app = _compat.app_behind_proxy(app)  # celery.current_app is a proxy
        try:
            return _installed[app]
        except KeyError:
            raise ConfigurationError(
                f"no DomainEvents installed on Celery app {app.main!r}; "
                "call DomainEvents(app, service=...) where the app is created (with the "
                "celery command, name that module: celery -A proj ...)"
            ) from None

    @cached_property
    def _broker(self) -> AmqpTransport:
        return AmqpTransport(
            lambda: self.app.pool.acquire(block=True), lambda: self.settings.publish_timeout
        )

    @property
    def transport(self) -> Transport:
        """Where this app's messages are published (the broker, unless one was passed in)."""
        return self._broker if self._transport is None else self._transport

    @contextmanager
    def using(self, transport: Transport) -> Iterator[Transport]:
        """Publish through ``transport`` inside the block, then restore the previous one."""
        previous, self._transport = self._transport, transport
        try:
            yield transport
        finally:
            self._transport = previous

    @cached_property
    def _aio_broker(self) -> Any:
        urls = self._amqp_urls()
        if urls is None:
            return None  # not RabbitMQ (kombu's memory:// in tests): the sync path, in a thread
        try:
            from .amqp.aio import AioPikaTransport  # noqa: PLC0415 (an optional dependency)
        except ImportError as exc:
            raise ConfigurationError(
                f"publishing from asyncio needs aio-pika ({exc}); "
                "pip install 'celery-domain-events[asyncio]'"
            ) from exc
        return AioPikaTransport(urls, lambda: self.settings.publish_timeout)

    def _amqp_urls(self) -> list[str] | None:
        """The broker's AMQP URLs (a failover list has several), or None for other brokers."""
        conn = self.app.connection_for_write()
        try:
            if conn.transport.driver_type != "amqp":
                return None
            return [_aio_url(Connection(alt)) for alt in conn.alt] or [_aio_url(conn)]
        finally:
            conn.release()

    async def publish_async(
        self, messages: list[OutboundMessage], declare: Sequence[Any] = ()
    ) -> None:
        """Publish ``messages`` from asyncio and wait for every confirm, without blocking.

        Through aio-pika, one connection per event loop; a transport passed in (the test
        harness's) is used as :meth:`publish` would, awaited if it has ``publish_async``.

        Raises:
            PublishError: as for :meth:`publish`.
            ConfigurationError: aio-pika is not installed.
        """
        transport: Any = self._transport if self._transport is not None else self._aio_broker
        if transport is None:
            transport = self._broker
        publish_async = getattr(transport, "publish_async", None)
        if publish_async is not None:
            await publish_async(messages, declare)
        else:
            await asyncio.to_thread(transport.publish, messages, declare)

    async def aclose(self) -> None:
        """Close the asyncio connection of the running event loop (in an ASGI lifespan's end)."""
        if "_aio_broker" in self.__dict__ and self._aio_broker is not None:
            await self._aio_broker.close()

    def publish(self, messages: list[OutboundMessage], declare: Sequence[Any] = ()) -> None:
        """Publish ``messages`` through :attr:`transport` and wait for every confirm.

        Raises:
            PublishError: the broker did not confirm within ``domain_events_publish_timeout``,
                or refused the connection.
        """
        self.transport.publish(messages, declare)

    def check_broker(self) -> None:
        """Fail early and clearly on a broker URL no kombu transport understands.

        Raises:
            ConfigurationError: the URL's scheme names no installed transport.
        """
        if self._broker_checked:
            return
        try:
            conn = self.app.connection_for_write()
            _ = conn.transport
        except (KeyError, ImportError, ValueError) as exc:
            url = redact(self.app.conf.broker_write_url or self.app.conf.broker_url)
            raise ConfigurationError(f"unusable broker URL {url}: {exc}") from exc
        conn.release()
        self._broker_checked = True

    @cached_property
    def settings(self) -> Settings:
        """The validated settings (read from ``app.conf`` on first access)."""
        _mask_urls(self.app)
        return Settings.from_conf(
            self.app.conf, namespace=getattr(self.app, "namespace", None), **self._overrides
        )

    @property
    def handlers(self) -> list[HandlerSpec]:
        """The handlers this app's workers consume, ordered by name.

        Raises:
            ConfigurationError: a name given in ``handlers=`` is not registered.
        """
        specs = self._handler_registry.all()
        if self._handler_names is None:
            return specs
        known = {s.name: s for s in specs}
        missing = [n for n in self._handler_names if n not in known]
        if missing:
            raise ConfigurationError(f"unknown handler(s): {', '.join(missing)}")
        return [known[n] for n in sorted(set(self._handler_names))]

    @staticmethod
    def installed_anywhere() -> bool:
        """Whether any Celery app of this process has a ``DomainEvents``."""
        return bool(_installed)

    def _consume_only(self, names: Iterable[str]) -> None:
        # A worker whose -Q or -X names handler queues runs only these handlers.
        self._handler_names = sorted(set(names))

    @property
    def published_events(self) -> list[type[DomainEvent]]:
        """The event classes this service publishes, ordered by name and version.

        ``publishes=`` if it was given, else every model in :attr:`events`.
        """
        models = self.events.all() if self.publishes is None else self.publishes
        return sorted(models, key=lambda m: (m.event_name, m.event_version))

    def check_upcasters(self) -> None:
        """Refuse handlers that a known version of their events could not reach (see upcasting).

        Raises:
            ConfigurationError: an upcaster chain a handler needs has a gap.
        """
        check_handlers(self.handlers, self.events, self.upcasters)

    def handler_for_queue(self, queue: str) -> HandlerSpec | None:
        """Return the handler whose queue is ``queue``, or None."""
        for spec in self.handlers:
            if self.topology.handler_queue_name(spec) == queue:
                return spec
        return None

    @cached_property
    def topology(self) -> Topology:
        """Names and kombu entities of this app's exchanges and queues."""
        return Topology(self.settings)

    def register_retry_queues(self) -> None:
        """Make Celery's routing aware of the handler queues, without consuming them.

        Celery's quorum-queue detection (global QoS off, native delayed delivery) and its
        delayed-delivery bindings look at ``app.amqp.queues``; Celery's task consumer must not
        read them (see ``_compat.add_unconsumed_queue``): the bootstep consumes them itself.
        Transient handlers' queues are left out: classic, named per worker, never delayed
        by the broker.
        """
        queues = self.app.amqp.queues
        for spec in self.handlers:
            if not spec.transient and self.topology.handler_queue_name(spec) not in queues:
                _compat.add_unconsumed_queue(queues, self.topology.retry_queue(spec))
