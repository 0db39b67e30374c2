"""Settings, parsed once from the ``domain_events_*`` keys of a Celery app's configuration.

``DomainEvents(app, service="billing")`` reads ``app.conf.domain_events_exchange`` and friends;
keyword arguments win over ``app.conf``. An unknown ``domain_events_*`` key is an error, so a typo
cannot silently fall back to a default. Every field is listed in docs/operations/settings.md.
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Mapping
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .exceptions import ConfigurationError
from .routing import validate_word
from .urls import RedactedURL

__all__ = [
    "NOT_SETTINGS",
    "PREFIX",
    "ContentMode",
    "KeyFormat",
    "QueueType",
    "Settings",
    "misspelled_setting",
    "setting_name",
]

#: Prefix of every app.conf key this library reads.
PREFIX = "domain_events_"


@enum.unique
class QueueType(str, enum.Enum):
    """RabbitMQ queue type of the handler queues."""

    #: Classic durable queues (the RabbitMQ default).
    CLASSIC = "classic"
    #: Replicated quorum queues; supports ``delivery_limit`` for crash loops.
    QUORUM = "quorum"


@enum.unique
class KeyFormat(str, enum.Enum):
    """How an event's routing key is built from its name."""

    #: The event name itself: ``user.created``.
    PLAIN = "plain"
    #: petisco style: ``<organization>.<service>.<version>.event.<name>``.
    PETISCO = "petisco"


@enum.unique
class ContentMode(str, enum.Enum):
    """How published events carry their CloudEvents attributes (docs/design/wire-format.md)."""

    #: The whole event, attributes and data, is one JSON body (``application/cloudevents+json``).
    STRUCTURED = "structured"
    #: Attributes are ``ce-`` headers, the body is the data alone (``application/json``).
    BINARY = "binary"


