"""The Celery task class every handler runs as.

A delivery reaches the task as ``run(raw_event=<the JSON body as text>, meta={...})``: the body
is decoded and validated here, in the pool, and the user's function receives the typed event.
Two things differ from a plain Celery task:

* ``retry()`` publishes to the handler's own queue through the service's retry exchange
  (``<exchange>.retry``, keyed by queue name). Celery would re-publish to the original exchange
  and routing key, which for a topic exchange means every other handler would run again.
* On the final failure (retries spent, or an error that is never retried), the original body
  is dead-lettered with a failure record and confirmed *before* Celery acks the delivery
  (``acks_late``). If the dead letter cannot be confirmed, the delivery is requeued instead.
"""

from __future__ import annotations

import functools
import logging
import time
import traceback
from typing import Any

from billiard.einfo import ExceptionInfo
from celery import Task
from celery.exceptions import Ignore, Reject, Retry

from . import deadletter, publisher, serialization, tracing
from .deadletter import FailureReason
from .exceptions import NON_RETRYABLE, EventDecodeError
from .extension import DomainEvents
from .registry import HandlerSpec

__all__ = ["DomainEventTask"]

log = logging.getLogger(__name__)

# Set on the request once its event is dead-lettered, so on_failure does not do it twice. Not
# on the exception: Celery hands on_failure a wrapper instead when the exception won't pickle.
_DEAD_LETTERED = "domain_events_dead_lettered"


class DomainEventTask(Task[Any, Any]):
    """Base class of handler tasks; see the module docstring."""

    #: Ack only after the handler finished (or its dead letter was confirmed).
    acks_late = True
    #: A worker killed mid-handler (OOM, SIGKILL) gets the event redelivered.
    reject_on_worker_lost = True
    #: Handlers report through side effects; results would only fill a backend.
    ignore_result = True
    #: Set per handler when the task class is created.
    handler_spec: HandlerSpec

    def deliver(self, raw_event: str) -> Any:
        """Decode ``raw_event``, validate it into its model and call the handler with it."""
        ext = DomainEvents.of(self.app)
        envelope = serialization.decode(raw_event)
        event = serialization.to_event(envelope, ext.events)
        started = time.monotonic()
        # Events the handler emits go out only if it succeeds (a failed transmit fails this
        # attempt, which is retried like any other), and continue the emitter's trace.
        with tracing.child_context(envelope.traceparent) as traceparent:
            with publisher.scope(self.app):
                result = self.handler_spec.fn(event)
            if tracing.event_log.isEnabledFor(logging.INFO):
                self._log_handled(envelope, ext, traceparent, time.monotonic() - started)
        return result

    def _log_handled(
        self, envelope: serialization.Envelope, ext: Any, traceparent: str, seconds: float
    ) -> None:
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
                "trace_id": tracing.trace_id(traceparent),
                "service": ext.settings.service,
                "handler": self.handler_spec.name,
                "outcome": "handled",
                "duration_ms": round(seconds * 1000, 3),
            },
        )

    def retry(self, *args: Any, **options: Any) -> Any:
        """Retry through this handler's own queue only (see the module docstring)."""
        ext = DomainEvents.of(self.app)
        ext.register_retry_queues()
        options.setdefault("queue", ext.retry_queue(self.handler_spec))
        return super().retry(*args, **options)

    def guard_run(self) -> None:
        """Wrap ``run`` (and Celery's autoretry around it): dead-letter on the final failure.

        Called once, when the handler's task is created. A wrapper rather than ``__call__``:
        a task class with its own ``__call__`` takes a slower path in Celery's tracer, which
        pushes a second request context for every run.

        The wrapper raises ``Reject(requeue=True)`` when the dead letter cannot be confirmed,
        so the delivery is requeued instead of acked, and the event is not lost.
        """
        run = self.run

        @functools.wraps(run)
        def run_or_dead_letter(*args: Any, **kwargs: Any) -> Any:
            try:
                return run(*args, **kwargs)
            except (Retry, Ignore, Reject):
                raise
            except Exception as exc:
                retries = int(self.request.retries or 0)
                try:
                    self._dead_letter(exc, kwargs, retries, traceback.format_exc())
                except Exception as publish_error:
                    log.error(
                        "Could not dead-letter event for %s[%s] (%r); requeueing the delivery",
                        self.name,
                        self.request.id,
                        publish_error,
                    )
                    raise Reject(publish_error, requeue=True) from exc
                raise

        self.run = run_or_dead_letter  # type: ignore[method-assign]

    def on_failure(
        self,
        exc: BaseException,
        task_id: str,
        args: Any,
        kwargs: Any,
        einfo: ExceptionInfo | None,
    ) -> None:
        """Dead-letter failures raised outside the handler's call (a hard time limit)."""
        if getattr(self.request, _DEAD_LETTERED, False) or not isinstance(exc, Exception):
            return
        traceback_text = str(einfo.traceback) if einfo is not None else ""
        retries = int((self.request.retries if self.request.id == task_id else 0) or 0)
        try:
            self._dead_letter(exc, kwargs or {}, retries, traceback_text)
        except Exception:
            # Celery acks after this (the pool process is gone): keep the body in the log.
            log.critical(
                "Could not dead-letter event for %s[%s]; body follows: %s",
                self.name,
                task_id,
                (kwargs or {}).get("raw_event"),
                exc_info=True,
            )

    def _dead_letter(
        self, exc: Exception, kwargs: dict[str, Any], retries: int, traceback_text: str
    ) -> None:
        raw_event = kwargs.get("raw_event")
        if not isinstance(raw_event, str):
            return  # called directly, not from a delivery: nothing to dead-letter
        meta: dict[str, Any] = kwargs.get("meta") or {}
        ext = DomainEvents.of(self.app)
        message = deadletter.dead_letter_message(
            body=raw_event.encode("utf-8"),
            queue=ext.handler_queue_name(self.handler_spec),
            handler=self.handler_spec.name,
            reason=self._failure_reason(exc),
            exc=exc,
            traceback=traceback_text,
            attempts=retries + 1,
            exchange=meta.get("exchange", ""),
            routing_key=meta.get("routing_key", ""),
            task_id=self.request.id,
            content_type=meta.get("content_type"),
            content_encoding=meta.get("content_encoding"),
            properties=meta.get("properties"),
            headers=meta.get("headers"),
        )
        deadletter.send(ext, message)
        setattr(self.request, _DEAD_LETTERED, True)

    def _failure_reason(self, exc: BaseException) -> FailureReason:
        if isinstance(exc, EventDecodeError):
            return FailureReason.POISON
        autoretry_for = tuple(getattr(self, "autoretry_for", ()) or ())
        dont_retry_for = tuple(getattr(self, "dont_autoretry_for", ()) or ())
        retryable = isinstance(exc, autoretry_for) and not isinstance(
            exc, (*NON_RETRYABLE, *dont_retry_for)
        )
        return FailureReason.RETRIES_EXHAUSTED if retryable else FailureReason.REJECTED
