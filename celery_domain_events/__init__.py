"""Typed domain events over a RabbitMQ topic exchange, each delivery handled as a Celery task."""

from .amqp.transport import Transport
from .batching import Batch
from .consuming.handlers import Handler, domain_event_handler
from .events import DomainEvent, GenericEvent
from .exceptions import (
    NON_RETRYABLE,
    BatchItemsFailed,
    ConfigurationError,
    DomainEventsError,
    EventDecodeError,
    EventDefinitionError,
    EventValidationError,
    InboxBusy,
    InvalidRoutingPattern,
    NoActiveScope,
    PublishError,
    RegistrationError,
    RejectEvent,
    UnknownEventError,
)
from .extension import DomainEvents
from .publishing.api import (
    buffered,
    discard,
    emit,
    scope,
    scope_async,
    transmit,
    transmit_async,
)
from .retry import RetryPolicy
from .upcasting import upcaster
from .wire.message import OutboundMessage

__version__ = "0.1.0"

__all__ = [
    "NON_RETRYABLE",
    "Batch",
    "BatchItemsFailed",
    "ConfigurationError",
    "DomainEvent",
    "DomainEvents",
    "DomainEventsError",
    "EventDecodeError",
    "EventDefinitionError",
    "EventValidationError",
    "GenericEvent",
    "Handler",
    "InboxBusy",
    "InvalidRoutingPattern",
    "NoActiveScope",
    "OutboundMessage",
    "PublishError",
    "RegistrationError",
    "RejectEvent",
    "RetryPolicy",
    "Transport",
    "UnknownEventError",
    "__version__",
    "buffered",
    "discard",
    "domain_event_handler",
    "emit",
    "scope",
    "scope_async",
    "transmit",
    "transmit_async",
    "upcaster",
]
