"""Events emitted inside a Celery task go out when the task succeeds, and never otherwise.

With ``domain_events_task_scope`` (on by default), the first ``emit()`` inside a run of a plain
Celery task opens that run's own buffer; Celery's ``task_postrun`` signal then transmits it on
``SUCCESS`` and discards it on failure, retry or revocation. A task that emits need not call
``transmit()`` itself, and a buffer left open around the task (by an outer ``scope()``, or
leaked in the worker's context) never collects its events. A ``scope()`` opened inside the task
is its own unit of work, as anywhere else.

The buffer opens on the first emit rather than in ``task_prerun``: a signal receiver costs
every task of the process a dispatch, and most tasks never emit (handler tasks never need it,
they scope their events themselves). ``task_postrun`` is connected the first time a task
buffer opens in a process.

Handler tasks do the same inside the task body instead (``DomainEventTask.deliver``), so that a
failed transmit makes the attempt fail and be retried. For other tasks the task has already
succeeded when ``task_postrun`` runs: a transmit that fails by ``domain_events_publish_timeout``
is logged at ERROR with every unsent event in full, so the events can be recovered.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from typing import Any

from celery import Task, states
from celery.signals import task_postrun

from celery_domain_events import _compat
from celery_domain_events.exceptions import ConfigurationError, PublishError
from celery_domain_events.extension import DomainEvents

from . import buffer
from .send import log_unpublished, publish_events

__all__ = ["OWN_SCOPE_ATTRIBUTE", "current_run", "track"]

log = logging.getLogger(__name__)

#: Set on task classes whose runs scope their own events (handler tasks): see ``current_run``.
OWN_SCOPE_ATTRIBUTE = "domain_events_own_scope"
_tokens: dict[int, tuple[Any, contextvars.Token[Any]]] = {}
_lock = threading.Lock()
_connected = False


def current_run() -> Any | None:
    """Return the request of the task run whose events are task-scoped here, if any.

    That is a run by Celery's tracer (a worker, or ``apply()``) of a task that is not a
    handler, in an app whose ``DomainEvents`` has ``task_scope`` on. ``None`` otherwise.
    """
    task: Task[Any, Any] | None = _compat.current_traced_task()
    if task is None or getattr(task, OWN_SCOPE_ATTRIBUTE, False):
        return None
    request = task.request
    if request.called_directly or not request.id:
        return None
    try:
        return request if DomainEvents.of(task.app).settings.task_scope else None
    except ConfigurationError:
        return None


def track(request: Any, token: contextvars.Token[Any]) -> None:
    """Have ``task_postrun`` of run ``request`` close the buffer that ``token`` opened.

    Only the run's first token is kept: resetting it restores the context as it was before the
    run, whatever the run set since (a ``discard()``, say, then more emits).
    """
    _connect()
    with _lock:
        # Keyed by the request object, alive until its task_postrun (an eager retry nests a
        # second run of the same task id inside the first).
        _tokens.setdefault(id(request), (request, token))


def _on_postrun(
    task_id: str | None = None,
    task: Task[Any, Any] | None = None,
    state: str | None = None,
    **_: Any,
) -> None:
    if task is None:
        return
    request = task.request  # still the run's: Celery sends task_postrun before popping it
    with _lock:
        entry = _tokens.pop(id(request), None)
    if entry is None:
        return
    _, token = entry
    try:
        if state == states.SUCCESS:
            ext = DomainEvents.of(task.app)
            buffer.flush(lambda batch: publish_events(ext, batch))
        else:
            dropped = buffer.discard()
            if dropped:
                log.info(
                    "Task %s[%s] ended in %s: discarded %d event(s)",
                    task.name,
                    task_id,
                    state,
                    len(dropped),
                )
    except PublishError as exc:
        what = f"Task {task.name}[{task_id}] succeeded"
        log_unpublished(DomainEvents.of(task.app), exc, what)
    finally:
        buffer.close_buffer(token)


def _connect() -> None:
    global _connected  # noqa: PLW0603 (a process-wide, idempotent switch)
    if _connected:
        return
    with _lock:
        task_postrun.connect(_on_postrun, weak=False, dispatch_uid="celery_domain_events.postrun")
        _connected = True
