"""How a batch handler gathers its events (``@domain_event_handler(..., batch=Batch(...))``).

A batch handler takes a list of events and runs as **one Celery task per batch**: the worker
collects deliveries from the handler's queue until ``max_size`` are waiting or the first of
them has waited ``max_wait`` seconds, then hands the whole list to the pool. Outcomes stay per
event: a handler that raises :class:`~.exceptions.BatchItemsFailed` names the events that
failed, which are retried alone (to the handler's own queue, under its
:class:`~.retry.RetryPolicy`) or dead-lettered alone; the others are done. Any other exception
fails every event of the batch the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from .exceptions import ConfigurationError

__all__ = ["MAX_BATCH_SIZE", "MAX_BATCH_WAIT", "Batch"]

#: Largest ``max_size``: every event of a batch is unacked until the batch ends, and the worker
#: raises its prefetch by twice the size.
MAX_BATCH_SIZE = 10_000
#: Longest ``max_wait`` in seconds: a batch must end well within RabbitMQ's ``consumer_timeout``
#: (30 minutes by default), which counts from the delivery of its first event.
MAX_BATCH_WAIT = 300.0


@dataclass(frozen=True)
class Batch:
    """Gather at most ``max_size`` events, waiting at most ``max_wait`` seconds for them.

    Attributes:
        max_size: the most events one run of the handler receives (1 to 10,000).
        max_wait: how long the first event of a batch may wait for others, in seconds
            (above 0, at most 300).
    """

    max_size: int = 100
    max_wait: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.max_size, bool) or not isinstance(self.max_size, int):
            raise ConfigurationError(f"Batch.max_size must be an int, got {self.max_size!r}")
        if not 1 <= self.max_size <= MAX_BATCH_SIZE:
            raise ConfigurationError(
                f"Batch.max_size must be between 1 and {MAX_BATCH_SIZE}, got {self.max_size}"
            )
        if not 0 < self.max_wait <= MAX_BATCH_WAIT:
            raise ConfigurationError(
                f"Batch.max_wait must be above 0 and at most {MAX_BATCH_WAIT:g} s (a batch "
                f"must end well within RabbitMQ's consumer_timeout), got {self.max_wait!r}"
            )

    @classmethod
    def of(cls, value: Batch | int) -> Batch:
        """Return ``value`` as a :class:`Batch` (an int is the ``max_size``).

        Raises:
            ConfigurationError: ``value`` is neither, or out of range.
        """
        if isinstance(value, Batch):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(max_size=value)
        raise ConfigurationError(f"batch= takes a Batch(...) or a max size (int), got {value!r}")
