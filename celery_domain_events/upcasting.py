"""Upcasters: bring an old version of an event's data up to the version a handler takes.

Producers and consumers deploy independently, so version N and N+1 of an event are on the wire
at the same time, and old versions wait in dead-letter queues and outboxes. An upcaster is a
pure function from version N's ``data`` to version N+1's; registered ones form a chain, and a
handler annotated with ``OrderPlacedV3`` receives v1 and v2 events upcast along it::

    @upcaster("order.placed", from_version=1)         # on the data, as a dict
    def add_currency(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "currency": "EUR"}

    @upcaster                                         # typed: the versions come from the hints
    def split_amount(event: OrderPlacedV2) -> OrderPlacedV3:
        return OrderPlacedV3(order_id=event.order_id, cents=round(event.amount * 100))

Each step raises the version by exactly one, so a chain has no cycles; a second upcaster for the
same step is refused when it is declared. A chain with a gap, which some handler would need, is
refused when the worker starts (:func:`check_handlers`). There is no downcasting: a version newer
than every version a handler takes is dead-lettered as poison, with the reason.
"""

from __future__ import annotations

import inspect
import threading
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from pydantic import ValidationError

from .events import DomainEvent, EventRegistry, readable, validation_summary
from .exceptions import (
    ConfigurationError,
    EventValidationError,
    RegistrationError,
    UnknownEventError,
)
from .routing import validate_event_name

__all__ = [
    "Upcaster",
    "UpcasterRegistry",
    "check_handlers",
    "declared_versions",
    "decodable_versions",
    "default_upcasters",
    "upcaster",
]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Upcaster:
    """One step of a chain: ``event_name`` data from ``from_version`` to ``from_version + 1``."""

    event_name: str
    from_version: int
    fn: Callable[[dict[str, Any]], dict[str, Any]]
    #: ``module.qualname`` of the user's function, for messages.
    origin: str

    @property
    def to_version(self) -> int:
        """The version this step produces."""
        return self.from_version + 1


class UpcasterRegistry:
    """The registered upcasters, by ``(event_name, from_version)``."""

    def __init__(self) -> None:
        self._steps: dict[tuple[str, int], Upcaster] = {}
        self._lock = threading.Lock()

    def register(self, step: Upcaster) -> None:
        """Register ``step``; registering the same function again (a module reload) is allowed.

        Raises:
            RegistrationError: another function already upcasts the same version.
        """
        key = (step.event_name, step.from_version)
        with self._lock:
            existing = self._steps.get(key)
            if existing is not None and existing.origin != step.origin:
                raise RegistrationError(
                    f"{step.event_name!r} v{step.from_version} -> v{step.to_version} is upcast "
                    f"by both {existing.origin} and {step.origin}; keep one"
                )
            self._steps[key] = step

    def get(self, event_name: str, from_version: int) -> Upcaster | None:
        """The step from ``from_version`` of ``event_name``, or None."""
        return self._steps.get((event_name, from_version))

    def all(self) -> list[Upcaster]:
        """Every step, ordered by event name and version."""
        return [self._steps[k] for k in sorted(self._steps)]

    def versions(self, event_name: str) -> set[int]:
        """Every version of ``event_name`` a step starts from or leads to."""
        return {
            v
            for s in self.all()
            if s.event_name == event_name
            for v in (s.from_version, s.to_version)
        }

    def missing_step(self, event_name: str, from_version: int, to_version: int) -> int | None:
        """The first version on the way from ``from_version`` to ``to_version`` with no step."""
        for version in range(from_version, to_version):
            if (event_name, version) not in self._steps:
                return version
        return None

    def upcast(
        self, event_name: str, from_version: int, to_version: int, data: dict[str, Any]
    ) -> dict[str, Any]:
        """Run ``data`` through every step from ``from_version`` to ``to_version``.

        Raises:
            UnknownEventError: a step on the way is missing.
            EventValidationError: a step raised (its error is chained).
        """
        gap = self.missing_step(event_name, from_version, to_version)
        if gap is not None:
            raise UnknownEventError(
                f"{event_name!r} v{from_version} cannot be upcast to v{to_version}: "
                f"no upcaster from v{gap} to v{gap + 1}"
            )
        for version in range(from_version, to_version):
            step = self._steps[(event_name, version)]
            try:
                data = step.fn(dict(data))
            except Exception as exc:
                error = EventValidationError(
                    f"{event_name!r} v{version} -> v{version + 1}: upcaster {step.origin} "
                    f"failed: {_describe(exc)}"
                )
                # pydantic's own text holds the input values (the event's data): not chained.
                raise error from (None if isinstance(exc, ValidationError) else exc)
            if not isinstance(data, dict):
                raise EventValidationError(
                    f"upcaster {step.origin} returned {type(data).__name__}, not a dict"
                )
        return data

    def clear(self) -> None:
        """Forget every step."""
        with self._lock:
            self._steps.clear()

    @contextmanager
    def isolated(self) -> Iterator[UpcasterRegistry]:
        """Run a block with an empty registry and restore the previous content afterwards."""
        saved = dict(self._steps)
        self.clear()
        try:
            yield self
        finally:
            with self._lock:
                self._steps = saved


