"""Django integration: publish domain events when the database transaction commits.

::

    from celery_domain_events.contrib.django import emit_on_commit

    with transaction.atomic():
        user = User.objects.create(email=email)
        emit_on_commit(UserCreated(user_id=user.pk, email=email))
    # published here, after COMMIT, as one batch; nothing is published on rollback

    # settings.py: plain emit() in a view is transmitted once the view has returned
    MIDDLEWARE = [..., "celery_domain_events.contrib.django.DomainEventsMiddleware"]
    DOMAIN_EVENTS_CELERY_APP = "proj.celery.app"  # optional; default: celery.current_app
    INSTALLED_APPS = [..., "celery_domain_events.contrib.django"]  # the outbox (optional)

A publish that fails after ``COMMIT`` never fails the request by default (``robust=True``, as
Django's own ``on_commit(robust=True)``): the unconfirmed events are written to the outbox
when the app is installed, for its relay to publish, and logged at ERROR in full otherwise;
later ``on_commit`` callbacks run either way.

Install with the ``django`` extra (Django >= 4.2). This package is imported by path, never
re-exported, so the library does not depend on Django.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from celery import Celery
from django.apps import apps as django_apps  # not .apps, our AppConfig module
from django.db import DatabaseError, transaction

from celery_domain_events import _compat
from celery_domain_events.contrib.django.celery_app import resolve_app
from celery_domain_events.events import AnyEvent
from celery_domain_events.exceptions import PublishError
from celery_domain_events.extension import DomainEvents
from celery_domain_events.publishing import api as publisher
from celery_domain_events.publishing import send

__all__ = ["DomainEventsMiddleware", "emit_on_commit", "flush_pending_on_commit", "resolve_app"]

log = logging.getLogger(__name__)

#: Set on a request whose view raised (by ``DomainEventsMiddleware.process_exception``).
_VIEW_FAILED = "_domain_events_view_failed"


def emit_on_commit(
    event: AnyEvent | str,
    data: Mapping[str, Any] | None = None,
    *,
    version: int = 1,
    using: str | None = None,
    app: Celery | None = None,
    robust: bool = True,
) -> AnyEvent:
    """Publish an event when the current transaction of database ``using`` commits.

    Every event emitted in one outermost transaction goes out as one batch (one channel,
    batched publisher confirms), in emit order, after ``COMMIT``. An event is dropped if the
    transaction rolls back, or the savepoint (nested ``atomic()``) it was emitted in does.
    Outside an atomic block (autocommit) it is published at once, as
    ``transaction.on_commit`` would run it.

    Args:
        event: a :class:`DomainEvent` instance, or an event name for an untyped event.
        data: the payload of an untyped event.
        version: the version of an untyped event.
        using: the database alias (default: ``"default"``).
        app: the Celery app to publish with (default: setting ``DOMAIN_EVENTS_CELERY_APP``,
            else ``celery.current_app``).
        robust: if the publish fails after ``COMMIT``, keep the event (in the outbox when
            ``celery_domain_events.contrib.django`` is installed, else in the ERROR log) and
            let the commit finish; with False, raise.

    Returns:
        The event (a ``GenericEvent`` for untyped ones).

    Raises:
        PublishError: only with ``robust=False``: the batch was not confirmed. Raised by the
            commit (out of the outermost ``atomic()`` block, or from this call in autocommit
            mode) after the data has been committed; the events are logged at ERROR in full.
        InvalidRoutingPattern: an untyped event name is not dotted words.
        ConfigurationError: the app has no ``DomainEvents``, a setting is misspelled or
            invalid, or the broker URL names no transport (raised here, before ``COMMIT``).
    """
    event = send.as_event(event, data, version=version)
    ext = DomainEvents.of(resolve_app(app))
    # Read now: a misspelled setting or broker URL fails inside the transaction, not after
    # its COMMIT (where it would fail a committed request and skip later callbacks).
    _ = ext.settings
    ext.check_broker()
    connection = transaction.get_connection(using)
    pending = _Pending(ext, event, robust, connection.alias)
    if not connection.in_atomic_block:
        # Runs at once in autocommit mode; raises as Django does under manual transactions.
        connection.on_commit(lambda: _publish([pending]))
        return event
    batch = _current_batch(connection) or _Batch()
    batch.add(connection, pending)
    return event


class _Pending(NamedTuple):
    """One event waiting for its transaction's commit, and what to do if its publish fails."""

    ext: DomainEvents
    event: AnyEvent
    robust: bool
    using: str


class _Batch:
    """The events of one transaction on one connection, collected as its commit runs them.

    Per event, Django gets two commit callbacks:

    - a *mark*, registered with ``connection.on_commit``, so Django's own bookkeeping drops it
      when a savepoint that was active at emit time rolls back; when run, it adds the event to
      ``committed``;
    - a *flush*, registered outside every savepoint (Django cannot drop it), after the mark.

    Only the flush registered last publishes ``committed``: it runs after every mark that
    survived, so the whole transaction goes out in one batch.
    """

    def __init__(self) -> None:
        self.committed: list[_Pending] = []
        self.last_flush: _Flush | None = None

    def add(self, connection: Any, pending: _Pending) -> None:
        connection.on_commit(_Mark(self, pending))
        self.last_flush = _Flush(self)
        # No savepoint can drop the flush. Not robust for Django: our own policy decides
        # (see _publish), and with robust=False a PublishError leaves the atomic() block.
        _compat.django_append_on_commit(connection, self.last_flush, robust=False)

    def flush(self, caller: _Flush) -> None:
        if caller is not self.last_flush:
            return  # a later event registered a later flush
        committed, self.committed = self.committed, []
        _publish(committed)


