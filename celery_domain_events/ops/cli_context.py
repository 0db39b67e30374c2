"""What every ``domain-events`` command shares: the app, a broker connection, the exit codes."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click
from celery import Celery
from kombu import Connection

from celery_domain_events.amqp.confirm import connect
from celery_domain_events.exceptions import DomainEventsError
from celery_domain_events.extension import DomainEvents
from celery_domain_events.urls import redact

if TYPE_CHECKING:
    from sqlalchemy import Engine

__all__ = [
    "EXIT_BROKER",
    "EXIT_FOUND_DIFFERENCE",
    "EXIT_MANAGEMENT",
    "EXIT_OVER_LIMIT",
    "EXIT_USAGE",
    "BrokerUnreachable",
    "ManagementUnavailable",
    "UnreadableInput",
    "broker_connection",
    "database",
    "extension_of",
    "safe_url",
]


def extension_of(ctx: click.Context) -> DomainEvents:
    """Return the ``DomainEvents`` of the app ``celery -A`` named, its handlers imported.

    Raises:
        click.UsageError: the app has no ``DomainEvents``.
        InvalidSettings: its settings are invalid.
    """
    app: Celery = ctx.obj.app
    # Handlers register when their modules are imported, as the worker does on start.
    app.loader.import_default_modules()
    try:
        ext = DomainEvents.of(app)
    except DomainEventsError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        ext.settings  # noqa: B018 (read now: an invalid setting is one line, exit 2)
    except DomainEventsError as exc:
        raise InvalidSettings(str(exc)) from None
    return ext


#: Exit codes (documented in docs/operations/failures.md): 0 done, 1 a difference, nothing found
#: or a DLQ over its limit, 2 a usage error (click) or an unreadable input file, 3 the broker
#: cannot be reached or refused us, 4 the management API.
EXIT_FOUND_DIFFERENCE = 1
#: ``dlq check``: a dead-letter queue holds more than ``--max`` (the code of a finding).
EXIT_OVER_LIMIT = EXIT_FOUND_DIFFERENCE
EXIT_USAGE = 2
EXIT_BROKER = 3
EXIT_MANAGEMENT = 4


class BrokerUnreachable(click.ClickException):
    """The broker could not be reached within the publish deadline, or refused the login."""

    exit_code = EXIT_BROKER


class InvalidSettings(click.ClickException):
    """The app's domain-events settings are invalid (the message says which and why)."""

    exit_code = EXIT_USAGE


class UnreadableInput(click.ClickException):
    """An input file (a catalogue) cannot be read: missing, not JSON, or not a catalogue."""

    exit_code = EXIT_USAGE


class ManagementUnavailable(click.ClickException):
    """The RabbitMQ management API could not be read."""

    exit_code = EXIT_MANAGEMENT


@contextmanager
def broker_connection(ext: DomainEvents) -> Iterator[Connection]:
    """A connection to the app's broker within ``domain_events_publish_timeout``.

    Raises:
        BrokerUnreachable: not reached by the deadline, or the login was refused.
    """
    conn = ext.app.connection_for_write()
    deadline = time.monotonic() + ext.settings.publish_timeout
    try:
        connect(conn, deadline, level=logging.DEBUG)  # the one-line error below says it all
    except Exception as exc:
        conn.release()
        cause = exc.__cause__ or exc
        raise BrokerUnreachable(
            f"cannot reach the broker at {redact(ext.app.conf.broker_url)} within "
            f"{ext.settings.publish_timeout:g} s: {cause}".splitlines()[0]
        ) from None
    try:
        yield conn
    finally:
        conn.release()


@contextmanager
def database(db_url: str, what: str) -> Iterator[Engine]:
    """A SQLAlchemy engine for ``--db-url``, disposed afterwards (the outbox and inbox commands).

    SQLAlchemy is imported here, so the ``domain-events`` command works without it.

    Raises:
        click.ClickException: SQLAlchemy is not installed, or the database failed (one line,
            the URL without its password).
        click.BadParameter: the URL is not one SQLAlchemy can use.
    """
    try:
        from sqlalchemy import create_engine  # noqa: PLC0415 (optional dependency)
        from sqlalchemy.exc import ArgumentError, DBAPIError  # noqa: PLC0415
    except ImportError as exc:
        raise click.ClickException(
            f"the {what} needs SQLAlchemy ({exc}): pip install 'celery-domain-events[sqlalchemy]'"
        ) from exc
    try:
        engine = create_engine(db_url)
    except (ArgumentError, ImportError) as exc:
        raise click.BadParameter(str(exc), param_hint="--db-url") from exc
    try:
        yield engine
    except DBAPIError as exc:
        raise click.ClickException(f"database error at {safe_url(engine)}: {exc.orig}") from exc
    finally:
        engine.dispose()


def safe_url(engine: Engine) -> str:
    """The engine's URL without its password."""
    return engine.url.render_as_string(hide_password=True)