class Settings(BaseModel):
    """Validated settings of one app; docs/operations/settings.md describes each key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Name of this service: CloudEvents ``source`` and the prefix of its handler queues.
    service: str
    #: The durable topic exchange events are published to.
    exchange: str = "domain_events"
    #: Queue kept for events no handler is bound to (via an alternate exchange); None: drop them.
    unrouted_queue: str | None = "domain_events.unrouted"
    #: Most events the unrouted queue keeps; beyond, the oldest are dropped. None: unbounded.
    unrouted_max_length: int | None = Field(default=100_000, ge=1)
    #: Type of the handler queues.
    queue_type: QueueType = QueueType.CLASSIC
    #: Quorum queues only: deliveries before RabbitMQ dead-letters a message (crash loops).
    delivery_limit: int | None = Field(default=None, ge=1)
    #: The deadline, in seconds, of one publish: ``transmit()``, a retry, a dead letter, one
    #: outbox batch; connecting, publishing and confirming included. Fits a web request.
    publish_timeout: float = Field(default=10.0, gt=0)
    #: CloudEvents content mode of published events; workers accept both whatever it says.
    content_mode: ContentMode = ContentMode.STRUCTURED
    #: Routing key format; ``petisco`` needs ``organization``.
    key_format: KeyFormat = KeyFormat.PLAIN
    #: Organization prefix of petisco-style keys (one word).
    organization: str | None = None
    #: RabbitMQ management API for ``topology show/diff``; None: port 15672 on the broker host.
    management_url: str | None = None
    #: Make ``emit()`` outside a scope (task, handler, request, ``scope()``) raise NoActiveScope.
    require_scope: bool = False
    #: Transmit what a Celery task emitted when it succeeds; discard it when it fails.
    task_scope: bool = True
    #: Largest event body a worker accepts, in bytes; a larger one is dead-lettered as poison.
    max_event_bytes: int = Field(default=1024 * 1024, ge=1024)
    #: Seconds an inbox remembers a handled event; the purge commands delete older rows.
    inbox_retention: float = Field(default=7 * 24 * 3600, gt=0)
    #: Record Prometheus metrics in this process (needs prometheus-client, the metrics extra).
    metrics: bool = False
    #: A worker serves its metrics (all pool processes) on this HTTP port; None: no port.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    #: The address the worker's metrics port listens on.
    metrics_address: str = "0.0.0.0"
    #: Seconds between two reads of the handler queue and DLQ depths by a serving worker.
    metrics_depth_interval: float = Field(default=15.0, gt=0)

    @property
    def metrics_enabled(self) -> bool:
        """Whether this process records metrics: ``metrics``, or a worker's metrics port."""
        return self.metrics or self.metrics_port is not None

    @field_validator("management_url", mode="before")
    @classmethod
    def _url_of(cls, value: Any) -> Any:
        # DomainEvents(...) wraps the setting so that Celery's report and inspect hide it.
        return str(value) if isinstance(value, RedactedURL) else value

    @field_validator("service")
    @classmethod
    def _service_is_a_word(cls, value: str) -> str:
        return validate_word(value, "service name")

    @field_validator("exchange")
    @classmethod
    def _exchange_named(cls, value: str) -> str:
        if not value:
            raise ValueError("the exchange needs a name (the default exchange cannot route topics)")
        return value

    @model_validator(mode="after")
    def _delivery_limit_needs_quorum(self) -> Settings:
        # Classic queues have no delivery limit: the setting would protect nothing.
        if self.delivery_limit is not None and self.queue_type is not QueueType.QUORUM:
            raise ValueError(
                "domain_events_delivery_limit needs domain_events_queue_type='quorum' (classic "
                "queues have no delivery limit)"
            )
        return self

    @model_validator(mode="after")
    def _petisco_needs_organization(self) -> Settings:
        if self.key_format is KeyFormat.PETISCO:
            if not self.organization:
                raise ValueError("key_format 'petisco' needs an organization")
            validate_word(self.organization, "organization")
        return self

    @classmethod
    def from_conf(
        cls, conf: Mapping[str, Any], *, namespace: str | None = None, **overrides: Any
    ) -> Settings:
        """Build settings from ``conf``'s domain-events keys, then ``overrides``.

        A setting may be written as Celery does (``domain_events_exchange``), as Django does
        (``DOMAIN_EVENTS_EXCHANGE``), or with the namespace given to
        ``app.config_from_object(..., namespace="CELERY")`` (``CELERY_DOMAIN_EVENTS_EXCHANGE``).

        Raises:
            ConfigurationError: a key is unknown in any of these forms, a setting is given
                twice with different values, or a value is invalid.
        """
        values: dict[str, Any] = {}
        given_as: dict[str, str] = {}
        for key in list(conf.keys()):
            name = setting_name(key, namespace) if isinstance(key, str) else None
            if name is None and isinstance(key, str):
                meant = misspelled_setting(key, namespace)
                if meant is not None:
                    raise ConfigurationError(
                        f"unknown setting {key!r}: did you mean {meant!r}? Settings are "
                        f"{PREFIX}* (or the same in upper case, with or without the Celery "
                        "namespace)"
                    )
            if name is None or name in NOT_SETTINGS:
                continue
            if name not in cls.model_fields:
                close = difflib.get_close_matches(name, list(cls.model_fields), n=1, cutoff=0.8)
                if close:
                    meant_key = key[: len(key) - len(name)] + (
                        close[0].upper() if key.isupper() else close[0]
                    )
                    raise ConfigurationError(
                        f"unknown setting {key!r}: did you mean {meant_key!r}?"
                    )
                raise ConfigurationError(
                    f"unknown setting {key!r}; known: "
                    + ", ".join(PREFIX + f for f in cls.model_fields)
                    + " (or the same in upper case, with or without the Celery namespace)"
                )
            value = conf[key]
            if name in values and values[name] != value:
                raise ConfigurationError(
                    f"setting {name!r} is given twice with different values: "
                    f"{given_as[name]}={values[name]!r} and {key}={value!r}; keep one"
                )
            values[name], given_as[name] = value, key
        for name in overrides:
            if name not in cls.model_fields:
                raise ConfigurationError(f"unknown DomainEvents option {name!r}")
            given_as[name] = f"DomainEvents({name}=...)"
        values.update(overrides)
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            # One line, naming each setting as it was written; never the values (a URL's
            # password). Not chained: pydantic's own text repeats them.
            problems = "; ".join(_problem(error, given_as) for error in exc.errors())
            raise ConfigurationError(f"invalid domain events settings: {problems}") from None


