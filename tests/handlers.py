"""Handlers used by the tests; each records what it received in tests.conftest.RECORDER."""

from __future__ import annotations

from typing import ClassVar

from celery_domain_events import DomainEvent, GenericEvent, domain_event_handler

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
