"""Trace context (W3C ``traceparent``) from ``emit()`` to every handler, and event logs.

A transmitted event carries the current trace context as the CloudEvents ``traceparent``
extension attribute, in the body. A handler runs inside a child span of it (same trace id,
new span id), so whatever the handler emits continues the same trace::

    request (trace 4bf9...) ─► user.created ─► send_welcome_email ─► email.sent (trace 4bf9...)

The current context comes from :func:`use_traceparent`, else from an active OpenTelemetry span
when ``opentelemetry-api`` is installed, else a new trace starts at ``transmit()``.

Every event emitted and handled is also logged on the ``celery_domain_events.events`` logger
with structured fields in ``extra`` (``event_id``, ``event_name``, ``event_version``,
``trace_id``, ``service``, ``handler``, ``outcome``, ``duration_ms``) for JSON log formatters.
"""

from __future__ import annotations

import contextvars
import logging
import random
import re
import threading
from contextlib import AbstractContextManager
from typing import Any

_otel_trace: Any
try:  # optional; imported once, since a failed import searches sys.path again every time
    from opentelemetry import trace as _otel_trace
except ImportError:  # pragma: no cover - depends on the environment
    _otel_trace = None

__all__ = [
    "child_context",
    "child_of",
    "current_traceparent",
    "event_log",
    "explicit_traceparent",
    "new_traceparent",
    "trace_id",
    "use_traceparent",
]

#: Structured log of events emitted and handled.
event_log = logging.getLogger("celery_domain_events.events")

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_INVALID_TRACE_ID = "0" * 32
_current: contextvars.ContextVar[str | _Child | None] = contextvars.ContextVar(
    "celery_domain_events_traceparent", default=None
)


def new_traceparent() -> str:
    """Return the traceparent of a new, sampled root span."""
    return f"00-{_random_id(128):032x}-{_random_id(64):016x}-01"


def _random_id(bits: int) -> int:
    # As OpenTelemetry's RandomIdGenerator: ids need to be unique, not secret, and every
    # handler run makes one (os.urandom is a system call). random reseeds in forked children.
    return random.getrandbits(bits) or 1  # all zeros is the W3C "invalid" id


def trace_id(traceparent: str | None) -> str | None:
    """Return the trace id of a valid ``traceparent``, else None."""
    if not traceparent or _TRACEPARENT.match(traceparent) is None:
        return None
    trace = traceparent[3:35]
    return None if trace == _INVALID_TRACE_ID else trace


def child_of(traceparent: str | None) -> str:
    """Return a child span of ``traceparent`` (a new root if it is missing or invalid)."""
    if traceparent is None or trace_id(traceparent) is None:
        return new_traceparent()
    # Valid, so fixed width: "00-" trace id (32) "-" span id (16) "-" flags (2).
    return f"{traceparent[:36]}{_random_id(64):016x}{traceparent[52:]}"


def child_context(traceparent: str | None) -> AbstractContextManager[None]:
    """Run a block in a child span of ``traceparent`` (a new root if it is missing or invalid).

    What a handler runs in: ``use_traceparent(child_of(traceparent))``, except that the child
    is made when the block first asks for it (:func:`current_traceparent`): most handler runs
    never do.
    """
    return _Child(traceparent)


_child_lock = threading.Lock()


class _Child:
    # The current context inside child_context(): the child span is made on first use (a
    # handler run that emits nothing and logs nothing never makes one), then stays the run's.
    __slots__ = ("_token", "_value", "parent")

    def __init__(self, parent: str | None) -> None:
        self.parent = parent
        self._value: str | None = None

    def value(self) -> str:
        value = self._value
        if value is None:
            with _child_lock:  # a run's threads (to_thread, an executor) must agree on one
                value = self._value
                if value is None:
                    value = self._value = child_of(self.parent)
        return value

    def __enter__(self) -> None:
        self._token = _current.set(self)

    def __exit__(self, *exc_info: object) -> None:
        _current.reset(self._token)


def _from_opentelemetry() -> str | None:
    if _otel_trace is None:
        return None
    context: Any = _otel_trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def current_traceparent() -> str | None:
    """Return the trace context events emitted now would carry, if there is one."""
    return explicit_traceparent() or _from_opentelemetry()


def explicit_traceparent() -> str | None:
    """The trace context :func:`use_traceparent` or a handler run set, not OpenTelemetry's."""
    value = _current.get()
    return value.value() if isinstance(value, _Child) else value


def use_traceparent(traceparent: str | None) -> AbstractContextManager[str]:
    """Run a block in the trace context ``traceparent`` (a new root if it is None)."""
    value = traceparent if traceparent and trace_id(traceparent) else new_traceparent()
    return _TraceContext(value)


class _TraceContext:
    # A class, not @contextmanager: every handler run enters one.
    __slots__ = ("_token", "value")

    def __init__(self, value: str) -> None:
        self.value = value

    def __enter__(self) -> str:
        self._token = _current.set(self.value)
        return self.value

    def __exit__(self, *exc_info: object) -> None:
        _current.reset(self._token)
