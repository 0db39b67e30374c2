"""Per-handler retry policy, expressed as Celery's own autoretry options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .exceptions import NON_RETRYABLE, ConfigurationError

__all__ = ["RetryPolicy"]


@dataclass(frozen=True)
class RetryPolicy:
    """When and how often a failing handler is retried before its event is dead-lettered.

    The fields map one to one onto Celery's task options (``max_retries``, ``autoretry_for``,
    ``dont_autoretry_for``, ``retry_backoff``, ``retry_backoff_max``, ``retry_jitter``). A retry
    re-runs only the failing handler; the other handlers of the same event are not touched.

    ============================  =================================================
    ``RetryPolicy()``             3 retries on any Exception, 1 s, 2 s, 4 s (jittered)
    ``RetryPolicy(max_retries=0)``  no retries: the first failure is dead-lettered
    ``RetryPolicy(backoff=False, countdown=10)``  fixed 10 s between attempts
    ============================  =================================================

    Attributes:
        max_retries: retries after the first attempt; a handler runs at most
            ``max_retries + 1`` times.
        autoretry_for: exceptions that trigger a retry.
        dont_retry_for: exceptions that never do (``EventDecodeError`` and ``RejectEvent``
            are always added).
        backoff: exponential backoff factor in seconds (``True`` means 1); False disables it.
        backoff_max: cap of the backoff delay, in seconds.
        jitter: randomize each backoff delay between 0 and its value.
        countdown: fixed delay in seconds when ``backoff`` is False.
    """

    max_retries: int = 3
    autoretry_for: tuple[type[BaseException], ...] = (Exception,)
    dont_retry_for: tuple[type[BaseException], ...] = ()
    backoff: bool | float = True
    backoff_max: int = 600
    jitter: bool = True
    countdown: float = 0.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ConfigurationError("RetryPolicy.max_retries must be >= 0")
        if self.backoff_max < 0 or self.countdown < 0:
            raise ConfigurationError("RetryPolicy delays must be >= 0")
        if self.countdown and self.backoff:
            raise ConfigurationError(
                f"RetryPolicy(countdown={self.countdown:g}) is a fixed delay, which needs "
                f"backoff=False: write RetryPolicy(backoff=False, countdown={self.countdown:g})"
            )

    @property
    def max_delay(self) -> float:
        """The longest delay this policy puts before a retry, in seconds."""
        if not self.max_retries:
            return 0.0
        return float(self.backoff_max) if self.backoff else float(self.countdown)

    def task_options(self) -> dict[str, Any]:
        """Return the Celery task options implementing this policy."""
        options: dict[str, Any] = {
            "max_retries": self.max_retries,
            "autoretry_for": self.autoretry_for if self.max_retries else (),
            "dont_autoretry_for": tuple(NON_RETRYABLE) + tuple(self.dont_retry_for),
            "retry_backoff": self.backoff,
            "retry_backoff_max": self.backoff_max,
            "retry_jitter": self.jitter,
        }
        if not self.backoff:
            options["retry_kwargs"] = {"countdown": self.countdown}
        return options
