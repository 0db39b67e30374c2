"""``celery -A proj domain-events outbox ...``: create the outbox table and run the relay.

::

    celery -A proj domain-events outbox create-table --db-url postgresql+psycopg://...
    celery -A proj domain-events outbox relay --db-url postgresql+psycopg://... [--once]

``--db-url`` defaults to ``$DOMAIN_EVENTS_OUTBOX_URL``. SQLAlchemy is imported only when a
command runs, so the ``domain-events`` command works without it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

from celery_domain_events.exceptions import PublishError
from celery_domain_events.extension import DomainEvents

from .cli_context import database, extension_of, safe_url

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from celery_domain_events.contrib.outbox import Outbox

__all__ = ["outbox"]

db_url_option = click.option(
    "--db-url",
    envvar="DOMAIN_EVENTS_OUTBOX_URL",
    required=True,
    help="SQLAlchemy URL of the database with the outbox (default: $DOMAIN_EVENTS_OUTBOX_URL).",
)
table_option = click.option(
    "--table", default="domain_events_outbox", show_default=True, help="The outbox table."
)


def _ext(ctx: click.Context) -> DomainEvents:
    return extension_of(ctx)


@contextmanager
def _outbox(ctx: click.Context, db_url: str, table: str) -> Iterator[tuple[Outbox, Engine]]:
    with database(db_url, "outbox") as engine:
        from celery_domain_events.contrib.outbox import Outbox  # noqa: PLC0415 (sqlalchemy)

        yield Outbox(_ext(ctx), table_name=table), engine


@click.group()
def outbox() -> None:
    """The transactional outbox: create its table, relay it to RabbitMQ."""


@outbox.command("create-table")
@db_url_option
@table_option
@click.pass_context
def create_table(ctx: click.Context, db_url: str, table: str) -> None:
    """Create the outbox table (and its index) unless it exists."""
    with _outbox(ctx, db_url, table) as (box, engine):
        box.table.create(engine, checkfirst=True)
        click.echo(f"outbox table {box.table.name!r} is ready at {safe_url(engine)}")


@outbox.command()
@db_url_option
@table_option
@click.option("--once", is_flag=True, help="Relay one batch and exit.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Seconds to wait whenever the outbox is empty.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Rows per batch (one database transaction each).",
)
@click.pass_context
def relay(
    ctx: click.Context, *, db_url: str, table: str, once: bool, interval: float, limit: int
) -> None:
    """Publish the outbox's events to RabbitMQ until SIGINT or SIGTERM (or once)."""
    with _outbox(ctx, db_url, table) as (box, engine):
        if once:
            try:
                count = box.relay_once(engine, limit)
            except PublishError as exc:
                raise click.ClickException(str(exc)) from exc
            click.echo(f"{count} event(s) relayed")
            return
        stop = threading.Event()
        _on_signals(stop.set)
        click.echo(f"relaying {box.table.name!r} at {safe_url(engine)}; stop with Ctrl-C")
        total = box.relay_forever(
            engine,
            interval=interval,
            limit=limit,
            stop=stop,
            on_batch=lambda n: click.echo(f"{n} event(s) relayed"),
        )
        click.echo(f"stopped: {total} event(s) relayed")


def _on_signals(handler: Callable[[], Any]) -> None:
    # Finish the current batch, then return: a batch is one transaction either way, but a
    # clean stop avoids republishing it.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: handler())
