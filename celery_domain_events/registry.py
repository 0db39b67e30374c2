"""Registries of event types (defined with them, in :mod:`.events`) and of handlers.

The defaults (:data:`default_events`, :data:`default_handlers`) are filled at import time by
``DomainEvent`` subclasses and ``@domain_event_handler``; tests reset them with
:meth:`~EventRegistry.isolated` / :meth:`~HandlerRegistry.isolated`.
"""

from __future__ import annotations

import functools
import inspect
import threading
import typing
from collections import abc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .events import EventRegistry, default_events
from .exceptions import RegistrationError
from .upcasting import declared_versions

if TYPE_CHECKING:
    from .batching import Batch
    from .retry import RetryPolicy

__all__ = [
    "BATCH_ANNOTATIONS",
    "EventRegistry",
    "HandlerRegistry",
    "HandlerSpec",
    "default_events",
    "default_handlers",
    "item_annotation",
]


@dataclass(frozen=True)
class HandlerSpec:
    """Everything known about one handler before an app binds it.

    Attributes:
        name: unique handler name; the queue is ``<service>.<name>``.
        patterns: binding patterns (``user.*``, ``#``).
        fn: the user's function, called with the typed event.
        retry: the retry policy (None: never retried).
        task_options: extra Celery task options (time limits, rate limit, ...).
        idempotent: the inbox that records the events it handled, if any.
        batch: how a batch handler gathers its events (None: one event per run).
        transient: each worker consumes a queue of its own that lives only while it is
            connected (``<service>.<name>.<worker hostname>-<6 hex digits>``), with no
            dead-letter queue.
    """

    name: str
    patterns: tuple[str, ...]
    fn: Callable[..., Any] = field(compare=False)
    retry: RetryPolicy | None = None
    task_options: dict[str, Any] = field(default_factory=dict, compare=False)
    #: The inbox that makes it idempotent (``celery_domain_events.inbox``), if any.
    idempotent: Any = field(default=None, compare=False)
    #: A batch handler's :class:`~.batching.Batch` (it takes a list of events), if any.
    batch: Batch | None = None
    #: A per-worker exclusive queue instead of the durable ``<service>.<name>`` (no DLQ).
    transient: bool = False

    def event_versions(self) -> dict[str, frozenset[int]]:
        """The versions of each event the handler's annotation names (``{}`` if untyped).

        An event of another version is upcast to the lowest of these above it.
        """
        return _event_versions(self.fn, batch=self.batch is not None)

    @functools.cached_property
    def task_name(self) -> str:
        """The Celery task name, as shown in Flower: ``domain_events.<module>.<name>``."""
        return f"domain_events.{self.fn.__module__}.{self.name}"


class HandlerRegistry:
    """The handlers declared with ``@domain_event_handler``, by name."""

    def __init__(self) -> None:
        self._specs: dict[str, HandlerSpec] = {}
        self._lock = threading.Lock()

    def register(self, spec: HandlerSpec) -> None:
        """Register ``spec``.

        Raises:
            RegistrationError: another function already uses the same handler name.
        """
        with self._lock:
            existing = self._specs.get(spec.name)
            if existing is not None and _qualified(existing.fn) != _qualified(spec.fn):
                raise RegistrationError(
                    f"handler name {spec.name!r} is used by both {_qualified(existing.fn)} and "
                    f"{_qualified(spec.fn)}; pass name= to one of them"
                )
            self._specs[spec.name] = spec

    def get(self, name: str) -> HandlerSpec | None:
        """Return the handler called ``name``, or None."""
        return self._specs.get(name)

    def all(self) -> list[HandlerSpec]:
        """Return every handler, ordered by name."""
        return [self._specs[k] for k in sorted(self._specs)]

    def clear(self) -> None:
        """Forget every handler."""
        with self._lock:
            self._specs.clear()

    @contextmanager
    def isolated(self) -> Iterator[HandlerRegistry]:
        """Run a block with an empty registry and restore the previous content afterwards."""
        saved = dict(self._specs)
        self.clear()
        try:
            yield self
        finally:
            with self._lock:
                self._specs = saved


_versions_cache: dict[Callable[..., Any], dict[str, frozenset[int]]] = {}


def _event_versions(fn: Callable[..., Any], *, batch: bool) -> dict[str, frozenset[int]]:
    cached = _versions_cache.get(fn)
    if cached is not None:
        return cached
    try:
        first = next(iter(inspect.signature(fn).parameters.values()), None)
        annotation = Any if first is None else typing.get_type_hints(fn).get(first.name, Any)
    except Exception:  # a forward reference not resolvable yet: not cached, tried next time
        return {}
    if batch:
        annotation = item_annotation(annotation)
    versions = _versions_cache[fn] = declared_versions(annotation)
    return versions


#: The collection types a batch handler may annotate its argument with (``list[OrderPaid]``).
BATCH_ANNOTATIONS: tuple[Any, ...] = (list, abc.Sequence, abc.Iterable, abc.Collection)


def item_annotation(annotation: Any) -> Any:
    """The event type of a batch handler's ``list[E]`` annotation (``Any`` if it names none)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in BATCH_ANNOTATIONS and len(args) == 1:
        return args[0]
    return Any


def _qualified(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


#: The registry ``@domain_event_handler`` adds handlers to.
default_handlers = HandlerRegistry()
