"""The asyncio publishing API without a broker: the in-process harness, memory://, no aio-pika."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest
from celery import Celery

from celery_domain_events import ConfigurationError, DomainEvents, emit, scope_async, transmit_async
from celery_domain_events.publishing.api import buffered, discard
from celery_domain_events.testing import capture_events


def memory_app(**overrides: Any) -> Celery:
    app = Celery("aio-units", broker="memory://", set_as_current=False)
    DomainEvents(app, service="aio-units", discover_handlers=False, **overrides)
    return app


def test_capture_events_sees_what_transmit_async_publishes() -> None:
    app = memory_app()

    async def main() -> None:
        async with scope_async(app):
            emit("test.units.async", {"n": 1})

    with capture_events(app) as events:
        asyncio.run(main())
    assert [e.event_name for e in events.published] == ["test.units.async"]


def test_a_broker_other_than_rabbitmq_publishes_through_the_sync_path_in_a_thread() -> None:
    app = memory_app(unrouted_queue=None)

    async def main() -> list[Any]:
        emit("test.units.memory", {})
        return await transmit_async(app)

    assert [e.event_name for e in asyncio.run(main())] == ["test.units.memory"]


def test_without_aio_pika_transmit_async_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "aio_pika", None)  # "not installed" to the import system
    monkeypatch.delitem(sys.modules, "celery_domain_events.amqp.aio", raising=False)
    app = Celery("no-aio", broker="amqp://guest:guest@127.0.0.1:5999//", set_as_current=False)
    DomainEvents(app, service="no-aio", discover_handlers=False)

    async def main() -> int:
        emit("test.units.noaio", {})
        with pytest.raises(ConfigurationError, match=r"celery-domain-events\[asyncio\]"):
            await transmit_async(app)
        left = len(buffered())
        discard()
        return left

    assert asyncio.run(main()) == 1  # nothing was lost by the refusal
