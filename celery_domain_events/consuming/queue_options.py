"""A worker's ``-Q`` and ``-X`` naming handler queues: which handlers the worker runs.

Celery applies ``-Q``/``-X`` to its own task queues before any worker step exists, and would
consume a handler queue named there as a task queue: declared without its dead-letter
arguments, which RabbitMQ refuses, so the worker stopped. Here, instead:

* ``-Q`` naming handler queues: the worker runs only those handlers (and the Celery task queues
  ``-Q`` also names); a ``-Q`` naming none leaves every handler running;
* ``-X`` naming handler queues: the worker runs every handler but those.

:func:`_record_options` (Celery's ``celeryd_init`` signal, sent before Celery reads the
options) keeps Celery from refusing the names; :func:`select_handlers`, called by the worker
step, applies them. Imported with :mod:`.handlers`, so that the signal is connected in every
process that declares handlers, before its worker is built.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from celery import Celery
from celery.signals import celeryd_init
from kombu import Queue

from celery_domain_events.exceptions import ConfigurationError
from celery_domain_events.extension import DomainEvents

__all__ = ["select_handlers"]

log = logging.getLogger(__name__)

# Handlers -X named, per app: Celery drops names it does not know (or refuses them).
_excluded: weakref.WeakKeyDictionary[Celery, set[str]] = weakref.WeakKeyDictionary()


def _by_queue(ext: DomainEvents) -> dict[str, str]:
    return {ext.topology.handler_queue_name(spec): spec.name for spec in ext.handlers}


@celeryd_init.connect(weak=False)
def _record_options(instance: Any = None, options: Any = None, **_: Any) -> None:
    app = getattr(instance, "app", None)
    if app is None or not isinstance(options, dict):
        return
    try:
        by_queue = _by_queue(DomainEvents.of(app))
    except ConfigurationError:
        return  # no DomainEvents, or invalid settings: the worker step says so
    for name in _names(options.get("queues")):
        if name in by_queue and name not in app.amqp.queues:
            # With task_create_missing_queues off Celery refuses a name it does not know; the
            # worker step takes this placeholder out again before anything is declared.
            app.amqp.queues.add(Queue(name))
    excluded = options.get("exclude_queues")
    handlers = {by_queue[name] for name in _names(excluded) if name in by_queue}
    if handlers:
        _excluded[app] = handlers
        if isinstance(excluded, list):  # Celery's own list, read after this signal
            excluded[:] = [name for name in excluded if name not in by_queue]


def _names(value: Any) -> list[str]:
    if isinstance(value, str):
        return [name.strip() for name in value.split(",") if name.strip()]
    return [str(name) for name in value or ()]


def select_handlers(ext: DomainEvents) -> None:
    """Apply ``-Q`` and ``-X`` to the handlers this worker runs (see the module docstring)."""
    queues = ext.app.amqp.queues
    by_queue = _by_queue(ext)
    named = [name for name in list(queues.consume_from) if name in by_queue]
    excluded = _excluded.get(ext.app, set())
    if not named and not excluded:
        return
    if named:
        queues.deselect(named)
        for name in named:
            queues.pop(name, None)  # never declared by Celery (nor an exchange named after it)
    chosen = [by_queue[name] for name in named] if named else list(by_queue.values())
    ext._consume_only(name for name in chosen if name not in excluded)
    log.info(
        "Domain events: -Q/-X select handler queues: this worker runs %s",
        ", ".join(sorted(set(chosen) - excluded)) or "no handler",
    )
