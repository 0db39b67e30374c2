"""Handlers used by the tests; each records what it received in tests.conftest.RECORDER."""

from __future__ import annotations

import time
from typing import ClassVar

from celery_domain_events import (
    DomainEvent,
    GenericEvent,
    RejectEvent,
    RetryPolicy,
    domain_event_handler,
    emit,
)
from celery_domain_events.tracing import current_traceparent

from .conftest import RECORDER


class UserCreated(DomainEvent):
    event_name: ClassVar[str] = "test.user.created"
    event_version: ClassVar[int] = 1

    user_id: int
    email: str = "someone@example.com"


@domain_event_handler("test.user.created")
def welcome_mail(event: UserCreated) -> None:
    RECORDER.record("welcome_mail", event)


@domain_event_handler("test.user.created")
def user_stats(event: UserCreated) -> None:
    RECORDER.record("user_stats", event)


def _recording(name: str, *patterns: str) -> None:
    def handler(event: DomainEvent | GenericEvent) -> None:
        RECORDER.record(name, event)

    handler.__name__ = name
    globals()[name] = domain_event_handler(*patterns, name=name)(handler)


# Wildcard handlers, named after what they bind.
WILDCARDS = {
    "w_user_star": ("user.*",),
    "w_user_hash": ("user.#",),
    "w_hash_created": ("#.created",),
    "w_star_star": ("*.*",),
    "w_all": ("#",),
    "w_exact": ("user.created",),
    "w_mid_hash": ("user.#.done",),
}
for _name, _patterns in WILDCARDS.items():
    _recording(_name, *_patterns)


# Recoverability (issue 3).
class PoisonTarget(DomainEvent):
    event_name: ClassVar[str] = "test.poison.typed"
    event_version: ClassVar[int] = 1

    n: int


@domain_event_handler("test.retry.#", retry=RetryPolicy(max_retries=2, backoff=False, countdown=0))
def always_fails(event: GenericEvent) -> None:
    RECORDER.record("always_fails", (time.monotonic(), event))
    raise RuntimeError(f"boom {event.event_id}")


@domain_event_handler("test.retry.#", retry=None)
def retry_sibling(event: GenericEvent) -> None:
    RECORDER.record("retry_sibling", event)


@domain_event_handler("test.flaky.#", retry=RetryPolicy(max_retries=3, backoff=False))
def fails_twice(event: GenericEvent) -> None:
    calls = [e for e in RECORDER.get("fails_twice") if e == event]
    RECORDER.record("fails_twice", event)
    if len(calls) < 2:
        raise ConnectionError("transient")


@domain_event_handler("test.delay.#", retry=RetryPolicy(max_retries=1, backoff=False, countdown=1))
def delayed_retry(event: GenericEvent) -> None:
    RECORDER.record("delayed_retry", time.monotonic())
    raise RuntimeError("later")


@domain_event_handler("test.reject.#")
def rejects(event: GenericEvent) -> None:
    RECORDER.record("rejects", event)
    raise RejectEvent("not for us")


@domain_event_handler(
    "test.narrow.#",
    retry=RetryPolicy(
        max_retries=3, autoretry_for=(ConnectionError,), dont_retry_for=(ConnectionRefusedError,)
    ),
)
def narrow_retry(event: GenericEvent) -> None:
    """Raises what its data names: only a ConnectionError other than a refused one is retried."""
    RECORDER.record("narrow_retry", event)
    raise {"value": ValueError, "refused": ConnectionRefusedError}[event.data["raise"]]("no")


@domain_event_handler("test.poison.#", retry=RetryPolicy(max_retries=3))
def poison_target(event: PoisonTarget) -> None:
    RECORDER.record("poison_target", event)


# Emitting from tasks and handlers (issue 4).
@domain_event_handler("test.chain.start", retry=RetryPolicy(max_retries=1, backoff=False))
def chain_start(event: GenericEvent) -> None:
    RECORDER.record("chain_start", event)
    emit("test.chain.next", {"after": str(event.event_id)})
    if event.event_data().get("fail_first") and len(RECORDER.get("chain_start")) == 1:
        raise RuntimeError("the emitted event must be discarded with this attempt")


@domain_event_handler("test.chain.next", "test.task.#", retry=None)
def chain_next(event: GenericEvent) -> None:
    RECORDER.record("chain_next", event)


# Tracing and key formats (issue 5).
@domain_event_handler("test.trace.start", retry=None)
def trace_start(event: GenericEvent) -> None:
    RECORDER.record("trace_start", current_traceparent())
    emit("test.trace.next", {})


@domain_event_handler("test.trace.next", retry=None)
def trace_next(event: GenericEvent) -> None:
    RECORDER.record("trace_next", current_traceparent())


@domain_event_handler("user.*", name="petisco_users", retry=None)
def petisco_users(event: GenericEvent) -> None:
    RECORDER.record("petisco_users", event)