#: The registry ``@upcaster`` adds to.
default_upcasters = UpcasterRegistry()


@overload
def upcaster(event_name: F, /) -> F: ...


@overload
def upcaster(
    event_name: str, from_version: int, *, registry: UpcasterRegistry = ...
) -> Callable[[F], F]: ...


def upcaster(
    event_name: Any,
    from_version: int | None = None,
    *,
    registry: UpcasterRegistry = default_upcasters,
) -> Any:
    """Register a function that turns one version of an event into the next.

    Two forms::

        @upcaster("order.placed", from_version=1)      # data dict -> data dict
        def v1_to_v2(data: dict[str, Any]) -> dict[str, Any]: ...

        @upcaster                                      # typed: OrderPlacedV1 -> OrderPlacedV2
        def v1_to_v2(event: OrderPlacedV1) -> OrderPlacedV2: ...

    The function must be pure (same input, same output, no side effects): it runs on every
    delivery of an old version, retries and replays included.

    Raises:
        ConfigurationError: the typed form's hints are not two versions N and N+1 of one event,
            or ``from_version`` is not a positive int.
        RegistrationError: another upcaster already covers the same step.
    """
    if callable(event_name) and from_version is None:
        step = _typed_step(event_name)
        registry.register(step)
        return event_name
    if not isinstance(event_name, str):
        raise ConfigurationError("upcaster() takes an event name and from_version, or a function")
    validate_event_name(event_name)
    if not isinstance(from_version, int) or isinstance(from_version, bool) or from_version < 1:
        raise ConfigurationError(
            f"upcaster({event_name!r}, from_version=...) needs a positive int version"
        )

    def decorate(fn: F) -> F:
        registry.register(Upcaster(event_name, from_version, fn, _qualified(fn)))
        return fn

    return decorate


def _typed_step(fn: Callable[..., Any]) -> Upcaster:
    origin = _qualified(fn)
    try:
        hints = typing.get_type_hints(fn)
        first = next(iter(inspect.signature(fn).parameters))
    except (NameError, StopIteration, TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"upcaster {origin} needs one parameter and a return annotation, both event "
            f"classes (or use @upcaster('name', from_version=N) on a dict function): {exc}"
        ) from exc
    source_hint, target_hint = hints.get(first), hints.get("return")
    if not (_is_model(source_hint) and _is_model(target_hint)):
        raise ConfigurationError(
            f"upcaster {origin} must be annotated with two DomainEvent classes, "
            f"(event: OrderPlacedV1) -> OrderPlacedV2; got {source_hint!r} -> {target_hint!r}"
        )
    source: type[DomainEvent] = source_hint
    target: type[DomainEvent] = target_hint
    if source.event_name != target.event_name or target.event_version != source.event_version + 1:
        raise ConfigurationError(
            f"upcaster {origin} must go from one version of an event to the next; got "
            f"{source.event_name!r} v{source.event_version} -> "
            f"{target.event_name!r} v{target.event_version}"
        )

    def step(data: dict[str, Any]) -> dict[str, Any]:
        old = source.model_validate(readable(source, data))
        new = fn(old)
        if not isinstance(new, target):
            raise TypeError(f"returned {type(new).__name__}, not {target.__name__}")
        result: dict[str, Any] = new.event_data()
        return result

    return Upcaster(source.event_name, source.event_version, step, origin)


