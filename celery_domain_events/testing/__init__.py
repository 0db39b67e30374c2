"""The in-process test harness: publish, route and handle domain events with no broker.

::

    with capture_events(app) as events:
        emit(UserCreated(user_id=1))
        transmit(app)
        events.join()                 # runs every matching handler; re-raises a failure here
        assert events.published == [UserCreated(...)]
        assert events.handled(send_welcome_email) == events.published
        assert events.dead_letters == []

:func:`capture_events` sets :attr:`DomainEvents.transport <.extension.DomainEvents.transport>`
(the seam ``transmit()`` and dead-lettering publish through) to an in-memory capture and
restores the previous value on exit. Nothing connects to a broker: the app's ``broker_url`` may
be ``memory://`` or an unreachable ``amqp://`` URL.

Each delivery runs through the handler's real Celery task (``task.apply()``, eager), with the
kwargs a worker would build, so decoding, retries, ``RejectEvent``, poison input and
dead-lettering take the production code path. Semantics:

* **Routing** is AMQP-exact (:func:`celery_domain_events.routing.matches` on the message's
  routing key and each handler's
  :meth:`~celery_domain_events.wire.topology.Topology.binding_patterns`), never kombu
  ``memory://`` matching, which misses ``user.#`` vs ``user``. Events are routed when they are
  transmitted.
* **Order**: deliveries run one at a time in the test thread, first in first out: events in
  transmit order and, per event, handlers by name. Events a handler emits are transmitted when
  it succeeds (as in a worker) and queued behind the deliveries already pending.
* **Retries** are Celery's eager retries: the attempt re-runs at once, ignoring the
  countdown and backoff. A handler runs at most ``max_retries + 1`` times; the events it
  emitted in a failed attempt are discarded with that attempt.
* **Dead letters**: a delivery that finally fails (retries spent, ``RejectEvent``, an error
  that is never retried, poison) is dead-lettered by the task and appears in
  :attr:`EventCapture.dead_letters`, body byte for byte, with the ``x-failure-*`` record.
* **fail_fast**: :meth:`EventCapture.join` first runs every pending delivery, then re-raises
  the exception of the first delivery that failed *during that join*. A failure is the exception
  that got an event dead-lettered; failed attempts that were retried and then succeeded are
  not failures. With ``fail_fast=False`` nothing is raised: inspect ``dead_letters``.
* **Not emulated**: time limits, rate limits, prefetch, redelivery after a crash and the
  ``unrouted`` queue. Only a real RabbitMQ and a real worker are evidence for those; see
  :mod:`celery_domain_events.testing.pytest_plugin`.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from celery import Celery, states

from celery_domain_events.consuming.delivery import task_id_for, task_meta
from celery_domain_events.consuming.handlers import bind_task
from celery_domain_events.events import AnyEvent
from celery_domain_events.exceptions import EventDecodeError
from celery_domain_events.extension import DomainEvents
from celery_domain_events.registry import HandlerSpec
from celery_domain_events.routing import matches
from celery_domain_events.wire import binary, envelope
from celery_domain_events.wire.dead_letter import DeadLetter
from celery_domain_events.wire.message import OutboundMessage
from celery_domain_events.wire.topology import DLQ_SUFFIX

__all__ = ["CaptureTransport", "CapturedDeadLetter", "EventCapture", "capture_events"]


@dataclass(frozen=True)
class CapturedDeadLetter(DeadLetter):
    """A dead letter the harness captured: what ``<queue>.dlq`` would hold, plus the error.

    It is a :class:`~celery_domain_events.wire.dead_letter.DeadLetter`, as the CLI reads from
    RabbitMQ, so assertions on ``reason``, ``failure(...)`` and ``body`` work the same on both.

    Attributes:
        event: the event the body decodes to, or None for poison.
        error: the exception that ended the delivery (None if it came from outside ``join``).
    """

    event: AnyEvent | None = None
    error: BaseException | None = field(default=None, compare=False)

    @property
    def handler(self) -> str:
        """The name of the handler that failed."""
        return str(self.failure("handler", ""))

    @property
    def exception(self) -> str:
        """The qualified name of the exception type (``builtins.RuntimeError``)."""
        return str(self.failure("exception", ""))

    @property
    def attempts(self) -> int:
        """How many times the handler ran (``max_retries + 1`` when retries were spent)."""
        return int(self.failure("attempts", 0))


class _Delivery(NamedTuple):
    message: OutboundMessage
    spec: HandlerSpec


class EventCapture:
    """What :func:`capture_events` yields: the published events, handler runs and dead letters.

    Every list property returns a copy, in the order things happened.
    """

    __test__ = False  # never collected by pytest, whatever name it is imported under

    def __init__(self, app: Celery, *, fail_fast: bool = True) -> None:
        self.app = app
        self.ext = DomainEvents.of(app)
        self.fail_fast = fail_fast
        self._lock = threading.RLock()
        self._open = False
        self._joining = False
        self._messages: list[OutboundMessage] = []
        self._published: list[AnyEvent] = []
        self._pending: deque[_Delivery] = deque()
        self._handled: dict[str, list[AnyEvent]] = defaultdict(list)
        self._dead_letters: list[CapturedDeadLetter] = []
        self._exit = ExitStack()

    @property
    def published(self) -> list[AnyEvent]:
        """The events transmitted, decoded back into their models as a worker would.

        An event whose body does not decode (its deliveries dead-letter as poison) is listed
        as it was emitted.
        """
        self._settle_django()
        with self._lock:
            return list(self._published)

    @property
    def messages(self) -> list[OutboundMessage]:
        """The AMQP messages of :attr:`published` (body, exchange, routing key, headers)."""
        with self._lock:
            return list(self._messages)

    @property
    def dead_letters(self) -> list[CapturedDeadLetter]:
        """The dead letters the handler tasks published."""
        with self._lock:
            return list(self._dead_letters)

    @property
    def pending(self) -> int:
        """The number of deliveries waiting for :meth:`join`."""
        with self._lock:
            return len(self._pending)

    def handled(self, handler: object) -> list[AnyEvent]:
        """Return the events ``handler`` (a ``Handler``, ``HandlerSpec`` or name) handled.

        Only successful runs count: an event that was retried and then handled is listed
        once, an event that was dead-lettered is not listed.

        Raises:
            ValueError: ``handler`` is not a handler of this app (a typo would pass silently).
        """
        name = getattr(handler, "name", handler)
        if not any(spec.name == name for spec in self.ext.handlers):
            known = ", ".join(spec.name for spec in self.ext.handlers) or "none"
            raise ValueError(f"{name!r} is not a handler of this app (handlers: {known})")
        with self._lock:
            return list(self._handled.get(str(name), ()))

    def clear(self) -> None:
        """Forget everything recorded and drop the pending deliveries."""
        with self._lock:
            self._messages.clear()
            self._published.clear()
            self._pending.clear()
            self._handled.clear()
            self._dead_letters.clear()

    def join(self, timeout: float = 5.0, *, fail_fast: bool | None = None) -> None:
        """Run the pending deliveries, and those they cause, until none is left.

        Args:
            timeout: seconds after which no further delivery starts (a running handler is
                not interrupted).
            fail_fast: re-raise the first failure of this join (default: the value given to
                :func:`capture_events`); see the module docstring.

        Raises:
            TimeoutError: deliveries were still pending after ``timeout`` (a handler that
                emits an event it handles itself, say); they stay pending.
            RuntimeError: the capture is closed, or ``join`` was called from a handler.
            Exception: with ``fail_fast``, the exception of the first failed delivery.
        """
        if not self._open:
            raise RuntimeError("join() after capture_events() exited: its transport is gone")
        if self._joining:
            raise RuntimeError("join() cannot be called from a handler")
        self._settle_django()
        deadline = time.monotonic() + timeout
        failures: list[BaseException] = []
        self._joining = True
        try:
            while delivery := self._next(deadline, timeout):
                error = self._deliver(delivery)
                if error is not None:
                    failures.append(error)
        finally:
            self._joining = False
        if failures and (self.fail_fast if fail_fast is None else fail_fast):
            raise failures[0]

    def __enter__(self) -> EventCapture:
        """``with domain_events_capture(app) as events:`` works as well as a plain call."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """End the capture now: restore the app's transport and drop pending deliveries."""
        self.close()

    def close(self) -> None:
        """End the capture (idempotent); its records stay readable."""
        self._exit.close()
        self._close()

    def _settle_django(self) -> None:
        # A Django TestCase runs each test in a transaction that never commits: events held
        # by emit_on_commit are published as that commit would, when the test looks at them.
        if not self._open or "django.db" not in sys.modules:
            return
        from django.conf import settings  # noqa: PLC0415 (only where Django is in use)

        if not settings.configured:
            return
        from django.db import connections  # noqa: PLC0415

        from celery_domain_events.contrib.django import (  # noqa: PLC0415
            flush_pending_on_commit,
        )

        for connection in connections.all(initialized_only=True):
            if connection.in_atomic_block:
                flush_pending_on_commit(connection.alias)

    def _next(self, deadline: float, timeout: float) -> _Delivery | None:
        with self._lock:
            if not self._pending:
                return None
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(self._pending)} delivery(ies) still pending after {timeout} s; "
                    "does a handler emit events it handles itself?"
                )
            return self._pending.popleft()

    def _deliver(self, delivery: _Delivery) -> BaseException | None:
        """Run one delivery through the handler's task; return the error that ended it."""
        message, spec = delivery
        if spec.batch is not None:
            return self._deliver_batch(delivery)
        # The app binds every decorated handler when it finalizes; bind_task() again would
        # make a second callable under the same name (Celery 5.7 warns about it).
        task = self.app.tasks.get(spec.task_name) or bind_task(self.app, spec)
        with self._lock:
            first_letter = len(self._dead_letters)
        result = task.apply(
            kwargs={"raw_event": _raw_event(message), "meta": self._meta(delivery)},
            task_id=task_id_for(_event_id(message), spec.name),
            throw=False,
        )
        outcome: Any = result.result
        state: str = result.state  # the stubs omit IGNORED
        if state == states.SUCCESS:
            with self._lock:
                self._handled[spec.name].append(self._decode(message))
            return None
        if state == states.IGNORED or not isinstance(outcome, BaseException):
            return None
        with self._lock:
            self._dead_letters[first_letter:] = [
                replace(letter, error=outcome) if letter.error is None else letter
                for letter in self._dead_letters[first_letter:]
            ]
        return outcome

    def _deliver_batch(self, first: _Delivery) -> BaseException | None:
        """Run ``first`` and the pending deliveries of its batch handler as one batch."""
        spec = first.spec
        assert spec.batch is not None
        with self._lock:
            batch, others = [first], deque[_Delivery]()
            while self._pending and len(batch) < spec.batch.max_size:
                delivery = self._pending.popleft()
                (batch if delivery.spec == spec else others).append(delivery)
            self._pending.extendleft(reversed(others))
        task = self.app.tasks.get(spec.task_name) or bind_task(self.app, spec)
        ids = [_event_id(delivery.message) for delivery in batch]
        result = task.apply(
            kwargs={
                "batch": [
                    {
                        "raw_event": _raw_event(delivery.message),
                        "meta": self._meta(delivery),
                        "retries": 0,
                        "event_id": event_id,
                    }
                    for delivery, event_id in zip(batch, ids, strict=True)
                ]
            },
            task_id=task_id_for("\x00".join(ids), spec.name),
            throw=False,
        )
        outcome: Any = result.result
        if result.state != states.SUCCESS:
            return outcome if isinstance(outcome, BaseException) else None
        handled = set(outcome["handled"])
        with self._lock:
            self._handled[spec.name] += [
                self._decode(delivery.message)
                for delivery, event_id in zip(batch, ids, strict=True)
                if event_id in handled
            ]
        errors: list[BaseException | None] = outcome.get("errors") or [None]
        return errors[0]

    def _meta(self, delivery: _Delivery) -> dict[str, Any]:
        # What consuming.delivery.to_task_message gives the task in a worker.
        message, spec = delivery
        return task_meta(
            queue=self.ext.topology.handler_queue_name(spec),
            exchange=message.exchange,
            routing_key=message.routing_key,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            properties=message.properties,
            headers=message.headers,
            body=_original_body(message),
        )

    def _decode(self, message: OutboundMessage) -> AnyEvent:
        decoded = envelope.decode(_raw_event(message))
        return envelope.to_event(decoded, self.ext.events)

    def _receive(self, messages: Sequence[OutboundMessage]) -> None:
        """Record events and dead letters; route each event to its handlers' deliveries."""
        for message in messages:
            if message.exchange == "" and message.routing_key.endswith(DLQ_SUFFIX):
                self._capture_dead_letter(message)
            else:
                self._capture_event(self.ext, message)

    def _capture_event(self, ext: DomainEvents, message: OutboundMessage) -> None:
        try:
            event = self._decode(message)
        except EventDecodeError:
            event = message.source  # its deliveries will dead-letter it as poison
        deliveries = [
            _Delivery(message, spec)
            for spec in ext.handlers
            if any(matches(p, message.routing_key) for p in ext.topology.binding_patterns(spec))
        ]
        with self._lock:
            self._messages.append(message)
            self._published.append(event)
            self._pending.extend(deliveries)

    def _capture_dead_letter(self, message: OutboundMessage) -> None:
        try:
            event: AnyEvent | None = self._decode(message)
        except EventDecodeError:
            event = None
        letter = CapturedDeadLetter(
            queue=message.routing_key,
            body=message.body,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            properties=dict(message.properties),
            headers=dict(message.headers),
            event=event,
        )
        with self._lock:
            self._dead_letters.append(letter)

    def _close(self) -> None:
        with self._lock:
            self._open = False
            self._pending.clear()


