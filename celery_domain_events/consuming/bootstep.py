"""The worker side: a consumer bootstep that declares the topology and feeds Celery's pool.

::

    celery worker ── Consumer blueprint ── Connection ─ ... ─ Tasks ─ DomainEventsStep
                                                                        │ declare exchange,
                                                                        │ queues, bindings, DLQs
                                                                        ▼
      <service>.<handler> ─► kombu Consumer (Celery's task channel, its prefetch/QoS)
                               │ CloudEvent (first delivery, retry or replay)
                               │   ─► wire.inbound.check ─► delivery.to_task_message ─► task
                               └ poison (not a CloudEvent, a task message, too large or deep)
                                   ─► <queue>.dlq with an x-failure-* record, then ack

A transient handler's queue is this worker's own, exclusive to its connection: declared afresh,
under a new name, at each start of the step (so after each reconnect) and each resume; its
poison and final failures are logged and acked (no DLQ).

Consumers share the channel of Celery's own task consumer, so its ETA bookkeeping and connection
recovery apply to events as to tasks. Prefetch: on classic queues Celery sets a global QoS on
that channel, so the task queue and every handler queue share one budget (concurrency x
multiplier); quorum queues refuse global QoS, Celery then sets it per consumer, and a worker may
hold (handlers + 1) x that many unacked deliveries. On a reconnect Celery restarts the blueprint
and this step declares and consumes again.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from celery import bootsteps
from kombu import Consumer
from kombu.common import ignore_errors
from kombu.exceptions import OperationalError
from kombu.message import Message
from kombu.transport.native_delayed_delivery import (
    bind_queue_to_native_delayed_delivery_exchange,
    declare_native_delayed_delivery_exchanges_and_queues,
)
from kombu.utils.url import maybe_sanitize_url

from celery_domain_events import _compat, metrics
from celery_domain_events.amqp.queues import declare, depth
from celery_domain_events.config import QueueType
from celery_domain_events.exceptions import ConfigurationError, EventDecodeError
from celery_domain_events.extension import DomainEvents
from celery_domain_events.registry import HandlerSpec
from celery_domain_events.wire import inbound
from celery_domain_events.wire.dead_letter import FailureReason, dead_letter_message
from celery_domain_events.wire.message import OutboundMessage
from celery_domain_events.wire.topology import transient_instance

from . import dead_letter, exposition
from .delivery import to_batch_task_message, to_task_message
from .queue_options import select_handlers
from .task import on_refused_dead_letter

__all__ = ["DomainEventsStep", "DomainEventsTopology"]

log = logging.getLogger(__name__)

#: The worker warns when the unrouted queue is this full (of its max length), or holds this
#: many events when it is unbounded; it checks at start and every UNROUTED_CHECK_SECONDS.
UNROUTED_WARN_FRACTION = 0.8
UNROUTED_WARN_UNBOUNDED = 10_000
UNROUTED_CHECK_SECONDS = 300.0
#: A handler queue whose dead letter the broker did not confirm is held (not consumed) this
#: long, doubling up to HOLD_MAX_SECONDS while refusals go on: a DLQ that refuses publishes
#: then costs the worker one publish deadline per hold, not one per delivery.
HOLD_FIRST_SECONDS = 15.0
HOLD_MAX_SECONDS = 300.0
#: The largest prefetch count AMQP can carry (a 16-bit field).
MAX_PREFETCH = 65_535


def hold_limit(spec: HandlerSpec) -> float:
    """The longest a worker holds a delayed retry of ``spec`` (its ``x-retry-at`` is untrusted).

    The handler's own longest retry delay, or a busy inbox's (``max_retry_after``, a
    :class:`~..contrib.redis_inbox.RedisInbox`'s lease) if longer, plus a second: a retry
    the worker published itself is never cut short.
    """
    policy = spec.retry.max_delay if spec.retry is not None else 0.0
    busy = getattr(spec.idempotent, "max_retry_after", 0.0)
    if not isinstance(busy, int | float) or isinstance(busy, bool):
        busy = 0.0
    return max(policy, float(busy)) + 1.0


class _Dispatch:
    """The ``on_message`` callback of one handler queue (runs in the worker's main thread).

    Every delivery ends as a task for this handler or as a poison dead letter: no content of
    a message can raise out of here, which would stop the worker.
    """

    def __init__(
        self,
        ext: DomainEvents,
        spec: HandlerSpec,
        queue: str,
        on_task_received: Callable[[Message], Any],
        on_refused: Callable[[str], Any] = lambda queue: None,
        *,
        in_process: bool = False,
    ) -> None:
        self.ext = ext
        self.in_process = in_process
        self.spec = spec
        self.queue = queue
        self.on_task_received = on_task_received
        self.on_refused = on_refused
        self.max_bytes = ext.settings.max_event_bytes
        self.retry_exchanges = frozenset({ext.topology.retry_exchange().name})
        self.max_delay = hold_limit(spec)

    def __call__(self, message: Message) -> None:
        try:
            checked = inbound.check(
                message,
                max_bytes=self.max_bytes,
                retry_exchanges=self.retry_exchanges,
                max_delay=self.max_delay,
            )
            task_message = self.task_message(message, checked)
        except EventDecodeError as exc:
            self.dead_letter(message, exc)
            return
        except Exception as exc:  # untrusted input must never stop the worker
            log.exception("Could not read a delivery on %s; dead-lettering it", self.queue)
            self.dead_letter(message, EventDecodeError(f"unreadable delivery: {exc!r}"[:500]))
            return
        if task_message is not None:
            self.on_task_received(task_message)

    def task_message(self, message: Message, checked: inbound.Inbound) -> Message | None:
        """The task message to run now for ``message`` (a batch handler: once one is full)."""
        return to_task_message(message, checked, self.spec, self.queue, in_process=self.in_process)

    def stop(self) -> None:
        """Forget what this consumer holds (unacked, the broker redelivers it)."""

    def dead_letter(self, message: Message, exc: EventDecodeError) -> None:
        try:
            record = self._dead_letter_message(message, exc)
        except Exception:
            # Last resort: the broker dead-letters it to the same DLQ (x-death, no record).
            log.exception("Could not build the dead letter of a message on %s", self.queue)
            message.reject(requeue=False)
            return
        if self.spec.transient:  # no DLQ
            dead_letter.drop(record)
            message.ack()
            metrics.handler_outcome(self.ext.settings, self.spec.name, metrics.DROPPED)
            return
        try:
            dead_letter.send(self.ext, record)
        except Exception as send_error:
            log.error(
                "Could not dead-letter a poison message from %s (%r); requeueing it",
                self.queue,
                send_error,
            )
            self.on_refused(self.queue)  # first: the requeued message must not come back here
            message.reject(requeue=True)
            return
        message.ack()
        metrics.handler_outcome(self.ext.settings, self.spec.name, metrics.DEAD_LETTERED)
        log.error("Poison message on %s dead-lettered: %s", self.queue, str(exc)[:500])

    def _dead_letter_message(self, message: Message, exc: EventDecodeError) -> OutboundMessage:
        delivery_info = message.delivery_info or {}
        body = inbound.raw_body(message.body, message.content_encoding)
        return dead_letter_message(
            body=body,
            queue=self.queue,
            handler=self.spec.name,
            reason=FailureReason.POISON,
            exc=exc,
            traceback="",
            attempts=1,
            exchange=str(delivery_info.get("exchange", "")),
            routing_key=str(delivery_info.get("routing_key", "")),
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            properties={
                k: v
                for k, v in (message.properties or {}).items()
                if k in ("message_id", "type", "timestamp", "app_id", "correlation_id")
            },
            headers=message.headers,
        )


class _BatchDispatch(_Dispatch):
    """The ``on_message`` callback of a batch handler's queue: gathers deliveries into batches.

    A batch goes to the pool as one task when ``max_size`` deliveries are waiting, or when the
    first of them has waited ``max_wait`` seconds (a timer on the worker's event loop). A
    delayed retry waits in the worker until it is due, then joins the next batch. Deliveries
    stay unacked until their batch's task ends, so a crash redelivers the whole batch.
    """

    def __init__(
        self,
        ext: DomainEvents,
        spec: HandlerSpec,
        queue: str,
        on_task_received: Callable[[Message], Any],
        on_refused: Callable[[str], Any],
        *,
        timer: Any,
        qos: Any,
    ) -> None:
        super().__init__(ext, spec, queue, on_task_received, on_refused)
        assert spec.batch is not None
        self.batch = spec.batch
        self.timer = timer
        self.qos = qos
        self.pending: list[tuple[Message, inbound.Inbound]] = []
        self.flush_entry: Any = None
        self.delayed: set[Any] = set()
        # Timers run on the event loop's thread, except with green pools (a timer thread).
        self.lock = threading.Lock()

    def task_message(self, message: Message, checked: inbound.Inbound) -> Message | None:
        checked.parsed = None  # batch items go to the pool as text: hold no parsed copy
        if checked.due is not None:
            # Hold a delayed retry here, as Celery holds an ETA task: it must not count
            # against the prefetch budget meanwhile.
            if self.qos is not None:
                self.qos.increment_eventually()
            holder: list[Any] = []
            # kombu's timer runs on the monotonic clock; ``due`` is epoch seconds.
            delay = max(0.0, checked.due - time.time())
            entry = self.timer.call_after(delay, self._due, (message, checked, holder))
            holder.append(entry)
            self.delayed.add(entry)
            return None
        with self.lock:
            return self._add(message, checked)

    def _add(self, message: Message, checked: inbound.Inbound) -> Message | None:
        self.pending.append((message, checked))
        if len(self.pending) >= self.batch.max_size:
            return self._take()
        if self.flush_entry is None:
            self.flush_entry = self.timer.call_after(self.batch.max_wait, self._flush_due)
        return None

    def _take(self) -> Message:
        task_message = to_batch_task_message(self.pending, self.spec, self.queue)
        if self.flush_entry is not None:
            self.flush_entry.cancel()
            self.flush_entry = None
        self.pending = []
        return task_message

    def _flush_due(self) -> None:
        with self.lock:
            self.flush_entry = None
            task_message = self._take() if self.pending else None
        if task_message is not None:
            self.on_task_received(task_message)

    def _due(self, message: Message, checked: inbound.Inbound, holder: list[Any]) -> None:
        self.delayed.discard(holder[0] if holder else None)
        if self.qos is not None:
            self.qos.decrement_eventually()
        with self.lock:
            task_message = self._add(message, checked)
        if task_message is not None:
            self.on_task_received(task_message)

    def stop(self) -> None:
        with self.lock:
            if self.flush_entry is not None:
                self.flush_entry.cancel()
                self.flush_entry = None
            for entry in self.delayed:
                entry.cancel()
            self.delayed.clear()
            self.pending = []


class DomainEventsStep(bootsteps.StartStopStep):
    """Declare the domain-events topology and consume every handler queue."""

    label = "DomainEvents"
    #: After Celery's task consumer, whose channel and task handler are reused.
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        self.consumers: list[Consumer] = []
        #: The event loop and the hook that runs its ready callbacks before each poll.
        self.hub: Any = None
        self.ready_hook: Callable[[], None] | None = None
        self.dispatches: list[_Dispatch] = []
        #: queue name -> (its consumer, the queue): what pause and resume act on.
        self.by_queue: dict[str, tuple[Consumer, Any]] = {}
        #: Handler queues paused by ``celery control cancel_consumer``; kept across restarts.
        self.paused: set[str] = set()
        self.timers: list[Any] = []
        #: Handler queues held after a refused dead letter -> the timer entry that resumes them.
        self.held: dict[str, Any] = {}
        #: queue -> (its next hold in seconds, when it was last held): the hold's back-off.
        self.backoff: dict[str, tuple[float, float]] = {}
        self.timer: Any = None
        #: Every handler queue this worker consumes (stays known across restarts). Each of
        #: these names is ``<service>.<handler>``, also for transient handlers, whose
        #: queues' own names (``aliases``) change at each start and resume.
        self.handler_queues: set[str] = set()
        #: A transient queue's name -> its handler's ``<service>.<handler>``.
        self.aliases: dict[str, str] = {}
        #: ``<service>.<handler>`` -> the spec, for transient handlers.
        self.transient: dict[str, HandlerSpec] = {}
        self.ext: DomainEvents | None = None
        self.hostname = str(getattr(parent, "hostname", None) or "worker")
        # All steps are built before any starts: registering the queues here lets Celery's
        # Tasks step turn global QoS off and DelayedDelivery switch on for quorum queues.
        try:
            ext = DomainEvents.of(parent.app)
            ext.register_retry_queues()
            ext.check_upcasters()  # a gap in a chain fails here, not on the first old event
        except ConfigurationError as exc:
            # Celery would print a traceback for it; a setting's mistake deserves one line.
            raise SystemExit(f"Error: {exc}") from None
        super().__init__(parent, **kwargs)

    def start(self, parent: Any) -> None:
        """Declare exchange, queues, bindings and DLQs, then consume the handler queues."""
        ext = self.ext = DomainEvents.of(parent.app)
        if not ext.handlers:
            log.warning(
                "Domain events: app %r has no handlers, so this worker consumes no events. "
                "Import the modules that define them in the worker (Celery(include=[...]), "
                "app.autodiscover_tasks(related_name='handlers'), or import them in the "
                "module that creates the app).",
                parent.app.main,
            )
        channel = parent.task_consumer.channel
        self.timer = getattr(parent, "timer", None)
        on_refused_dead_letter(parent.app, self.hold)
        declare(ext.topology.worker_entities(ext.handlers), channel)
        if ext.settings.queue_type is QueueType.QUORUM:
            _bind_for_native_delay(ext, parent.connection)
        on_task_received = parent.create_task_handler()
        self._raise_prefetch(ext, parent)
        self.hub = getattr(parent, "hub", None)
        if self.hub is not None and self.ready_hook is None:
            # Handler queues are several consumers of one channel: they meet kombu's late-ack
            # stall more often than Celery's single task queue (docs: performance, solo pool).
            self.ready_hook = _compat.flush_ready_before_poll(self.hub)
        in_process = _compat.runs_in_process(getattr(parent, "pool", None))
        for spec in ext.handlers:
            name = ext.topology.handler_queue_name(spec)
            if spec.transient:
                # The previous one, if any, went with its connection: declare a new one.
                queue = self._new_transient(spec, name)
                if name not in self.paused:  # a paused one is declared when resumed
                    declare([queue], channel)
            else:
                queue = ext.topology.handler_queue(spec)
            dispatch = (
                _Dispatch(
                    ext,
                    spec,
                    queue.name,
                    on_task_received,
                    self.hold,
                    in_process=in_process,
                )
                if spec.batch is None
                else _BatchDispatch(
                    ext,
                    spec,
                    queue.name,
                    on_task_received,
                    self.hold,
                    timer=self.timer,
                    qos=getattr(parent, "qos", None),
                )
            )
            consumer = Consumer(
                channel,
                queues=[queue],
                on_message=dispatch,
                auto_declare=False,
                no_ack=False,
            )
            self.dispatches.append(dispatch)
            self.consumers.append(consumer)
            self.by_queue[name] = (consumer, queue)
            self.handler_queues.add(name)
        self._consume_with(parent.task_consumer)
        self._watch_unrouted(ext, parent)
        self.timers += exposition.serve(ext, parent, self._metered_queues)
        _compat.route_queue_control(parent, self.owns, self.pause, self.resume)
        for name in sorted(self.paused):
            log.warning("Domain events: handler queue %s stays paused", name)
        log.info(
            "Domain events: consuming %d handler queue(s) of service %r on exchange %r: %s",
            len(self.consumers),
            ext.settings.service,
            ext.settings.exchange,
            ", ".join(queue.name for _, queue in self.by_queue.values()),
        )

    def _metered_queues(self) -> list[tuple[str, str, str | None]]:
        # (handler, the queue consumed now, its DLQ): a transient queue's name changes.
        assert self.ext is not None
        return [
            (
                spec.name,
                self.by_queue[name][1].name,
                None if spec.transient else self.ext.topology.dead_letter_queue(spec).name,
            )
            for spec in self.ext.handlers
            if (name := self.ext.topology.handler_queue_name(spec)) in self.by_queue
        ]

    def _raise_prefetch(self, ext: DomainEvents, parent: Any) -> None:
        # A batch fills only if the broker may deliver that many unacked events: twice its
        # size per batch handler (one batch running, the next filling), on top of Celery's own
        # budget. Before consuming starts, so that per-consumer QoS (quorum queues) sees it.
        extra = sum(2 * spec.batch.max_size for spec in ext.handlers if spec.batch is not None)
        qos = getattr(parent, "qos", None)
        if extra and qos is not None and qos.value + extra > MAX_PREFETCH:
            # AMQP's prefetch count is 16 bits; kombu would turn a larger one into 0 (no limit).
            raise SystemExit(
                f"Error: the batch handlers need a prefetch of {qos.value + extra} (twice each "
                f"max_size plus Celery's {qos.value}), above AMQP's {MAX_PREFETCH}: lower "
                "Batch.max_size, or run some batch handlers in another worker (-Q/handlers=)"
            )
        if extra and qos is not None:
            qos.increment_eventually(extra)
            qos.update()
            log.info("Domain events: prefetch raised by %d for batch handlers", extra)

    def _new_transient(self, spec: HandlerSpec, name: str) -> Any:
        assert self.ext is not None
        self.transient[name] = spec
        queue = self.ext.topology.transient_queue(
            spec, transient_instance(self.hostname, secrets.token_hex(3))
        )
        self.aliases[queue.name] = name
        return queue

    def _consume_with(self, task_consumer: Any) -> None:
        # Start consuming exactly when Celery starts its own task consumer, once the pool is
        # ready: consuming here already would let a delivery arrive while a later step waits
        # on the connection, and reach a pool that cannot take work yet.
        by_queue = self.by_queue
        paused, held = self.paused, self.held

        def consume_handler_queues() -> None:
            for name, (consumer, _) in by_queue.items():
                if name not in paused and name not in held:
                    consumer.consume()  # idempotent: active queues are skipped

        _compat.start_with_task_consumer(task_consumer, consume_handler_queues)

    def _watch_unrouted(self, ext: DomainEvents, parent: Any) -> None:
        # Events no handler is bound to accumulate unseen: say so now and every few minutes.
        name = ext.settings.unrouted_queue
        if name is None:
            return
        limit = ext.settings.unrouted_max_length
        threshold = int(limit * UNROUTED_WARN_FRACTION) if limit else UNROUTED_WARN_UNBOUNDED

        def check() -> None:
            count = depth(parent.connection, name)
            if count is not None and count >= threshold:
                log.warning(
                    "Domain events: %s holds %d event(s) no handler is bound to (%s); bind a "
                    "handler to them, or purge the queue",
                    name,
                    count,
                    f"the oldest are dropped past {limit}" if limit else "no limit is set",
                )

        ignore_errors(parent.connection, check)
        timer = getattr(parent, "timer", None)
        if timer is not None:
            self.timers.append(
                timer.call_repeatedly(
                    UNROUTED_CHECK_SECONDS, ignore_errors, (parent.connection, check)
                )
            )

    def owns(self, queue: str) -> bool:
        """Whether ``queue`` is one of this worker's handler queues (or transient queues)."""
        return self.aliases.get(queue, queue) in self.handler_queues

    def pause(self, queue: str) -> None:
        """Stop consuming one handler queue (``celery control cancel_consumer <queue>``).

        Its events wait in the queue; deliveries already prefetched still run. A transient
        handler's queue (named ``<service>.<handler>`` or by its own name) is deleted: the
        events published while it is paused are not kept.
        """
        queue = self.aliases.get(queue, queue)
        self.paused.add(queue)
        self._release_hold(queue)
        self._cancel(queue)
        log.warning(
            "Domain events: paused handler queue %s; %s. Resume it with "
            "`celery control add_consumer %s`",
            queue,
            "transient: its events are not kept meanwhile"
            if queue in self.transient
            else "its events wait there",
            queue,
        )

    def resume(self, queue: str) -> None:
        """Consume a paused handler queue again (``celery control add_consumer <queue>``)."""
        queue = self.aliases.get(queue, queue)
        self.paused.discard(queue)
        self._release_hold(queue)
        self._consume(queue)
        log.warning("Domain events: resumed handler queue %s", queue)

    def hold(self, queue: str) -> None:
        """Stop consuming ``queue`` for a while: the broker did not confirm its dead letter.

        Each refused dead letter costs the worker up to ``domain_events_publish_timeout``
        (on the main thread for poison and the solo pool), and the requeued delivery would
        come straight back: holding the queue lets every other handler run meanwhile.
        """
        queue = self.aliases.get(queue, queue)
        if queue not in self.by_queue or queue in self.held or queue in self.paused:
            return
        if self.timer is None:
            return
        now = time.monotonic()
        delay, last = self.backoff.get(queue, (HOLD_FIRST_SECONDS, now))
        if now - last > 2 * HOLD_MAX_SECONDS:  # refusals stopped long ago: start over
            delay = HOLD_FIRST_SECONDS
        self.backoff[queue] = (min(delay * 2, HOLD_MAX_SECONDS), now)
        self._cancel(queue)
        self.held[queue] = self.timer.call_after(delay, self._end_hold, (queue,))
        log.error(
            "Domain events: a dead letter of %s was not confirmed (its DLQ %s.dlq refuses "
            "publishes, or the broker blocks them); holding the queue for %.0f s so the other "
            "handlers keep running. Its events wait there; check the DLQ's length limits",
            queue,
            queue,
            delay,
        )

    def _end_hold(self, queue: str) -> None:
        if self.held.pop(queue, None) is not None and queue not in self.paused:
            self._consume(queue)
            log.warning("Domain events: handler queue %s consumed again after a hold", queue)

    def _release_hold(self, queue: str) -> None:
        entry = self.held.pop(queue, None)
        if entry is not None:
            entry.cancel()

    def _cancel(self, queue: str) -> None:
        if queue not in self.by_queue:  # between a stop and the next start: kept for then
            return
        consumer, entity = self.by_queue[queue]
        if consumer.consuming_from(entity.name):
            consumer.cancel_by_queue(entity.name)

    def _consume(self, queue: str) -> None:
        if queue not in self.by_queue:  # between a stop and the next start: consumed then
            return
        consumer, entity = self.by_queue[queue]
        if not consumer.consuming_from(entity.name):
            if queue in self.transient:
                # Auto-delete: cancelling its consumer deleted it. A new name, not the old
                # one again, which could meet the old queue while the broker deletes it.
                consumer.cancel_by_queue(entity.name)  # forget it (no consumer to cancel)
                entity = self._new_transient(self.transient[queue], queue)
                declare([entity], consumer.channel)
                cast(_Dispatch, consumer.on_message).queue = entity.name
                self.by_queue[queue] = (consumer, entity)
            consumer.add_queue(entity)
            consumer.consume()

    def stop(self, parent: Any) -> None:
        """Cancel the handler consumers (the channel belongs to Celery's task consumer)."""
        for consumer in self.consumers:
            ignore_errors(parent.connection, consumer.cancel)
        for dispatch in self.dispatches:
            dispatch.stop()
        if self.hub is not None and self.ready_hook is not None:
            self.hub.on_tick.discard(self.ready_hook)
            self.ready_hook = None
        self.dispatches = []
        self.consumers = []
        self.by_queue = {}
        self.aliases = {}  # transient queues went (or go) with the connection
        for entry in [*self.timers, *self.held.values()]:
            entry.cancel()
        self.timers = []
        self.held = {}  # a restart consumes every queue not paused by an operator

    shutdown = stop


def _bind_for_native_delay(ext: DomainEvents, connection: Any) -> None:
    # Celery's DelayedDelivery step does this for app.amqp.queues too, but it may run before
    # our exchanges exist; both calls are idempotent.
    queue_type = ext.app.conf.broker_native_delayed_delivery_queue_type
    declare_native_delayed_delivery_exchanges_and_queues(connection, queue_type)
    for spec in ext.handlers:
        if not spec.transient:  # classic: delayed in the worker (x-retry-at)
            bind_queue_to_native_delayed_delivery_exchange(
                connection, ext.topology.retry_queue(spec)
            )


class DomainEventsTopology(bootsteps.StartStopStep):
    """Worker step: declare the topology before the consumer blueprint starts.

    The worker's Consumer step always starts last, so this runs first; Celery's DelayedDelivery
    step (quorum queues) can then bind the handler queues, whose exchanges now exist. A broker
    that is down here is not fatal: :class:`DomainEventsStep` declares again once connected.
    """

    label = "DomainEventsTopology"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        # Steps are built before the pool forks: what its processes must inherit is set here.
        try:
            ext = DomainEvents.of(parent.app)
            select_handlers(ext)
            exposition.prepare(ext)
        except ConfigurationError as exc:
            raise SystemExit(f"Error: {exc}") from None
        super().__init__(parent, **kwargs)

    def stop(self, parent: Any) -> None:
        """Close the metrics port, if the worker serves one."""
        exposition.close()

    terminate = stop

    def start(self, parent: Any) -> None:
        """Declare exchanges, handler queues, bindings and DLQs over a short connection."""
        ext = DomainEvents.of(parent.app)
        with parent.app.connection_for_write() as conn:
            try:
                conn.ensure_connection(max_retries=3, interval_start=0.5, interval_step=0.5)
                declare(ext.topology.worker_entities(ext.handlers), conn.default_channel)
            # ensure_connection raises kombu's OperationalError once its retries are spent,
            # never the transport's own connection errors.
            except (OperationalError, *conn.recoverable_connection_errors) as exc:
                log.warning(
                    "Domain events: could not declare the topology on %s yet (%r); "
                    "the consumer will once it connects",
                    maybe_sanitize_url(conn.as_uri()),
                    exc,
                )