def _is_model(hint: Any) -> typing.TypeGuard[type[DomainEvent]]:
    return isinstance(hint, type) and issubclass(hint, DomainEvent) and "event_name" in vars(hint)


def declared_versions(annotation: Any) -> dict[str, frozenset[int]]:
    """The event versions a handler's annotation names: ``{"order.placed": {3}}``.

    Only concrete event classes count; ``GenericEvent``, ``DomainEvent``, ``Any`` and abstract
    bases name no version (the handler takes what it gets).
    """
    found: dict[str, set[int]] = {}
    if typing.get_origin(annotation) in (typing.Union, _UnionType):
        args = typing.get_args(annotation)
    else:
        args = (annotation,)
    for arg in args:
        if _is_model(arg):
            found.setdefault(arg.event_name, set()).add(arg.event_version)
    return {name: frozenset(versions) for name, versions in found.items()}


_UnionType = type(int | str)


def target_version(declared: frozenset[int], event_name: str, version: int) -> int:
    """The version a handler taking ``declared`` versions receives an event of ``version`` as.

    The version itself if declared, else the lowest declared version above it.

    Raises:
        UnknownEventError: ``version`` is newer than every declared version.
    """
    if version in declared:
        return version
    above = [v for v in sorted(declared) if v > version]
    if not above:
        raise UnknownEventError(
            f"{event_name!r} v{version} is newer than this handler takes "
            f"(v{', v'.join(map(str, sorted(declared)))}); events are never downcast: "
            "deploy the consumer's new version first, or publish the old version as well"
        )
    return above[0]


def decodable_versions(
    declared: Mapping[str, frozenset[int]],
    event_name: str,
    events: EventRegistry,
    upcasters: UpcasterRegistry,
) -> frozenset[int] | None:
    """The versions of ``event_name`` a handler can decode, or None for "any version".

    ``declared`` is the handler's ``HandlerSpec.event_versions()``. A typed handler takes the
    versions it declares and those an upcaster chain brings to one of them; an untyped one
    takes every version with a model here, or any version if none has one (as a
    ``GenericEvent``). This is what a worker would do (``wire.envelope.to_event``).
    """
    versions = declared.get(event_name)
    if versions:
        ok = set(versions)
        for version in range(1, max(versions)):
            if version in ok:
                continue
            target = target_version(versions, event_name, version)
            if upcasters.missing_step(event_name, version, target) is None:
                ok.add(version)
        return frozenset(ok)
    registered = events.versions(event_name)
    return frozenset(registered) if registered else None


def check_handlers(
    handlers: Iterable[Any], events: EventRegistry, upcasters: UpcasterRegistry
) -> None:
    """Refuse, at start-up, a handler that some known version of its events could not reach.

    Every version of an event the code knows below the highest a handler takes (a declared
    model, or a version an upcaster starts from or leads to) must be declared by the handler
    or upcast to one it declares.

    Raises:
        ConfigurationError: one line per gap, naming the handler and the missing upcaster.
    """
    problems = []
    for spec in handlers:
        for name, declared in spec.event_versions().items():
            for version in sorted(set(events.versions(name)) | upcasters.versions(name)):
                if version >= max(declared) or version in declared:
                    continue
                target = target_version(declared, name, version)
                gap = upcasters.missing_step(name, version, target)
                if gap is not None:
                    problems.append(
                        f"handler {spec.name} takes {name!r} v{target}, but v{version} events "
                        f"cannot reach it: no upcaster from v{gap} to v{gap + 1} "
                        f"(@upcaster({name!r}, from_version={gap}))"
                    )
    if problems:
        raise ConfigurationError("; ".join(dict.fromkeys(problems)))


def _describe(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return validation_summary(exc)  # never pydantic's input values: the event's data
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def as_mapping(versions: Mapping[str, frozenset[int]]) -> dict[str, list[int]]:
    """JSON-ready form of :func:`declared_versions`' result."""
    return {name: sorted(v) for name, v in sorted(versions.items())}