@contextmanager
def capture_events(app: Celery, *, fail_fast: bool = True) -> Iterator[EventCapture]:
    """Capture what ``app`` publishes, in memory, for the duration of the block.

    Args:
        app: a Celery app with ``DomainEvents`` installed; its handlers (as restricted by
            ``DomainEvents(app, handlers=...)``) are the ones :meth:`EventCapture.join` runs.
        fail_fast: the default of :meth:`EventCapture.join`'s ``fail_fast``.

    Yields:
        The capture. Its records stay readable after the block; pending deliveries are
        dropped and the app's previous transport is restored.

    Raises:
        ConfigurationError: the app has no ``DomainEvents``, or an upcaster chain one of its
            handlers needs has a gap (as a worker would refuse to start).
    """
    capture = EventCapture(app, fail_fast=fail_fast)
    capture.ext.check_upcasters()  # as a worker does at start: a gap fails here, not as poison
    capture._exit.enter_context(capture.ext.using(CaptureTransport(capture)))
    capture._open = True
    try:
        yield capture
    finally:
        capture.close()


class CaptureTransport:
    """The transport :func:`capture_events` installs: messages go to an :class:`EventCapture`.

    Nothing is published; the capture records each event and dead letter and queues the
    deliveries that :meth:`EventCapture.join` runs.
    """

    def __init__(self, capture: EventCapture) -> None:
        self.capture = capture

    def publish(self, messages: Sequence[OutboundMessage], declare: Sequence[Any] = ()) -> None:
        """Hand ``messages`` to the capture (``declare`` has nothing to do in memory)."""
        self.capture._receive(messages)

    async def publish_async(
        self, messages: Sequence[OutboundMessage], declare: Sequence[Any] = ()
    ) -> None:
        """:meth:`publish`, for ``transmit_async`` (nothing to wait for in memory)."""
        self.capture._receive(messages)


def _event_id(message: OutboundMessage) -> str:
    # As a worker does: the CloudEvents id (from the body, or ce-id), whatever message_id says.
    if binary.is_binary(message.content_type, message.headers):
        found = binary.event_id(message.headers)
    else:
        found = envelope.peek_id(message.body)
    return found or str(message.properties.get("message_id"))


def _raw_event(message: OutboundMessage) -> str:
    # What a worker hands the task: the structured envelope (made of a binary-mode message).
    try:
        return binary.envelope_text(message.body, message.content_type, message.headers)[0]
    except EventDecodeError:
        return message.body.decode("utf-8", "replace")  # the task finds it is poison


def _original_body(message: OutboundMessage) -> str | None:
    if not binary.is_binary(message.content_type, message.headers):
        return None
    return message.body.decode("utf-8", "surrogateescape")