def _problem(error: Any, given_as: Mapping[str, str]) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    field = str(error["loc"][0]) if error["loc"] else ""
    if not field:  # a rule across settings: its message names them
        return message
    key = given_as.get(field, PREFIX + field)
    if error["type"] == "missing":
        return f"{key} is required" + (
            ' (DomainEvents(app, service="billing"), or the setting)' if field == "service" else ""
        )
    return f"{key}: {message}"


#: ``DOMAIN_EVENTS_*`` names that are not settings of ours but Django settings read elsewhere
#: (``DOMAIN_EVENTS_CELERY_APP``: the app of ``contrib.django``'s middleware).
NOT_SETTINGS = frozenset({"celery_app"})
_UPPER = PREFIX.upper()


#: ``domain_events_`` without its underscores, in lower case: a key's prefix that is one edit
#: (a letter added, dropped, changed or two swapped) from it is taken for a misspelling.
_SQUEEZED = PREFIX.replace("_", "")


def misspelled_setting(key: str, namespace: str | None = None) -> str | None:
    """Return the setting ``key`` seems meant to be, or None.

    ``key`` is one :func:`setting_name` does not read: it is taken for a misspelling when it
    ends with a setting's name and what comes before, underscores aside, is ``domainevents``
    in any case or one edit from it (``Domain_Events_``, ``domain_event_``, ``DOMAINEVENTS_``,
    ``domain_evnets_``). A key that merely ends like a setting (``task_default_exchange``,
    ``MAIN_EVENTS_EXCHANGE``, ``MY_DOMAIN_EVENTS_SERVICE``) is not.
    """
    lower = key.lower().replace("-", "_")
    if namespace:
        lower = lower.removeprefix(namespace.lower() + "_")
    for field in _FIELDS_LONGEST_FIRST:
        if lower.endswith(field) and len(lower) > len(field):
            head = lower[: -len(field)]
            if head.endswith("_") and _one_edit(head.replace("_", ""), _SQUEEZED):
                return PREFIX + field
    return None


def _one_edit(a: str, b: str) -> bool:
    """Whether ``a`` is ``b`` or one edit from it (insert, delete, substitute, swap two)."""
    if a == b:
        return True
    if abs(len(a) - len(b)) > 1:
        return False
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    if len(a) == len(b):
        return a[i + 1 :] == b[i + 1 :] or (
            a[i : i + 2] == b[i : i + 2][::-1] and a[i + 2 :] == b[i + 2 :]
        )
    longer, shorter = (a, b) if len(a) > len(b) else (b, a)
    return longer[i + 1 :] == shorter[i:]


def setting_name(key: str, namespace: str | None = None) -> str | None:
    """Return the setting ``key`` names, in any form it may take; None if it names none.

    ``domain_events_x``, ``DOMAIN_EVENTS_X`` and, with ``namespace`` "CELERY",
    ``CELERY_DOMAIN_EVENTS_X`` all name ``x``.
    """
    if key.startswith(PREFIX):
        return key[len(PREFIX) :]
    if namespace:
        ns = namespace.upper() + "_"
        if key.startswith(ns + _UPPER):
            key = key[len(ns) :]
    if key.startswith(_UPPER) and key == key.upper():
        return key[len(_UPPER) :].lower()
    return None


# Longest first, so that a setting whose name ended another's (none does today) would be
# matched by the longer name.
_FIELDS_LONGEST_FIRST = sorted(Settings.model_fields, key=len, reverse=True)
