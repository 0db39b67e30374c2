"""A programmer's mistake fails where it is made: at emit(), at decoration, at worker start."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

import pytest

from celery_domain_events import (
    ConfigurationError,
    DomainEvent,
    EventDefinitionError,
    GenericEvent,
    domain_event_handler,
    emit,
)
from celery_domain_events.publishing.api import buffered
from celery_domain_events.registry import HandlerRegistry

from .conftest import WorkerProcess


class Base(DomainEvent):
    """An intermediate base class: fields, but no event_name."""

    tenant: str = "t"


class Named(Base):
    event_name: ClassVar[str] = "programmer.named"


def test_emit_refuses_an_event_class_without_a_name_and_buffers_nothing() -> None:
    emit(Named())
    with pytest.raises(EventDefinitionError, match=r"Base has no event_name.*ClassVar"):
        emit(Base())
    assert [type(e) for e in buffered()] == [Named]  # the bad one never reached the buffer
    assert isinstance(EventDefinitionError("x"), TypeError)


@pytest.mark.parametrize("data", [{"when": object()}, {"callback": print}])
def test_emit_refuses_untyped_data_json_cannot_carry(data: dict[str, Any]) -> None:
    with pytest.raises(EventDefinitionError, match=r"cannot be sent as JSON"):
        emit("programmer.untyped", data)
    with pytest.raises(EventDefinitionError):
        emit(GenericEvent(event_name="programmer.untyped", data=data))
    assert buffered() == []


def _decorate(fn: Callable[..., Any]) -> Any:
    return domain_event_handler("programmer.#", registry=HandlerRegistry())(fn)


def test_handlers_must_take_one_event() -> None:
    def no_args() -> None: ...

    def two_args(event: Named, other: int) -> None: ...

    def wrong_type(event: int) -> None: ...

    def a_dict(event: dict[str, Any]) -> None: ...

    for fn in (no_args, two_args, wrong_type, a_dict):
        with pytest.raises(EventDefinitionError, match=fn.__name__):
            _decorate(fn)


def test_handlers_may_take_any_event_type() -> None:
    def typed(event: Named) -> None: ...

    def generic(event: GenericEvent) -> None: ...

    def either(event: Named | GenericEvent) -> None: ...

    def untyped(event) -> None: ...  # type: ignore[no-untyped-def]

    def anything(event: Any) -> None: ...

    def later(event: NotYetDefined) -> None: ...  # type: ignore[name-defined]  # noqa: F821

    for fn in (typed, generic, either, untyped, anything, later):
        assert _decorate(fn).name == fn.__name__


def test_async_def_handlers_are_checked_like_plain_ones() -> None:
    async def typed(event: Named) -> str:
        await asyncio.sleep(0)
        return event.event_name

    async def two_args(event: Named, other: int) -> None: ...

    async def wrong_type(event: int) -> None: ...

    handler = _decorate(typed)
    assert handler.name == "typed"
    call = handler(Named())
    assert inspect.iscoroutine(call)  # called directly, it is the function: await it
    assert asyncio.run(call) == "programmer.named"
    for fn in (two_args, wrong_type):
        with pytest.raises(EventDefinitionError, match=fn.__name__):
            _decorate(fn)


def test_an_async_generator_is_no_handler() -> None:
    async def yields(event: Named) -> AsyncIterator[None]:
        yield None

    with pytest.raises(ConfigurationError, match="async generator"):
        _decorate(yields)


@pytest.mark.rabbitmq
@pytest.mark.worker
def test_a_worker_without_handlers_says_so(worker_process: Callable[..., WorkerProcess]) -> None:
    worker = worker_process([]).start("-P", "solo")
    assert "has no handlers, so this worker consumes no events" in worker.log()
    assert "WARNING" in worker.log().split("has no handlers")[0].splitlines()[-1]
