"""OpenTelemetry PRODUCER spans for publishing, when ``opentelemetry-api`` is installed.

Without the API, or while no SDK tracer provider is set (nothing would record a span), every
function here costs one check and trace context works as :mod:`celery_domain_events.tracing`
describes. With one, ``transmit()``, ``transmit_async()`` and an outbox relay publish each batch
inside a ``publish <exchange>`` span, and the events carry that span's context as their
``traceparent``: one creation context per batch, shared by its events, so every handler run
of them continues the trace (docs/operations/tracing.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from celery_domain_events import _compat, tracing
from celery_domain_events.events import AnyEvent

_trace: Any
_context: Any
_propagator: Any
try:  # optional; imported once, as in tracing
    from opentelemetry import context as _context
    from opentelemetry import trace as _trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _propagator = TraceContextTextMapPropagator()
    _NO_SDK: tuple[type, ...] = (_trace.ProxyTracerProvider, _trace.NoOpTracerProvider)
except ImportError:  # pragma: no cover - depends on the environment
    _trace = _context = _propagator = None
    _NO_SDK = ()

__all__ = ["TRACER_NAME", "create", "publish", "relay", "tracer"]

#: Name (instrumentation scope) of the tracer every span of the library comes from.
TRACER_NAME = "celery_domain_events"

_cached: tuple[Any, Any] = (None, None)
#: OpenTelemetry makes the provider this variable names when first asked (read once here).
_PROVIDER_FROM_ENV = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ


def tracer() -> Any:
    """Return the library's tracer, or None when spans would record nothing.

    None when ``opentelemetry-api`` is not installed or no SDK tracer provider is set yet: the
    check runs every time, so a provider set after import (after a fork) is used from then on.
    """
    global _cached  # noqa: PLW0603 (one tracer per provider, looked up once)
    if _trace is None or not (_PROVIDER_FROM_ENV or _compat.otel_provider_set(_trace)):
        return None
    provider = _trace.get_tracer_provider()
    if isinstance(provider, _NO_SDK):
        return None
    if _cached[0] is not provider:
        _cached = (provider, provider.get_tracer(TRACER_NAME, _version()))
    return _cached[1]


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415 (once)

    try:
        return version("celery-domain-events")
    except PackageNotFoundError:  # pragma: no cover - a source checkout not installed
        return None


def traceparent_of(span: Any) -> str | None:
    """The W3C ``traceparent`` of ``span``, or None if its context is invalid."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def context_of(traceparent: str | None) -> Any:
    """The OpenTelemetry context of a remote ``traceparent`` (None if missing or invalid)."""
    if tracing.trace_id(traceparent) is None:
        return None
    ctx = _propagator.extract({"traceparent": traceparent})
    return ctx if _trace.get_current_span(ctx).get_span_context().is_valid else None


def parent_context() -> Any:
    """The parent of a span started now: ``use_traceparent()``'s, else OpenTelemetry's current."""
    explicit = context_of(tracing.explicit_traceparent())
    return explicit if explicit is not None else _context.get_current()


def publish(
    exchange: str,
    source: str,
    events: Sequence[AnyEvent],
    routing_key: Callable[[AnyEvent], str],
) -> AbstractContextManager[str]:
    """Publish a batch inside a PRODUCER span; enter it for the ``traceparent`` events carry.

    Without a recording tracer: the current trace context, else a new trace, as before.
    """
    return _producer_span(
        "send", "publish", exchange, source=source, events=events, routing_key=routing_key
    )


def create(exchange: str, source: str, events: Sequence[AnyEvent]) -> AbstractContextManager[str]:
    """Write events to an outbox inside a PRODUCER ``create`` span: their creation context.

    The relay publishes them later, maybe elsewhere, in a span linked to this one.
    """
    return _producer_span(
        "create", "create", exchange, source=source, events=events, routing_key=None
    )


def _producer_span(
    operation: str,
    name: str,
    exchange: str,
    *,
    source: str,
    events: Sequence[AnyEvent],
    routing_key: Callable[[AnyEvent], str] | None,
) -> AbstractContextManager[str]:
    tr = tracer()
    if tr is None:
        return nullcontext(tracing.current_traceparent() or tracing.new_traceparent())
    attributes: dict[str, Any] = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": operation,
        "messaging.operation.name": name,
        "messaging.destination.name": exchange,
    }
    if len(events) == 1:
        attributes.update(_event_attributes(events[0], source))
        if routing_key is not None:
            attributes["messaging.rabbitmq.destination.routing_key"] = routing_key(events[0])
    else:
        attributes["messaging.batch.message_count"] = len(events)
    return _ActiveSpan(
        tr, f"{name} {exchange}", "PRODUCER", attributes, parent=parent_context(), links=[]
    )


def relay(exchange: str, rows: Sequence[Any]) -> AbstractContextManager[Any]:
    """Relay outbox rows inside a CLIENT ``send`` span linked to each row's creation context.

    ``rows`` have the CloudEvents JSON as ``body``; it is read only when a span records.
    """
    tr = tracer()
    if tr is None:
        return nullcontext(None)
    links = []
    for row in rows:
        try:
            traceparent = json.loads(bytes(row.body)).get("traceparent")
        except (ValueError, AttributeError):
            continue  # a row written by hand; its relay still publishes it
        ctx = context_of(traceparent if isinstance(traceparent, str) else None)
        if ctx is not None:
            links.append(_trace.Link(_trace.get_current_span(ctx).get_span_context()))
    attributes = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": exchange,
        "messaging.batch.message_count": len(rows),
    }
    return _ActiveSpan(
        tr, f"publish {exchange}", "CLIENT", attributes, parent=parent_context(), links=links
    )


def _event_attributes(event: AnyEvent, source: str) -> dict[str, Any]:
    # Per-message attributes go on a span of one message only (messaging conventions).
    return {
        "cloudevents.event_source": source,
        "messaging.message.id": str(event.event_id),
        "cloudevents.event_id": str(event.event_id),
        "cloudevents.event_type": event.event_name,
        "cloudevents.event_spec_version": "1.0",
    }


def record_failure(span: Any, exc: BaseException) -> None:
    """Mark ``span`` failed by ``exc``: an exception event, ``error.type`` and ERROR status."""
    span.record_exception(exc)
    span.set_attribute("error.type", f"{type(exc).__module__}.{type(exc).__qualname__}")
    span.set_status(_trace.Status(_trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:500]))


class _ActiveSpan:
    """A span current while the block runs (``use_traceparent()`` cleared inside it).

    Enter for the span's ``traceparent``; an exception leaving the block fails the span.
    """

    __slots__ = ("_args", "_token", "_tp_token", "span")

    def __init__(
        self, tr: Any, name: str, kind: str, attributes: dict[str, Any], *, parent: Any, links: Any
    ) -> None:
        self._args = (tr, name, kind, attributes, parent, links)

    def __enter__(self) -> str:
        tr, name, kind, attributes, parent, links = self._args
        self.span = tr.start_span(
            name,
            context=parent,
            kind=getattr(_trace.SpanKind, kind),
            attributes=attributes,
            links=links,
            record_exception=False,
            set_status_on_exception=False,
        )
        self._token = _context.attach(_trace.set_span_in_context(self.span, parent))
        # The span is the trace context from now on: what is emitted inside continues it.
        self._tp_token = tracing._current.set(None)
        return traceparent_of(self.span) or tracing.new_traceparent()

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        tracing._current.reset(self._tp_token)
        _context.detach(self._token)
        if exc is not None:
            record_failure(self.span, exc)
        self.span.end()
