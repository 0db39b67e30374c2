"""An outbound AMQP message: what the publisher, the worker and the CLI hand to the transport."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["OutboundMessage"]


@dataclass(slots=True)
class OutboundMessage:
    """One message to publish: body, destination and AMQP properties.

    Treat it as immutable. It is not ``frozen``: a frozen dataclass sets each field through
    ``object.__setattr__``, which doubled the cost of building one per event in transmit().
    """

    body: bytes
    exchange: str
    routing_key: str
    content_type: str
    content_encoding: str = "utf-8"
    properties: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, Any] = field(default_factory=dict)
    mandatory: bool = False
    #: Treat an unroutable return as a failure and retry after declaring again: a dead letter
    #: must not vanish because its queue was deleted under us.
    must_route: bool = False
    #: What the caller gets back in ``PublishError.events`` if this message is not confirmed.
    source: Any = None