class _Mark:
    """The mark callback of one event (a type of its own, to be found again)."""

    def __init__(self, batch: _Batch, pending: _Pending) -> None:
        self.batch = batch
        self.pending = pending

    def __call__(self) -> None:
        self.batch.committed.append(self.pending)


class _Flush:
    """One flush callback of a :class:`_Batch` (a type of its own, to be found again)."""

    def __init__(self, batch: _Batch) -> None:
        self.batch = batch

    def __call__(self) -> None:
        self.batch.flush(self)


def _current_batch(connection: Any) -> _Batch | None:
    # The batch lives in Django's callback list only: a commit runs it, a rollback or a closed
    # connection clears it, so no state outlives its transaction. Ours is usually the last entry.
    for func in reversed(_compat.django_on_commit_funcs(connection)):
        if isinstance(func, _Flush):
            return func.batch
    return None


def _publish(pending: list[_Pending]) -> None:
    """Publish ``pending`` with one confirmed batch per app, in order.

    A batch that fails keeps its robust events (outbox, else ERROR log) and raises for the
    others, after every batch was tried.

    Raises:
        PublishError: the first failure that concerned an event with ``robust=False``.
    """
    batches: dict[DomainEvents, list[_Pending]] = {}
    for item in pending:
        batches.setdefault(item.ext, []).append(item)
    failure: PublishError | None = None
    for ext, items in batches.items():
        try:
            send.publish_events(ext, [item.event for item in items])
        except PublishError as exc:
            lost = {id(event) for event in exc.events}
            unconfirmed = [item for item in items if id(item.event) in lost]
            robust = [item for item in unconfirmed if item.robust]
            if robust:
                _keep(ext, [item.event for item in robust], exc, robust[0].using)
            if failure is None and any(not item.robust for item in unconfirmed):
                send.log_unpublished(ext, exc, "A transaction committed")
                failure = exc
    if failure is not None:
        raise failure


def _keep(
    ext: DomainEvents,
    events: list[AnyEvent],
    exc: PublishError,
    using: str | None = None,
    what: str = "A transaction committed",
) -> None:
    """Keep events whose publish failed after COMMIT: in the outbox if installed, else the log."""
    if django_apps.is_installed(__name__):
        from celery_domain_events.contrib.django.outbox import store  # noqa: PLC0415 (models)

        try:
            store(ext, events, using=using)
        except DatabaseError as db_error:
            log.error("Could not keep %d event(s) in the outbox: %s", len(events), db_error)
        else:
            log.warning(
                "%s but %d event(s) could not be published (%s); kept in the outbox for its "
                "relay: %s",
                what,
                len(events),
                exc,
                ", ".join(str(e.event_id) for e in events),
            )
            return
    send.log_unpublished(ext, PublishError(str(exc), events), what)


def flush_pending_on_commit(using: str | None = None) -> int:
    """Publish now the events ``emit_on_commit`` is holding for the current transaction.

    For tests only: a Django ``TestCase`` runs each test in a transaction that never commits,
    so the events would never leave. This runs our own commit callbacks as a commit would (the
    others are left alone) and removes them. Events of rolled-back savepoints are already gone.

    Returns:
        How many callbacks ran.
    """
    connection = transaction.get_connection(using)
    ours = [
        func
        for func in _compat.django_on_commit_funcs(connection)
        if isinstance(func, _Mark | _Flush)
    ]
    _compat.django_remove_on_commit(connection, ours)
    for func in ours:
        func()
    return len(ours)


class DomainEventsMiddleware:
    """Give each request its own event buffer; transmit it if the view returned a response.

    Events buffered with plain :func:`~celery_domain_events.emit` during the request are
    transmitted after the view has returned a response (any status), and discarded if the view
    raised. The previous buffer is restored afterwards.

    With ``ATOMIC_REQUESTS``, the view's transaction has committed before the middleware
    transmits. Without it, the view's own writes may still roll back after ``emit()``: use
    :func:`emit_on_commit` inside your ``atomic()`` blocks instead.

    Put it after any middleware whose ``process_exception`` turns an exception into a response:
    Django calls ``process_exception`` bottom-up and stops at the first response, and a view
    failure this middleware does not see is transmitted. A publish that fails (after the
    transaction committed) does not fail the request: as with ``emit_on_commit``, the
    unconfirmed events go to the outbox when the app is installed, else to the ERROR log in
    full. Sync only: under ASGI, Django runs it in a thread.

    The app is the one named by setting ``DOMAIN_EVENTS_CELERY_APP`` (a dotted path), else
    ``celery.current_app``.
    """

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        """Run the rest of the chain and the view in a buffer of their own."""
        token = publisher.open_buffer()
        try:
            response = self.get_response(request)
            if getattr(request, _VIEW_FAILED, False):
                # A flag, not discard() in process_exception: under ASGI that may run in
                # another thread and context, whose buffer is not this one.
                dropped = publisher.discard()
                if dropped:
                    log.info("View raised: discarded %d event(s)", len(dropped))
            else:
                self._transmit()
            return response
        finally:
            publisher.close_buffer(token)

    def process_exception(self, request: Any, exception: Exception) -> None:
        """Mark the request's events for discarding; Django goes on handling the exception."""
        setattr(request, _VIEW_FAILED, True)

    def _transmit(self) -> None:
        app = resolve_app(None)
        try:
            publisher.transmit(app)
        except PublishError as exc:
            publisher.discard()  # exactly exc.events: kept below
            _keep(DomainEvents.of(app), list(exc.events), exc, what="A request succeeded")
