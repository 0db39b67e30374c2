"""Events emitted inside a Celery task go out when the task succeeds, and never otherwise.

Connected by ``DomainEvents`` (``domain_events_task_scope``, on by default) to Celery's
``task_prerun``/``task_postrun`` signals: each task run gets its own buffer; on ``SUCCESS`` it
is transmitted, on failure, retry or revocation it is discarded. A task that emits need not
call ``transmit()`` itself.

Handler tasks do the same inside the task body instead (``DomainEventTask.deliver``), so that a
failed transmit makes the attempt fail and be retried. For other tasks the task has already
succeeded when ``task_postrun`` runs: a transmit that fails after its retry policy is logged at
ERROR with every unsent event in full, so the events can be recovered.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from typing import Any

from celery import Task, states
from celery.signals import task_postrun, task_prerun

from . import publisher
from .exceptions import ConfigurationError, PublishError

__all__ = ["connect"]

log = logging.getLogger(__name__)

_tokens: dict[str, contextvars.Token[Any]] = {}
_lock = threading.Lock()
_connected = False


def _enabled(task: Task[Any, Any] | None) -> bool:
    from .extension import DomainEvents  # noqa: PLC0415 (extension imports this module)
    from .task import DomainEventTask  # noqa: PLC0415

    if task is None or isinstance(task, DomainEventTask):
        return False
    try:
        return DomainEvents.of(task.app).settings.task_scope
    except ConfigurationError:
        return False


def _on_prerun(task_id: str | None = None, task: Task[Any, Any] | None = None, **_: Any) -> None:
    if task_id is None or not _enabled(task):
        return
    with _lock:
        _tokens[task_id] = publisher.open_buffer()


def _on_postrun(
    task_id: str | None = None,
    task: Task[Any, Any] | None = None,
    state: str | None = None,
    **_: Any,
) -> None:
    with _lock:
        token = _tokens.pop(task_id or "", None)
    if token is None or task is None:
        return
    try:
        if state == states.SUCCESS:
            publisher.transmit(task.app)
        else:
            dropped = publisher.discard()
            if dropped:
                log.info(
                    "Task %s[%s] ended in %s: discarded %d event(s)",
                    task.name,
                    task_id,
                    state,
                    len(dropped),
                )
    except PublishError as exc:
        from .extension import DomainEvents  # noqa: PLC0415

        what = f"Task {task.name}[{task_id}] succeeded"
        publisher.log_unpublished(DomainEvents.of(task.app), exc, what)
    finally:
        publisher.close_buffer(token)


def connect() -> None:
    """Connect the signal handlers (once per process; each task checks its own app)."""
    global _connected  # noqa: PLW0603 (a process-wide, idempotent switch)
    if _connected:
        return
    task_prerun.connect(_on_prerun, weak=False, dispatch_uid="celery_domain_events.prerun")
    task_postrun.connect(_on_postrun, weak=False, dispatch_uid="celery_domain_events.postrun")
    _connected = True
