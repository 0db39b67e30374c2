"""The Celery task class every handler runs as.

A delivery reaches the task as ``run(raw_event=<the JSON body as text>, meta={...})``: the body
is decoded and validated here, in the pool, and the user's function receives the typed event.
Two things differ from a plain Celery task:

* ``retry()`` publishes to the handler's own queue through the default exchange. Celery would
  re-publish to the original exchange and routing key, which for a topic exchange means every
  other handler of the event would run again.
* ``on_failure()`` dead-letters the original body with a failure record, confirmed before
  Celery acks the delivery (``acks_late``).
"""

from __future__ import annotations

import logging
from typing import Any

from billiard.einfo import ExceptionInfo
from celery import Task

from . import deadletter, serialization
from .deadletter import FailureReason
from .exceptions import NON_RETRYABLE, EventDecodeError
from .registry import HandlerSpec

__all__ = ["DomainEventTask"]

log = logging.getLogger(__name__)


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
        from .extension import DomainEvents  # noqa: PLC0415 (extension imports this module)

        envelope = serialization.decode(raw_event)
        event = serialization.to_event(envelope, DomainEvents.of(self.app).events)
        return self.handler_spec.fn(event)

    def retry(self, *args: Any, **options: Any) -> Any:
        """Retry through this handler's own queue only (see the module docstring)."""
        from .extension import DomainEvents  # noqa: PLC0415

        ext = DomainEvents.of(self.app)
        ext.register_retry_queues()
        options.setdefault("queue", ext.retry_queue(self.handler_spec))
        return super().retry(*args, **options)

    def on_failure(
        self,
        exc: BaseException,
        task_id: str,
        args: Any,
        kwargs: Any,
        einfo: ExceptionInfo | None,
    ) -> None:
        """Dead-letter the event; Celery acks the delivery once this returns."""
        from .extension import DomainEvents  # noqa: PLC0415

        kwargs = kwargs or {}
        raw_event = kwargs.get("raw_event")
        meta: dict[str, Any] = kwargs.get("meta") or {}
        if not isinstance(raw_event, str):
            log.error(
                "Handler task %s[%s] failed without an event body: %r", self.name, task_id, exc
            )
            return
        retries = self.request.retries if self.request.id == task_id else meta.get("retries", 0)
        ext = DomainEvents.of(self.app)
        message = deadletter.dead_letter_message(
            body=raw_event.encode("utf-8"),
            queue=ext.handler_queue_name(self.handler_spec),
            handler=self.handler_spec.name,
            reason=self._failure_reason(exc),
            exc=exc,
            traceback=str(einfo.traceback) if einfo is not None else "",
            attempts=int(retries or 0) + 1,
            exchange=meta.get("exchange", ""),
            routing_key=meta.get("routing_key", ""),
            task_id=task_id,
            content_type=meta.get("content_type"),
            content_encoding=meta.get("content_encoding"),
            properties=meta.get("properties"),
            headers=meta.get("headers"),
        )
        try:
            deadletter.send(ext, message)
        except Exception:
            # The delivery will still be acked by Celery; keep the body in the log so the
            # event can be recovered by hand rather than vanish.
            log.critical(
                "Could not dead-letter event for %s[%s]; body follows: %s",
                self.name,
                task_id,
                raw_event,
                exc_info=True,
            )
            raise

    def _failure_reason(self, exc: BaseException) -> FailureReason:
        if isinstance(exc, EventDecodeError):
            return FailureReason.POISON
        autoretry_for = tuple(getattr(self, "autoretry_for", ()) or ())
        dont_retry_for = tuple(getattr(self, "dont_autoretry_for", ()) or ())
        retryable = isinstance(exc, autoretry_for) and not isinstance(
            exc, (*NON_RETRYABLE, *dont_retry_for)
        )
        return FailureReason.RETRIES_EXHAUSTED if retryable else FailureReason.REJECTED
