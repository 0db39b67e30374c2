"""The Celery task class every handler runs as.

A delivery reaches the task as ``run(raw_event=<the JSON body as text>, meta={...})``: the body
is decoded and validated here, in the pool, and the user's function receives the typed event.
An ``async def`` handler's coroutine runs on the process's event loop (:mod:`.aio_loop`) while
the pool thread waits for it, inside the same scope, trace context, retries, dead letters and
time limits as a plain function. Two things differ from a plain Celery task:

* ``retry()`` re-publishes the *event* (the delivery's body byte for byte, its properties and
  headers, plus ``x-retries``; a binary-mode event's original data and ``ce-`` headers, not
  the structured envelope the worker made of them) to the handler's own queue through the
  service's retry exchange (``<exchange>.retry``, keyed by queue name), confirmed, with the
  countdown as ``x-retry-at`` (classic queues) or through RabbitMQ's native delayed delivery
  (quorum queues). Celery would re-publish a task message to the original exchange and
  routing key: every other handler would run again, and the worker would have to trust a
  task body read from a queue.
* On the final failure (retries spent, or an error that is never retried), the original body
  is dead-lettered with a failure record and confirmed *before* Celery acks the delivery
  (``acks_late``). If the dead letter cannot be confirmed, the delivery is requeued instead.
  A hard time limit is dead-lettered by :class:`HandlerRequest` in the worker's main process,
  under the same rule. A transient handler has no DLQ: the failure is logged, then acked.

A batch handler's task runs ``run(batch=[{"raw_event", "meta", "retries"}, ...])``, one item per
delivery, and settles each event on its own (:meth:`DomainEventTask.deliver_batch`): its retry
policy is applied per event, never through Celery's autoretry, which would run the whole batch
again.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
import traceback
import weakref
from collections.abc import Callable, Coroutine, Mapping
from datetime import datetime, timezone
from types import CoroutineType
from typing import Any, cast

from billiard.exceptions import TimeLimitExceeded
from celery import Task
from celery.exceptions import Ignore, Reject, Retry
from celery.utils.time import get_exponential_backoff_interval
from celery.worker.request import Request
from kombu.transport.native_delayed_delivery import calculate_routing_key

from celery_domain_events import _compat, metrics, tracing
from celery_domain_events.config import QueueType
from celery_domain_events.exceptions import (
    NON_RETRYABLE,
    BatchItemsFailed,
    EventDecodeError,
    InboxBusy,
)
from celery_domain_events.extension import DomainEvents
from celery_domain_events.inbox import DUPLICATE
from celery_domain_events.publishing import api as publishing
from celery_domain_events.publishing import buffer as event_buffer
from celery_domain_events.registry import HandlerSpec
from celery_domain_events.retry import RetryPolicy
from celery_domain_events.wire import envelope as wire_envelope
from celery_domain_events.wire.dead_letter import FailureReason, dead_letter_message
from celery_domain_events.wire.inbound import (
    ORIGIN_EXCHANGE_HEADER,
    ORIGIN_ROUTING_KEY_HEADER,
    RETRIES_HEADER,
    RETRY_AT_HEADER,
)
from celery_domain_events.wire.message import OutboundMessage

from . import dead_letter, spans

__all__ = ["DomainEventTask", "HandlerRequest", "original_body", "retry_message"]

log = logging.getLogger(__name__)


# A plain ``Task`` base: Celery < 5.7's Task is not subscriptable at run time.
class DomainEventTask(Task):  # type: ignore[type-arg]
    """Base class of handler tasks; see the module docstring."""

    #: Ack only after the handler finished (or its dead letter was confirmed).
    acks_late = True
    #: A worker killed mid-handler (OOM, SIGKILL) gets the event redelivered.
    reject_on_worker_lost = True
    #: Handlers report through side effects; results would only fill a backend.
    ignore_result = True
    #: Set per handler when the task class is created.
    handler_spec: HandlerSpec
    #: A handler run scopes its own events (task_scope leaves it alone).
    domain_events_own_scope = True
    #: Dead-letters hard time limits in the worker's main process (see HandlerRequest).
    Request = "celery_domain_events.consuming.task:HandlerRequest"

    def deliver(self, raw_event: str) -> Any:
        """Decode ``raw_event``, validate it into its model and call the handler with it."""
        ext = DomainEvents.of(self.app)
        spec = self.handler_spec
        envelope = wire_envelope.decode(raw_event)
        event = wire_envelope.to_event(
            envelope, ext.events, versions=spec.event_versions(), upcasters=ext.upcasters
        )
        settings = ext.settings
        measured = settings.metrics_enabled  # a run without metrics makes no call for them
        if measured:
            metrics.handler_started(
                settings, spec.name, self.request.id, envelope.type, envelope.time
            )
        started = time.monotonic()
        # Events the handler emits go out only if it succeeds (a failed transmit fails this
        # attempt, which is retried like any other), and continue the emitter's trace.
        with spans.handle(self, envelope):
            with publishing.handler_scope(self.app):
                if spec.idempotent is not None:
                    # The inbox's unit of work commits before the scope transmits: emitted
                    # events leave only once the pair and the side effects are committed.
                    result = self._run_once(spec, event)
                else:
                    result = spec.fn(event)
                    if type(result) is CoroutineType:  # an async def handler
                        result = _run_coroutine(result)
            if result is DUPLICATE:
                self._log_duplicate(envelope, ext)
            elif tracing.event_log.isEnabledFor(logging.INFO):
                self._log_handled(envelope, ext, time.monotonic() - started)
        if measured:
            metrics.handler_outcome(
                settings,
                spec.name,
                metrics.DUPLICATE if result is DUPLICATE else metrics.HANDLED,
                self.request.id,
            )
        return result

    def _run_once(self, spec: HandlerSpec, event: Any) -> Any:
        """Run the handler inside its inbox's claim; return ``DUPLICATE`` for a duplicate."""
        inbox, event_id = spec.idempotent, str(event.event_id)
        if inspect.iscoroutinefunction(spec.fn):

            async def claimed() -> Any:
                async with inbox.aclaim(spec.name, event_id) as fresh:
                    return await spec.fn(event) if fresh else DUPLICATE

            return _run_coroutine(claimed())
        try:
            with inbox.claim(spec.name, event_id) as fresh:
                return spec.fn(event) if fresh else DUPLICATE
        except InboxBusy as exc:
            # Another delivery holds the event (a Redis lease): come back when it has expired,
            # whatever the backoff; only a handler with no retries at all dead-letters this.
            if not self.max_retries:
                raise
            raise self.retry(exc=exc, countdown=exc.retry_after + 1) from exc

    def deliver_batch(self, items: list[dict[str, Any]]) -> dict[str, list[Any]]:
        """Run a batch handler on the events of ``items``; settle each event on its own.

        Events that fail to decode are dead-lettered alone as poison. The handler gets the
        others as one list; the events a :class:`BatchItemsFailed` names (every event, for
        any other exception) are retried alone or dead-lettered alone, the rest are done.

        Returns:
            The event ids ``handled``, ``retried`` and ``dead_lettered`` (in-process runs also
            give the dead-lettered events' ``errors``).

        Raises:
            Reject: a retry could not be published; the whole batch is requeued.
            DeadLetterRefused: a dead letter was not confirmed; the whole batch is requeued.
        """
        ext = DomainEvents.of(self.app)
        spec = self.handler_spec
        versions = spec.event_versions()
        events: list[Any] = []
        envelopes: list[wire_envelope.Envelope] = []
        decoded: list[dict[str, Any]] = []
        failed: list[tuple[dict[str, Any], BaseException, str]] = []
        for item in items:
            try:
                envelope = wire_envelope.decode(item["raw_event"])
                event = wire_envelope.to_event(
                    envelope, ext.events, versions=versions, upcasters=ext.upcasters
                )
            except EventDecodeError as exc:
                failed.append((item, exc, ""))
                continue
            events.append(event)
            envelopes.append(envelope)
            decoded.append(item)
        started = time.monotonic()
        failures: dict[str, BaseException] = {}
        if events:
            try:
                with spans.handle_batch(self, envelopes) as run, publishing.handler_scope(self.app):
                    try:
                        result = spec.fn(events)
                        if inspect.iscoroutine(result):  # an async def handler
                            _run_coroutine(result)
                    except BatchItemsFailed as partial:
                        failures = partial.failures  # the rest succeeded: its events go out
                        unknown = set(failures) - {str(event.event_id) for event in events}
                        if unknown:
                            # Not this batch's ids (an order id, say): which events failed is
                            # unknown, so all of them did; acking them would lose them.
                            raise RuntimeError(
                                f"BatchItemsFailed names {len(unknown)} id(s) that are no "
                                "event of this batch; name events or their event_id"
                            ) from partial
                        run.failed(partial, len(failures))
            except Exception as exc:
                failures = dict.fromkeys((str(event.event_id) for event in events), exc)
                failures_tb = traceback.format_exc()
            else:
                failures_tb = ""
            for event, item in zip(events, decoded, strict=True):
                error = failures.get(str(event.event_id))
                if error is not None:
                    failed.append((item, error, failures_tb or _format(error)))
        outcome = self._settle(ext, spec, failed)
        handled_ids = [
            str(event.event_id) for event in events if str(event.event_id) not in failures
        ]
        outcome["handled"] = handled_ids
        metrics.batch_ran(ext.settings, spec.name, events, outcome, started)
        if tracing.event_log.isEnabledFor(logging.INFO):
            tracing.event_log.info(
                "Handled a batch of %d event(s) by %s in %.1f ms: %d done, %d retried, "
                "%d dead-lettered",
                len(items),
                spec.name,
                (time.monotonic() - started) * 1000,
                len(handled_ids),
                len(outcome["retried"]),
                len(outcome["dead_lettered"]),
                extra={
                    "service": ext.settings.service,
                    "handler": spec.name,
                    "outcome": "batch",
                    "batch_size": len(items),
                },
            )
        return outcome

    def _settle(
        self,
        ext: DomainEvents,
        spec: HandlerSpec,
        failed: list[tuple[dict[str, Any], BaseException, str]],
    ) -> dict[str, list[Any]]:
        """Retry or dead-letter each failed event of a batch, alone."""
        policy = spec.retry or RetryPolicy(max_retries=0)
        retries: list[tuple[dict[str, Any], BaseException]] = []
        letters: list[OutboundMessage] = []
        outcome: dict[str, list[Any]] = {"retried": [], "dead_lettered": []}
        for item, exc, text in failed:
            attempt = int(item.get("retries") or 0)
            retryable = _retryable(policy, exc)
            if retryable and attempt < policy.max_retries:
                retries.append((item, exc))
                continue
            letters.append(
                self._dead_letter_message(
                    ext,
                    item,
                    exc,
                    reason=FailureReason.POISON
                    if isinstance(exc, EventDecodeError)
                    else FailureReason.RETRIES_EXHAUSTED
                    if retryable
                    else FailureReason.REJECTED,
                    retries=attempt,
                    task_id=self.request.id,
                    traceback_text=text,
                )
            )
            outcome["dead_lettered"].append(_item_id(item))
            if self.request.is_eager:  # the harness re-raises it (fail_fast); never serialized
                outcome.setdefault("errors", []).append(exc)
        for letter in letters:
            try:
                dead_letter.send(ext, letter)
            except Exception as publish_error:
                log.error(
                    "Could not dead-letter an event of the batch %s[%s] (%r); requeueing the batch",
                    self.name,
                    self.request.id,
                    publish_error,
                )
                raise DeadLetterRefused(repr(publish_error)[:500], requeue=True) from None
        if not retries:
            return outcome
        if self.request.is_eager:
            # In-process (the test harness): retry now, as Celery's eager retry does.
            again = self.deliver_batch(
                [{**item, "retries": int(item.get("retries") or 0) + 1} for item, _ in retries]
            )
            outcome["dead_lettered"] += again["dead_lettered"]
            outcome.setdefault("errors", []).extend(again.get("errors", ()))
            outcome["retried"] += [_item_id(item) for item, _ in retries]
            return outcome
        messages = [
            retry_message(
                ext,
                spec,
                item["raw_event"],
                item["meta"],
                int(item.get("retries") or 0) + 1,
                _countdown(policy, int(item.get("retries") or 0)),
            )
            for item, _ in retries
        ]
        try:
            ext.publish(messages)
        except Exception as publish_error:
            log.error(
                "Could not publish the retries of the batch %s[%s] (%r); requeueing the batch",
                self.name,
                self.request.id,
                publish_error,
            )
            raise Reject(publish_error, requeue=True) from None
        outcome["retried"] += [_item_id(item) for item, _ in retries]
        return outcome

    def _log_duplicate(self, envelope: wire_envelope.Envelope, ext: Any) -> None:
        tracing.event_log.info(
            "Skipped %s id=%s: %s already handled it (a duplicate delivery)",
            envelope.type,
            envelope.id,
            self.handler_spec.name,
            extra={
                "event_id": envelope.id,
                "event_name": envelope.type,
                "event_version": envelope.eventversion,
                "service": ext.settings.service,
                "handler": self.handler_spec.name,
                "outcome": "duplicate",
            },
        )

    def _log_handled(self, envelope: wire_envelope.Envelope, ext: Any, seconds: float) -> None:
        # Inside the run's trace context: the child span it runs in (made now if need be).
        tracing.event_log.info(
            "Handled %s id=%s by %s in %.1f ms",
            envelope.type,
            envelope.id,
            self.handler_spec.name,
            seconds * 1000,
            extra={
                "event_id": envelope.id,
                "event_name": envelope.type,
                "event_version": envelope.eventversion,
                "trace_id": tracing.trace_id(tracing.current_traceparent()),
                "service": ext.settings.service,
                "handler": self.handler_spec.name,
                "outcome": "handled",
                "duration_ms": round(seconds * 1000, 3),
            },
        )

    def retry(  # noqa: PLR0917 (Celery's own signature)
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: Exception | None = None,
        throw: bool = True,
        eta: datetime | None = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Any:
        """Retry through this handler's own queue only (see the module docstring).

        Raises:
            Retry: the retry is published and confirmed; the worker acks this delivery.
            Reject: the retry could not be confirmed; the delivery is requeued instead.
        """
        request = self.request
        delivery = request.kwargs or {}
        if request.called_directly or request.is_eager or "meta" not in delivery:
            # In-process (the test harness, a direct call): Celery's own eager retry.
            return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
        retries = int(request.retries or 0) + 1
        limit = self.max_retries if max_retries is None else max_retries
        if limit is not None and retries > limit:
            if exc is not None:
                raise exc
            raise self.MaxRetriesExceededError(
                f"Can't retry {self.name}[{request.id}]: {limit} retries spent"
            )
        if countdown is None:
            countdown = (
                max(0.0, (eta - datetime.now(timezone.utc)).total_seconds())
                if eta is not None
                else float(self.default_retry_delay or 0)
            )
        ext = DomainEvents.of(self.app)
        message = retry_message(
            ext, self.handler_spec, delivery["raw_event"], delivery["meta"], retries, countdown
        )
        try:
            ext.publish([message])
        except Exception as publish_error:
            log.error(
                "Could not publish the retry of %s[%s] (%r); requeueing the delivery",
                self.name,
                request.id,
                publish_error,
            )
            raise Reject(publish_error, requeue=True) from exc
        metrics.handler_outcome(ext.settings, self.handler_spec.name, metrics.RETRIED, request.id)
        ret = Retry(exc=exc, when=countdown)  # type: ignore[arg-type]  # stubs: numbers.Real
        if throw:
            raise ret
        return ret

    def guard_run(self) -> None:
        """Wrap ``run`` (and Celery's autoretry around it): dead-letter on the final failure.

        Called once, when the handler's task is created. A wrapper rather than ``__call__``:
        a task class with its own ``__call__`` takes a slower path in Celery's tracer, which
        pushes a second request context for every run.

        The wrapper raises :class:`DeadLetterRefused` (a ``Reject(requeue=True)``) when the
        dead letter cannot be confirmed, so the delivery is requeued instead of acked, the
        event is not lost, and the worker holds the handler's queue for a while.
        """
        run = self.run

        @functools.wraps(run)
        def run_or_dead_letter(*args: Any, **kwargs: Any) -> Any:
            try:
                return run(*args, **kwargs)
            except (Retry, Ignore, Reject):
                raise
            except Exception as exc:
                try:
                    self.dead_letter(
                        exc,
                        kwargs,
                        retries=int(self.request.retries or 0),
                        task_id=self.request.id,
                        traceback_text=traceback.format_exc(),
                    )
                except Exception as publish_error:
                    log.error(
                        "Could not dead-letter event for %s[%s] (%r); requeueing the delivery",
                        self.name,
                        self.request.id,
                        publish_error,
                    )
                    raise DeadLetterRefused(repr(publish_error)[:500], requeue=True) from exc
                raise

        self.run = run_or_dead_letter  # type: ignore[method-assign]

    def dead_letter(
        self,
        exc: BaseException,
        kwargs: Mapping[str, Any],
        *,
        retries: int,
        task_id: str | None,
        traceback_text: str,
    ) -> None:
        """Dead-letter the delivery ``kwargs`` describe (each one of a batch), confirmed.

        Does nothing for a direct call (no delivery behind it).

        Raises:
            PublishError: a dead letter was not confirmed.
        """
        ext = DomainEvents.of(self.app)
        batch = kwargs.get("batch")
        if isinstance(batch, list):
            reason = self._failure_reason(exc)
            for item in batch:
                dead_letter.send(
                    ext,
                    self._dead_letter_message(
                        ext,
                        item,
                        exc,
                        reason=reason,
                        retries=int(item.get("retries") or 0),
                        task_id=task_id,
                        traceback_text=traceback_text,
                    ),
                )
            metrics.handler_outcome(
                ext.settings, self.handler_spec.name, metrics.DEAD_LETTERED, count=len(batch)
            )
            return
        if not isinstance(kwargs.get("raw_event"), str):
            return
        message = self._dead_letter_message(
            ext,
            kwargs,
            exc,
            reason=self._failure_reason(exc),
            retries=retries,
            task_id=task_id,
            traceback_text=traceback_text,
        )
        if self.handler_spec.transient:  # no DLQ: logged, and Celery acks the delivery
            dead_letter.drop(message)
            metrics.handler_outcome(ext.settings, self.handler_spec.name, metrics.DROPPED, task_id)
            return
        dead_letter.send(ext, message)
        metrics.handler_outcome(
            ext.settings, self.handler_spec.name, metrics.DEAD_LETTERED, task_id
        )

    def _dead_letter_message(
        self,
        ext: DomainEvents,
        delivery: Mapping[str, Any],
        exc: BaseException,
        *,
        reason: FailureReason,
        retries: int,
        task_id: str | None,
        traceback_text: str,
    ) -> OutboundMessage:
        meta: dict[str, Any] = delivery.get("meta") or {}
        return dead_letter_message(
            body=original_body(str(delivery["raw_event"]), meta),
            queue=meta.get("queue", "")
            if self.handler_spec.transient
            else ext.topology.handler_queue_name(self.handler_spec),
            handler=self.handler_spec.name,
            reason=reason,
            exc=exc,
            traceback=traceback_text,
            attempts=retries + 1,
            exchange=meta.get("exchange", ""),
            routing_key=meta.get("routing_key", ""),
            task_id=task_id,
            content_type=meta.get("content_type"),
            content_encoding=meta.get("content_encoding"),
            properties=meta.get("properties"),
            headers=meta.get("headers"),
        )

    def _failure_reason(self, exc: BaseException) -> FailureReason:
        if isinstance(exc, EventDecodeError):
            return FailureReason.POISON
        autoretry_for = tuple(getattr(self, "autoretry_for", ()) or ())
        dont_retry_for = tuple(getattr(self, "dont_autoretry_for", ()) or ())
        retryable = isinstance(exc, autoretry_for) and not isinstance(
            exc, (*NON_RETRYABLE, *dont_retry_for)
        )
        return FailureReason.RETRIES_EXHAUSTED if retryable else FailureReason.REJECTED


def _retryable(policy: RetryPolicy, exc: BaseException) -> bool:
    # As for a single event: with no retries at all, a failure is "rejected", not "exhausted".
    return (
        bool(policy.max_retries)
        and isinstance(exc, policy.autoretry_for)
        and not isinstance(exc, (*NON_RETRYABLE, *policy.dont_retry_for))
    )


def _countdown(policy: RetryPolicy, retries: int) -> float:
    # What Celery's autoretry (celery.app.autoretry) computes for a task with these options.
    if policy.backoff:
        return float(
            get_exponential_backoff_interval(
                factor=int(max(1.0, float(policy.backoff))),
                retries=retries,
                maximum=policy.backoff_max,
                full_jitter=policy.jitter,
            )
        )
    return policy.countdown


def _item_id(item: Mapping[str, Any]) -> str:
    return str(item.get("event_id") or "?")


def _format(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _run_coroutine(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run an ``async def`` handler's coroutine on this process's loop; wait for its result.

    The coroutine runs in a copy of this context: the buffer it leaves current (the scope's,
    or another after a ``discard()``) is made current here, as a plain function's would be, so
    the scope transmits exactly what a plain function would have left.
    """
    from . import aio_loop  # noqa: PLC0415 (asyncio only where async handlers run)

    async def handle() -> tuple[Any, event_buffer.Buffer | None]:
        result = await coro
        return result, event_buffer.current()

    result, pending = aio_loop.run(handle())
    event_buffer.replace(pending)
    return result


#: Exchange of RabbitMQ native delayed delivery that takes delays of up to 2**28 - 1 s.
_DELAYED_EXCHANGE = "celery_delayed_27"


def retry_message(  # noqa: PLR0917
    ext: DomainEvents,
    spec: HandlerSpec,
    raw_event: str,
    meta: Mapping[str, Any],
    retries: int,
    countdown: float,
) -> OutboundMessage:
    """Build the retry of one delivery: the same event, to this handler's queue only.

    A transient handler's retry goes to the worker's own queue it came from (``meta``'s,
    set by the worker), always delayed by the worker: its queue is classic.
    """
    queue = meta["queue"] if spec.transient else ext.topology.handler_queue_name(spec)
    headers = {k: v for k, v in (meta.get("headers") or {}).items() if k != RETRY_AT_HEADER}
    headers[RETRIES_HEADER] = retries
    headers[ORIGIN_EXCHANGE_HEADER] = meta.get("exchange", "")
    headers[ORIGIN_ROUTING_KEY_HEADER] = meta.get("routing_key", "")
    exchange, routing_key = ext.topology.retry_exchange().name, queue
    if countdown >= 1 and ext.settings.queue_type is QueueType.QUORUM and not spec.transient:
        # Quorum queues cannot hold a delivery in the worker: the broker delays it.
        exchange, routing_key = _DELAYED_EXCHANGE, calculate_routing_key(int(countdown), queue)
    elif countdown > 0:
        headers[RETRY_AT_HEADER] = time.time() + countdown
    return OutboundMessage(
        body=original_body(raw_event, meta),
        exchange=exchange,
        routing_key=routing_key,
        content_type=meta.get("content_type") or wire_envelope.CONTENT_TYPE,
        content_encoding=meta.get("content_encoding") or "utf-8",
        properties=dict(meta.get("properties") or {}),
        headers=headers,
        mandatory=True,
        must_route=True,
    )


def original_body(raw_event: str, meta: Mapping[str, Any]) -> bytes:
    """The body a delivery had on the wire: ``raw_event``, or a binary-mode event's data."""
    body = meta.get("body", raw_event)
    return str(body).encode("utf-8", "surrogatepass")


def _acks_on_timeout(task: Task[Any, Any]) -> bool:
    # Celery 5.7 has acks_on_timeout; earlier ones only acks_on_failure_or_timeout.
    value = getattr(task, "acks_on_timeout", None)
    if value is None:
        value = getattr(task, "acks_on_failure_or_timeout", True)
    return bool(value)


#: What holds a handler queue after a refused dead letter, per app: set by the worker's
#: bootstep (``HandlerRequest`` runs in the worker's main process, as the bootstep does).
_holds: weakref.WeakKeyDictionary[Any, Callable[[str], None]] = weakref.WeakKeyDictionary()


def on_refused_dead_letter(app: Any, hold: Callable[[str], None]) -> None:
    """Have ``hold(queue)`` called when a dead letter of ``app``'s handler queue is refused."""
    _holds[app] = hold


class DeadLetterRefused(Reject):
    """Requeue a delivery whose dead letter the broker did not confirm (then hold its queue)."""


class HandlerRequest(Request):
    """The worker-side request of a handler run: dead-letters a hard time limit.

    A hard time limit kills the pool process, so the handler's own guard never sees it; the
    pool reports it here, in the main process, and Celery then acks the delivery. The event is
    dead-lettered (confirmed) first; if the dead letter cannot be confirmed, the delivery is
    requeued instead, and Celery's ack does nothing.
    """

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
        """Dead-letter a run that hit its hard time limit, then let Celery finish as usual."""
        exc = getattr(exc_info, "exception", None)
        exc = getattr(exc, "exc", exc)  # billiard's ExceptionWithTraceback wraps it
        task = cast(DomainEventTask, self.task)
        if isinstance(exc, DeadLetterRefused):
            self._hold(task)  # before Celery requeues the delivery
        elif (
            isinstance(exc, TimeLimitExceeded)
            and not self.acknowledged
            and not _compat.worker_terminating()
            and task.acks_late
            and _acks_on_timeout(task)
        ):
            self._dead_letter_time_limit(task, exc)
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def _dead_letter_time_limit(self, task: DomainEventTask, exc: TimeLimitExceeded) -> None:
        try:
            task.dead_letter(
                exc,
                self.kwargs or {},
                retries=int(self.request_dict.get("retries") or 0),
                task_id=self.id,
                traceback_text=f"Hard time limit exceeded for {self.name}: {exc!r}",
            )
        except Exception as publish_error:
            log.error(
                "Could not dead-letter event for %s[%s] after its hard time limit (%r); "
                "requeueing the delivery",
                self.name,
                self.id,
                publish_error,
            )
            self._hold(task)  # first: the requeued delivery must not come straight back
            self.reject(requeue=True)

    def _hold(self, task: DomainEventTask) -> None:
        hold = _holds.get(task.app)
        if hold is not None:
            hold(DomainEvents.of(task.app).topology.handler_queue_name(task.handler_spec))
