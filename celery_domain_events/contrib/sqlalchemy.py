"""Publish domain events when a SQLAlchemy session commits; drop them when it rolls back.

::

    from celery_domain_events.contrib import sqlalchemy as events_sa

    Session = sessionmaker(engine)
    events_sa.install(Session, app)  # once, where the sessionmaker is made

    with Session.begin() as session:
        session.add(User(id=1, email="ada@example.com"))
        events_sa.emit_with(session, UserCreated(user_id=1, email="ada@example.com"))
        with session.begin_nested():  # a SAVEPOINT: rolled back, it drops its own events
            events_sa.emit_with(session, "user.audited", {"user_id": 1})
    # committed: both events are published now, as one batch with publisher confirms

An event belongs to the transaction that is current when it is emitted (the innermost
SAVEPOINT, else the session's transaction, which ``emit_with`` begins if needed, as a query
would). A rolled-back transaction or SAVEPOINT drops its events; a released SAVEPOINT hands them
to the enclosing transaction; the outermost commit publishes them all, in emit order, once the
database has committed.

If the broker cannot confirm them, ``session.commit()`` raises
:class:`~celery_domain_events.exceptions.PublishError` *after* the commit, with the events in
``error.events``. Where no event may be lost in that window, write events to the transactional
outbox instead (:mod:`celery_domain_events.contrib.outbox`).

A session joined to an external connection's transaction (``join_transaction_mode``) publishes
when the *session* commits, which is not yet the database commit.

``AsyncSession`` works the same way, without blocking the event loop::

    Session = async_sessionmaker(engine)
    events_sa.install(Session, app)

    async with Session.begin() as session:
        session.add(User(id=1, email="ada@example.com"))
        events_sa.emit_with(session, UserCreated(user_id=1, email="ada@example.com"))
    # committed: published with transmit_async's path (aio-pika), awaited by the commit
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from celery import current_app as _current_app
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session, SessionTransaction, scoped_session, sessionmaker

from celery_domain_events import _compat
from celery_domain_events.events import AnyEvent
from celery_domain_events.exceptions import ConfigurationError
from celery_domain_events.extension import DomainEvents
from celery_domain_events.publishing import send

try:  # the asyncio extension needs greenlet; without it there are no async sessions to serve
    from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session, async_sessionmaker
except ImportError:  # pragma: no cover - depends on the environment
    AsyncSession = async_sessionmaker = async_scoped_session = None  # type: ignore[assignment,misc]

__all__ = ["emit_with", "install"]

log = logging.getLogger(__name__)

#: ``session.info`` key of the events pending per transaction.
INFO_KEY = "celery_domain_events.pending"
#: ``session.info`` key set on the sessions of an ``AsyncSession``: publish with asyncio.
ASYNC_KEY = "celery_domain_events.async"
#: ``session.info`` key of the installation an ``async_sessionmaker`` passes to its sessions.
INSTALLED_KEY = "celery_domain_events.installed"


@dataclass
class _Pending:
    """The events of one transaction (root or SAVEPOINT) and whether it committed."""

    events: list[AnyEvent] = field(default_factory=list)
    committed: bool = False


@dataclass(frozen=True)
class _Installation:
    app: Celery | None


# Session instances and Session classes (a sessionmaker's own subclass) install() was given.
_installed: weakref.WeakKeyDictionary[Any, _Installation] = weakref.WeakKeyDictionary()
# What our listeners are registered on.
_listening: weakref.WeakSet[Any] = weakref.WeakSet()


def install(target: Any, app: Celery | None = None) -> None:
    """Publish the events emitted with :func:`emit_with` when sessions of ``target`` commit.

    Installing twice on the same target only replaces ``app``.

    Args:
        target: a ``Session``, a ``sessionmaker`` (or ``scoped_session`` of one), or a
            ``Session`` subclass (``Session`` itself covers every session of the process);
            or their asyncio twins: an ``AsyncSession``, an ``async_sessionmaker`` (or
            ``async_scoped_session`` of one), an ``AsyncSession`` subclass.
        app: the Celery app with ``DomainEvents`` to publish through (default: the current app
            at commit time).

    Raises:
        TypeError: ``target`` is none of these.
    """
    installation = _Installation(app)
    if async_scoped_session is not None and isinstance(target, async_scoped_session):
        target = target.session_factory
    if async_sessionmaker is not None and isinstance(target, async_sessionmaker):
        # Its sessions are plain AsyncSessions: hand them the installation through their
        # info, and listen on the class of the sync sessions they wrap.
        info = dict(target.kw.get("info") or {})
        info[INSTALLED_KEY] = installation
        target.configure(info=info)
        _listen(target.kw.get("sync_session_class") or target.class_.sync_session_class)
        return
    if AsyncSession is not None and isinstance(target, AsyncSession):
        target = target.sync_session
    elif AsyncSession is not None and isinstance(target, type) and issubclass(target, AsyncSession):
        target = target.sync_session_class
    key = _listen_target(target)
    _listen(key)
    _installed[key] = installation


def _listen(key: Any) -> None:
    # Our own weak registry, not event.contains(): SQLAlchemy keys that on id(target), and a
    # new sessionmaker class can reuse the id of a collected one.
    if key not in _listening:
        sa_event.listen(key, "after_commit", _after_commit)
        sa_event.listen(key, "after_transaction_end", _after_transaction_end)
        _listening.add(key)


def emit_with(
    session: Session | Any,
    event: AnyEvent | str,
    data: Mapping[str, Any] | None = None,
    *,
    version: int = 1,
) -> AnyEvent:
    """Attach an event to ``session``'s current transaction, to be published on commit.

    Args:
        session: a session covered by :func:`install` (a ``Session`` or an ``AsyncSession``).
        event: a ``DomainEvent`` instance, or an event name for an untyped event.
        data: the payload of an untyped event.
        version: the version of an untyped event.

    Returns:
        The event (a ``GenericEvent`` for untyped ones).

    Raises:
        ConfigurationError: :func:`install` does not cover this session, so nothing would
            ever publish the event.
        InvalidRoutingPattern: an untyped event name is not dotted words.
        TypeError: ``data`` was given with a typed event.
    """
    if AsyncSession is not None and isinstance(session, AsyncSession):
        session = session.sync_session
        session.info[ASYNC_KEY] = True
    if _installation(session) is None:
        raise ConfigurationError(
            "this session has no domain events hooks; call "
            "celery_domain_events.contrib.sqlalchemy.install(...) on it or its sessionmaker"
        )
    event = send.as_event(event, data, version=version)
    transaction = session.get_nested_transaction() or session.get_transaction()
    if transaction is None:
        transaction = session.begin()
    _pending(session).setdefault(transaction, _Pending()).events.append(event)
    return event


def _listen_target(target: Any) -> Session | type[Session]:
    if isinstance(target, scoped_session):
        target = target.session_factory
    if isinstance(target, sessionmaker):
        # sessionmaker listens through a Session subclass of its own; so do we.
        target = target.class_
    if isinstance(target, Session) or (isinstance(target, type) and issubclass(target, Session)):
        return target
    raise TypeError(
        f"install() takes a Session, sessionmaker or Session class, not {type(target).__name__}"
    )


def _installation(session: Session) -> _Installation | None:
    # The instance first, then its async_sessionmaker's, then its classes from the most
    # derived: the closest install wins.
    if session in _installed:
        return _installed[session]
    from_maker = session.info.get(INSTALLED_KEY)
    if isinstance(from_maker, _Installation):
        return from_maker
    for key in type(session).__mro__:
        if key in _installed:
            return _installed[key]
    return None


def _pending(session: Session) -> dict[SessionTransaction, _Pending]:
    pending: dict[SessionTransaction, _Pending] = session.info.setdefault(INFO_KEY, {})
    return pending


def _after_commit(session: Session) -> None:
    # Fired for the outermost transaction and for each released SAVEPOINT, before SQLAlchemy
    # closes it: the committing transaction is still the session's innermost one here.
    transaction = session.get_nested_transaction() or session.get_transaction()
    pending = session.info.get(INFO_KEY, {}).get(transaction)
    if pending is not None:
        pending.committed = True


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    # Publishing here rather than in after_commit: the transaction is closed, so a
    # PublishError leaves the session usable instead of stuck in a committed transaction.
    state: dict[SessionTransaction, _Pending] = session.info.get(INFO_KEY, {})
    pending = state.pop(transaction, None)
    if pending is None:
        return
    if not pending.committed:
        log.debug("Dropped %d event(s) of a rolled-back transaction", len(pending.events))
        return
    parent = transaction.parent
    if parent is not None:
        # A released SAVEPOINT: its events now live or die with the enclosing transaction.
        while parent.parent is not None and not parent.nested:
            parent = parent.parent
        state.setdefault(parent, _Pending()).events.extend(pending.events)
        return
    installation = _installation(session)
    app = installation.app if installation is not None else None
    ext = DomainEvents.of(app or _current_app)
    if session.info.get(ASYNC_KEY):
        # Inside AsyncSession's greenlet: the commit's caller awaits the publish, and the
        # event loop runs other tasks meanwhile.
        _compat.sqlalchemy_await(send.publish_events_async(ext, pending.events))
    else:
        send.publish_events(ext, pending.events)
