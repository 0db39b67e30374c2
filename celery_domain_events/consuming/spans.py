"""OpenTelemetry CONSUMER spans for handler runs, when an SDK tracer provider is set.

A handler run is a ``process <queue>`` span, a child of the creation context the event carries
(its ``traceparent``: the publishing span) and linked to it, as the messaging conventions ask.
When Celery's own instrumentation (``opentelemetry-instrumentation-celery``) already runs the
task in a span of another trace, that span is linked too; one of the event's own trace becomes
the parent instead. A batch handler's run is one span with a link per event. Without a
recording tracer a run is what :func:`celery_domain_events.tracing.child_context` makes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from celery_domain_events import tracing
from celery_domain_events.extension import DomainEvents
from celery_domain_events.publishing import spans as publishing_spans
from celery_domain_events.wire.envelope import Envelope
from celery_domain_events.wire.inbound import ORIGIN_EXCHANGE_HEADER, ORIGIN_ROUTING_KEY_HEADER

__all__ = ["BatchRun", "handle", "handle_batch"]


def handle(task: Any, envelope: Envelope) -> AbstractContextManager[object]:
    """Run a handler inside its CONSUMER span (inside, ``current_traceparent()`` is the run's).

    Without a recording tracer: :func:`~celery_domain_events.tracing.child_context`.
    """
    tr = publishing_spans.tracer()
    if tr is None:
        return tracing.child_context(envelope.traceparent)
    ot = publishing_spans._trace
    creation = publishing_spans.context_of(envelope.traceparent)
    current = publishing_spans._context.get_current()
    current_span = ot.get_current_span(current).get_span_context()
    links = []
    parent = current
    if creation is not None:
        created = ot.get_current_span(creation).get_span_context()
        links.append(ot.Link(created))
        if not (current_span.is_valid and current_span.trace_id == created.trace_id):
            parent = creation
            if current_span.is_valid:  # e.g. Celery's instrumentation's run span, a new trace
                links.append(ot.Link(current_span))
    queue, attributes = _destination(task, envelope.type)
    attributes.update(
        {
            "messaging.message.id": envelope.id,
            "cloudevents.event_id": envelope.id,
            "cloudevents.event_type": envelope.type,
            "cloudevents.event_source": envelope.source,
            "cloudevents.event_spec_version": envelope.specversion,
        }
    )
    if envelope.subject is not None:
        attributes["cloudevents.event_subject"] = envelope.subject
    return publishing_spans._ActiveSpan(
        tr, f"process {queue}", "CONSUMER", attributes, parent=parent, links=links
    )


class BatchRun:
    """What a batch handler's run reports to its span: events that failed alone."""

    __slots__ = ("span",)

    def __init__(self, span: Any = None) -> None:
        self.span = span

    def failed(self, exc: BaseException, count: int) -> None:
        """``count`` events of the batch failed (``exc`` names them); the others succeeded."""
        if self.span is not None:
            publishing_spans.record_failure(self.span, exc)
            self.span.set_attribute("celery_domain_events.batch.failed_count", count)


_NO_SPAN = BatchRun()


def handle_batch(task: Any, envelopes: Sequence[Envelope]) -> AbstractContextManager[BatchRun]:
    """Run a batch handler inside one CONSUMER span linked to each event's creation context."""
    tr = publishing_spans.tracer()
    if tr is None:
        return nullcontext(_NO_SPAN)
    ot = publishing_spans._trace
    links = []
    for envelope in envelopes:
        ctx = publishing_spans.context_of(envelope.traceparent)
        if ctx is not None:
            links.append(
                ot.Link(
                    ot.get_current_span(ctx).get_span_context(),
                    {"messaging.message.id": envelope.id},
                )
            )
    queue, attributes = _destination(task, None)
    attributes["messaging.batch.message_count"] = len(envelopes)
    return _BatchSpan(
        publishing_spans._ActiveSpan(
            tr,
            f"process {queue}",
            "CONSUMER",
            attributes,
            parent=publishing_spans._context.get_current(),
            links=links,
        )
    )


class _BatchSpan:
    __slots__ = ("_active",)

    def __init__(self, active: Any) -> None:
        self._active = active

    def __enter__(self) -> BatchRun:
        self._active.__enter__()
        return BatchRun(self._active.span)

    def __exit__(self, *exc_info: Any) -> None:
        self._active.__exit__(*exc_info)


def _destination(task: Any, event_type: str | None) -> tuple[str, dict[str, Any]]:
    """The queue a run consumes, and the attributes naming where its events came from."""
    ext = DomainEvents.of(task.app)
    spec = task.handler_spec
    request = task.request
    meta = (request.kwargs or {}).get("meta") or {}
    queue = meta.get("queue") or ext.topology.handler_queue_name(spec)
    headers = meta.get("headers") or {}  # a retry names where the event was first published
    attributes: dict[str, Any] = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": headers.get(
            ORIGIN_EXCHANGE_HEADER, meta.get("exchange", ext.settings.exchange)
        ),
        "messaging.destination.subscription.name": queue,
        "messaging.consumer.group.name": queue,
        "celery_domain_events.handler": spec.name,
    }
    routing_key = headers.get(ORIGIN_ROUTING_KEY_HEADER, meta.get("routing_key", event_type))
    if routing_key:
        attributes["messaging.rabbitmq.destination.routing_key"] = routing_key
    retries = request.retries
    if retries:
        attributes["celery_domain_events.retries"] = int(retries)
    return queue, attributes
