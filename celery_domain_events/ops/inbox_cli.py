"""``celery -A proj domain-events inbox purge``: forget the events handled long ago.

::

    celery -A proj domain-events inbox purge --db-url postgresql+psycopg://... [--older-than S]

``--db-url`` defaults to ``$DOMAIN_EVENTS_INBOX_URL``; ``--older-than`` to the setting
``domain_events_inbox_retention`` (7 days). It deletes the rows of ``SqlAlchemyInbox`` and
``DjangoInbox`` tables alike (by ``handled_at``). SQLAlchemy is imported only when it runs.
"""

from __future__ import annotations

from datetime import timedelta

import click

from .cli_context import database, extension_of

__all__ = ["inbox"]


@click.group()
def inbox() -> None:
    """The inbox of idempotent handlers: purge what it remembers."""


@inbox.command()
@click.option(
    "--db-url",
    envvar="DOMAIN_EVENTS_INBOX_URL",
    required=True,
    help="SQLAlchemy URL of the database with the inbox (default: $DOMAIN_EVENTS_INBOX_URL).",
)
@click.option("--table", default="domain_events_inbox", show_default=True, help="The inbox table.")
@click.option(
    "--older-than",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds (default: setting domain_events_inbox_retention).",
)
@click.pass_context
def purge(ctx: click.Context, *, db_url: str, table: str, older_than: float | None) -> None:
    """Delete the inbox rows of events handled more than --older-than seconds ago."""
    if older_than is None:
        older_than = float(extension_of(ctx).settings.inbox_retention)
    with database(db_url, "inbox") as engine:
        from sqlalchemy.orm import sessionmaker  # noqa: PLC0415 (optional dependency)

        from celery_domain_events.contrib.inbox import SqlAlchemyInbox  # noqa: PLC0415

        box = SqlAlchemyInbox(sessionmaker(engine), table_name=table)
        deleted = box.purge(engine, timedelta(seconds=older_than))
    click.echo(f"{deleted} inbox row(s) older than {older_than:g} s deleted from {table!r}")
