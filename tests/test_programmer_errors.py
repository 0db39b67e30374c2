"""A programmer's mistake fails where it is made: at emit(), at decoration, at worker start."""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest

from celery_domain_events import (
    ConfigurationError,
    DomainEvent,
    EventDefinitionError,
    GenericEvent,
    RetryPolicy,
    domain_event_handler,
    emit,
)
from celery_domain_events.publishing.api import buffered
from celery_domain_events.registry import HandlerRegistry

from .conftest import ROOT, Topology, WorkerProcess, read_log, spawn_worker


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


def test_a_worker_of_an_app_with_handlers_but_no_extension_says_so(
    topology: Topology, tmp_path: Path
) -> None:
    env = {**os.environ, "TEST_BROKER_URL": topology.broker_url, "TEST_TASK_QUEUE": topology.tasks}
    log_path = tmp_path / "worker.log"
    proc, _ = spawn_worker(
        "tests.no_extension_app", "-P", "solo", cwd=ROOT, env=env, log_path=log_path
    )
    try:
        [line] = [row for row in read_log(log_path).splitlines() if "no DomainEvents" in row]
        assert "WARNING/" in line
        assert "Celery app 'no_extension' has domain event handlers (forgotten)" in line
        assert line.endswith("if it should run them, call DomainEvents(app, service=...)")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_retry_mistakes_fail_at_decoration_and_say_what_to_write() -> None:
    registry = HandlerRegistry()

    def handle(event: GenericEvent) -> None: ...

    with pytest.raises(ConfigurationError, match=r"write retry=RetryPolicy\(max_retries=3\)"):
        domain_event_handler("programmer.x", retry=3, registry=registry)(handle)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"max_retries belong in retry=RetryPolicy"):
        domain_event_handler("programmer.x", max_retries=5, registry=registry)(handle)
    with pytest.raises(ConfigurationError, match=r"name, retry, idempotent, batch, transient"):
        domain_event_handler("programmer.x", queue="q", registry=registry)(handle)
    with pytest.raises(ConfigurationError, match=r"RetryPolicy\(backoff=False, countdown=10\)"):
        RetryPolicy(countdown=10)
    assert RetryPolicy(backoff=False, countdown=10).max_delay == 10.0
    assert registry.all() == []


def test_a_bare_decorator_says_to_give_patterns() -> None:
    with pytest.raises(ConfigurationError, match=r"@domain_event_handler\('user.\*'\)"):

        @domain_event_handler  # type: ignore[arg-type]
        def forgot(event: GenericEvent) -> None: ...


class Declared(DomainEvent):
    event_name: ClassVar[str] = "programmer.declared"
    order_id: int


def test_untyped_emit_of_a_declared_event_is_checked_against_its_model() -> None:
    with pytest.raises(EventDefinitionError) as info:
        emit("programmer.declared", {"order_id": "s3cret"})
    message = str(info.value)
    assert "Declared declares that event" in message
    assert "order_id: Input should be a valid integer" in message
    assert "emit Declared(...) instead" in message
    assert "s3cret" not in message  # never the data's values
    with pytest.raises(EventDefinitionError, match="order_id: Field required"):
        emit("programmer.declared", {"orderid": 1})
    # Checked as a consumer reads it: a key the model does not read is ignored (a producer
    # may add fields first), and values as JSON carries them.
    emit("programmer.declared", {"order_id": 1, "added_later": 2})
    emit("programmer.declared", {"order_id": "7"})  # lax, as a consumer's model is
    emit("programmer.declared", {"order_id": "x"}, version=2)  # no model for v2 here
    assert [e.event_version for e in buffered()] == [1, 1, 2]


class Referenced(DomainEvent):
    event_name: ClassVar[str] = "programmer.referenced"
    ref: str


def test_untyped_emit_checks_values_as_json_carries_them() -> None:
    emit("programmer.referenced", {"ref": uuid.uuid4()})  # a string on the wire
    with pytest.raises(EventDefinitionError, match="ref: Input should be a valid string"):
        emit("programmer.referenced", {"ref": 5})


@pytest.mark.parametrize("version", [0, -1, 1.5, True, "1"])
def test_untyped_emit_refuses_a_version_that_is_not_a_positive_integer(version: Any) -> None:
    with pytest.raises(EventDefinitionError, match="a version is a positive integer"):
        emit("programmer.untyped", {}, version=version)
    assert buffered() == []


def test_untyped_emit_refuses_data_that_is_not_a_mapping() -> None:
    with pytest.raises(EventDefinitionError, match=r"data is a mapping .* not list"):
        emit("programmer.untyped", [1, 2])  # type: ignore[arg-type]
    assert buffered() == []


def test_a_handler_typed_for_events_its_patterns_never_match_fails_at_decoration() -> None:
    registry = HandlerRegistry()

    def orders(event: Declared) -> None: ...

    with pytest.raises(
        EventDefinitionError,
        match=r"takes Declared \(programmer.declared\), which none of its patterns \(user\.\*\)",
    ):
        domain_event_handler("user.*", registry=registry)(orders)

    def batch(events: list[Declared]) -> None: ...

    with pytest.raises(EventDefinitionError, match="none of its patterns"):
        domain_event_handler("user.*", batch=10, registry=registry)(batch)

    def either(event: Declared | Named) -> None: ...

    domain_event_handler("programmer.named", registry=registry)(either)  # one of them matches
    domain_event_handler("programmer.#", registry=registry)(orders)
    domain_event_handler("user.*", name="untyped", registry=registry)(lambda event: None)
    assert len(registry.all()) == 3


@pytest.mark.parametrize(
    ("script", "warned"),
    [
        ("emit('programmer.forgot', {'n': 1})", True),
        ("emit('programmer.forgot', {'n': 1}); discard()", False),
        ("pass", False),
    ],
)
def test_a_process_that_exits_with_untransmitted_events_says_so(script: str, warned: bool) -> None:
    result = subprocess.run(
        [sys.executable, "-c", f"from celery_domain_events import emit, discard\n{script}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    expected = (
        "1 event(s) emitted but never transmitted (the first: programmer.forgot); they are "
        "dropped: call transmit(app) after your transaction commits, or emit inside scope(app)"
    )
    assert result.stderr.strip() == (expected if warned else "")


class Audited(DomainEvent):
    """A concrete base event with a subclass of its own."""

    event_name: ClassVar[str] = "programmer.audited"


class AuditedLogin(Audited):
    event_name: ClassVar[str] = "programmer.audited.login"


def test_a_handler_typed_for_a_base_event_may_bind_its_subclass_name() -> None:
    registry = HandlerRegistry()

    def audit(event: Audited) -> None: ...

    # Receives AuditedLogin instances, which are Audited.
    domain_event_handler("programmer.audited.login", registry=registry)(audit)
    assert [spec.name for spec in registry.all()] == ["audit"]
