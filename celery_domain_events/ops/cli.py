"""``celery -A proj domain-events ...``: dead letters from the command line.

Installed as a ``celery.commands`` plugin, so ``-A`` resolves the app as for any celery command::

    celery -A proj domain-events dlq list [--messages]
    celery -A proj domain-events dlq check [--max N] [--json]
    celery -A proj domain-events dlq show EVENT_ID
    celery -A proj domain-events dlq replay --handler send_welcome_email [--event 'user.#']
    celery -A proj domain-events dlq purge --id EVENT_ID --yes
    celery -A proj domain-events topology show|declare|diff [--prune] [--apply]
    celery -A proj domain-events catalogue [--asyncapi 2.6.0|3.0.0] [-o catalogue.json]
    celery domain-events catalogue diff OLD.json NEW.json [--json]
    celery domain-events catalogue check --producer P.json --consumer C.json [--json]
    celery -A proj domain-events outbox create-table|relay --db-url URL
    celery -A proj domain-events inbox purge --db-url URL [--older-than SECONDS]

(Celery's own ``celery events`` command is the event monitor, so this one is ``domain-events``.)
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterator
from typing import Any

import click
from kombu import Connection
from kombu.common import ignore_errors

from celery_domain_events.amqp import queues
from celery_domain_events.amqp.queues import declare
from celery_domain_events.exceptions import CatalogueError, ConfigurationError
from celery_domain_events.extension import DomainEvents
from celery_domain_events.registry import HandlerSpec
from celery_domain_events.routing import matches, validate_pattern
from celery_domain_events.wire.dead_letter import HEADER_PREFIX, DeadLetter, FailureReason
from celery_domain_events.wire.topology import BindingDiff, diff_bindings

from . import catalogue, schema_diff
from .cli_context import (
    EXIT_FOUND_DIFFERENCE,
    EXIT_OVER_LIMIT,
    ManagementUnavailable,
    UnreadableInput,
    broker_connection,
    extension_of,
)
from .inbox_cli import inbox
from .outbox_cli import outbox
from .rabbitmq_api import ManagementClient
from .replay import replay as replay_letter

__all__ = ["domain_events"]


def _handlers(ext: DomainEvents, names: tuple[str, ...]) -> list[HandlerSpec]:
    """The handlers ``--handler`` names (default: all) with a DLQ: transient ones have none."""
    specs = ext.handlers
    if not names:
        return [s for s in specs if not s.transient]
    known = {s.name: s for s in specs}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise click.BadParameter(
            f"unknown handler(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}",
            param_hint="--handler",
        )
    transient = [n for n in names if known[n].transient]
    if transient:
        raise click.BadParameter(
            f"{', '.join(transient)}: transient, so no dead-letter queue (its final failures "
            "are logged by the worker)",
            param_hint="--handler",
        )
    return [known[n] for n in names]


def _nonempty_dlqs(ext: DomainEvents, conn: Connection, handlers: tuple[str, ...]) -> Iterator[str]:
    """Yield the dead-letter queues of the chosen handlers that hold messages."""
    for spec in _handlers(ext, handlers):
        queue = ext.topology.dead_letter_queue(spec).name
        if queues.depth(conn, queue):
            yield queue


def _selector(
    event: str | None, ids: tuple[str, ...], reason: str | None
) -> Callable[[DeadLetter], bool]:
    if event is not None:
        validate_pattern(event)

    def select(letter: DeadLetter) -> bool:
        return (
            (event is None or matches(event, letter.event_name))
            and (not ids or letter.event_id in ids)
            and (reason is None or letter.reason == reason)
        )

    return select


def _summary(letter: DeadLetter) -> dict[str, Any]:
    return {
        "queue": letter.queue,
        "event_id": letter.event_id,
        "event": letter.event_name,
        "reason": letter.reason,
        "attempts": letter.failure("attempts"),
        "exception": letter.failure("exception"),
        "message": letter.failure("message"),
        "time": letter.failure("time"),
        "replayed": letter.headers.get("x-replayed", 0),
        "copies": letter.copies,
    }


def _line(letter: DeadLetter) -> str:
    s = _summary(letter)
    copies = f"  copies={s['copies']}" if s["copies"] > 1 else ""
    return (
        f"  {s['event_id']}  {s['event']}  {s['reason']}  attempts={s['attempts']}{copies}  "
        f"{s['exception']}: {s['message']}"
    )


handler_option = click.option(
    "--handler", "handlers", multiple=True, help="Only this handler's DLQ (repeatable)."
)
filter_options = [
    handler_option,
    click.option("--event", help="Only events whose name matches this AMQP pattern."),
    click.option("--id", "ids", multiple=True, help="Only this event id (repeatable)."),
    click.option(
        "--reason",
        callback=lambda ctx, param, value: _reason(value),
        help="Only this reason: retries-exhausted, rejected, poison, or broker:<why> (a "
        "broker's dead letter, such as broker:delivery_limit).",
    ),
    click.option("--limit", type=click.IntRange(min=1), help="At most this many per queue."),
    click.option("--dry-run", is_flag=True, help="Show what would be done; change nothing."),
    click.option("--json", "as_json", is_flag=True, help="Print JSON."),
]


def _reason(value: str | None) -> str | None:
    # A reason no dead letter can have would match nothing and look like an empty DLQ.
    known = [reason.value for reason in FailureReason]
    if value is None or value in known or value.startswith("broker:"):
        return value
    close = difflib.get_close_matches(value.replace("_", "-"), known, n=1)
    raise click.BadParameter(
        f"{value!r} is no reason"
        + (f"; did you mean {close[0]!r}?" if close else "")
        + f" Reasons: {', '.join(known)}, or broker:<why> (broker:delivery_limit)",
        param_hint="--reason",
    )


def _with_filters(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(filter_options):
        fn = option(fn)
    return fn


@click.group(name="domain-events")
def domain_events() -> None:
    """Domain events: dead letters and the queue/binding topology."""


domain_events.add_command(outbox)
domain_events.add_command(inbox)


@domain_events.group()
def dlq() -> None:
    """Inspect, replay and purge dead-letter queues."""


@dlq.command("list")
@handler_option
@click.option("--messages", is_flag=True, help="List each dead letter too.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def list_(ctx: click.Context, handlers: tuple[str, ...], messages: bool, as_json: bool) -> None:
    """Show each handler's dead-letter queue and its depth."""
    ext = extension_of(ctx)
    rows = []
    with broker_connection(ext) as conn:
        for spec in _handlers(ext, handlers):
            queue = ext.topology.dead_letter_queue(spec).name
            count = queues.depth(conn, queue)
            letters = queues.process(conn, queue) if messages and count else []
            rows.append((spec.name, queue, count, letters))
    if as_json:
        click.echo(
            json.dumps(
                [
                    # "messages" only with --messages: an empty list read as an empty DLQ.
                    {"handler": h, "queue": q, "depth": c}
                    | ({"messages": [_summary(x) for x in ls]} if messages else {})
                    for h, q, c, ls in rows
                ],
                indent=2,
                default=str,
            )
        )
        return
    for handler, queue, count, letters in rows:
        shown = "not declared yet" if count is None else f"{count} message(s)"
        click.echo(f"{queue}  ({handler}): {shown}")
        for letter in letters:
            click.echo(_line(letter))


@dlq.command()
@handler_option
@click.option(
    "--max",
    "limit",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Messages a DLQ may hold before the check fails.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def check(ctx: click.Context, handlers: tuple[str, ...], limit: int, as_json: bool) -> None:
    """Exit 1 if a dead-letter queue holds more than --max messages (cron, Kubernetes).

    Prints one line per DLQ over the limit, and nothing when none is.
    """
    ext = extension_of(ctx)
    rows: list[dict[str, Any]] = []
    with broker_connection(ext) as conn:
        names = {
            spec.name: ext.topology.dead_letter_queue(spec).name
            for spec in _handlers(ext, handlers)
        }
        found = queues.depths(conn, list(names.values()))
    for handler, queue in names.items():
        rows.append({"handler": handler, "queue": queue, "depth": found[queue]})
    over = [row for row in rows if (row["depth"] or 0) > limit]
    if as_json:
        click.echo(json.dumps({"max": limit, "over": over, "queues": rows}, indent=2))
    else:
        for row in over:
            click.echo(
                f"{row['queue']}  ({row['handler']}): {row['depth']} message(s), over {limit}"
            )
    if over:
        ctx.exit(EXIT_OVER_LIMIT)


@dlq.command()
@click.argument("event_id")
@handler_option
@click.pass_context
def show(ctx: click.Context, event_id: str, handlers: tuple[str, ...]) -> None:
    """Print every dead letter of EVENT_ID: failure record, headers and body."""
    ext = extension_of(ctx)
    found = 0
    with broker_connection(ext) as conn:
        for queue in _nonempty_dlqs(ext, conn, handlers):
            for letter in queues.process(conn, queue, _selector(None, (event_id,), None)):
                found += 1
                click.echo(
                    json.dumps(
                        {
                            **_summary(letter),
                            "traceback": letter.failure("traceback"),
                            "properties": letter.properties,
                            "headers": {
                                k: v
                                for k, v in letter.headers.items()
                                if not str(k).startswith(HEADER_PREFIX)
                            },
                            "content_type": letter.content_type,
                            "body": letter.body.decode("utf-8", "replace"),
                        },
                        indent=2,
                        default=str,
                    )
                )
    if not found:
        raise click.ClickException(f"no dead letter with event id {event_id}")


def _run(
    ctx: click.Context,
    verbs: tuple[str, str],
    act: Callable[[DomainEvents, Connection, DeadLetter], None],
    *,
    handlers: tuple[str, ...],
    event: str | None,
    ids: tuple[str, ...],
    reason: str | None,
    limit: int | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    ext = extension_of(ctx)
    select = _selector(event, ids, reason)
    total = 0
    acted: list[dict[str, Any]] = []
    with broker_connection(ext) as conn:
        for queue in _nonempty_dlqs(ext, conn, handlers):
            done = queues.process(
                conn,
                queue,
                select,
                None if dry_run else (lambda letter: act(ext, conn, letter)),
                limit=limit,
            )
            verb, done_verb = verbs
            acted.extend(_summary(letter) for letter in done)
            for letter in [] if as_json else done:
                click.echo(f"{'would ' + verb if dry_run else done_verb}:{_line(letter)}")
            total += len(done)
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, verbs[1]: acted}, indent=2, default=str))
        return
    click.echo(f"{total} dead letter(s) {'would be ' if dry_run else ''}{verbs[1]}")


@dlq.command()
@_with_filters
@click.pass_context
def replay(ctx: click.Context, /, **filters: Any) -> None:
    """Send dead letters back to their own handler's queue (no other handler sees them)."""
    _run(ctx, ("replay", "replayed"), replay_letter, **filters)


@dlq.command()
@_with_filters
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def purge(ctx: click.Context, /, yes: bool, **filters: Any) -> None:
    """Delete dead letters for good."""
    if not (yes or filters["dry_run"]):
        click.confirm("Delete the selected dead letters for good?", abort=True)
    _run(ctx, ("purge", "purged"), lambda ext, conn, letter: None, **filters)


@domain_events.group()
def topology() -> None:
    """Show, declare and diff exchanges, handler queues, bindings and DLQs."""


def _management(ext: DomainEvents) -> ManagementClient:
    broker_url = str(ext.app.conf.broker_write_url or ext.app.conf.broker_url)
    try:
        return ManagementClient.for_broker(broker_url, ext.settings.management_url)
    except ConfigurationError as exc:
        raise ManagementUnavailable(str(exc)) from None


def _queue_bindings(ext: DomainEvents, client: ManagementClient) -> list[tuple[str, str]]:
    try:
        found = client.bindings_from(ext.settings.exchange)
    except ConfigurationError as exc:
        raise ManagementUnavailable(str(exc)) from None
    return [
        (b["destination"], b["routing_key"]) for b in found if b.get("destination_type") == "queue"
    ]


def _stats(conn: Connection, queue: str) -> tuple[int, int] | None:
    channel: Any = conn.channel()
    try:
        _, messages, consumers = channel.queue_declare(queue, passive=True)
        return int(messages), int(consumers)
    except conn.channel_errors:
        return None
    finally:
        ignore_errors(conn, channel.close)


def _queue_type(client: ManagementClient, name: str) -> str | None:
    try:
        return (client.queue(name) or {}).get("type")
    except ConfigurationError as exc:
        raise ManagementUnavailable(str(exc)) from None


def _transient_row(
    ext: DomainEvents, spec: HandlerSpec, bindings: list[tuple[str, str]], client: ManagementClient
) -> dict[str, Any]:
    """A transient handler: the queues its running workers bound (``<queue>.<instance>``).

    Their statistics come from the management API (a few seconds old): RabbitMQ refuses a
    passive declare of an exclusive queue to every connection but its owner's.
    """
    name = ext.topology.handler_queue_name(spec)
    running = sorted({q for q, _ in bindings if q.rpartition(".")[0] == name})
    instances = []
    for queue in running:
        try:
            stats = client.queue(queue)
        except ConfigurationError as exc:
            raise ManagementUnavailable(str(exc)) from None
        if stats is not None:  # gone since the bindings were read
            instances.append(
                {
                    "queue": queue,
                    "messages": int(stats.get("messages") or 0),
                    "consumers": int(stats.get("consumers") or 0),
                }
            )
    return {
        "handler": spec.name,
        "task": spec.task_name,
        "queue": name,
        "transient": True,
        "instances": instances,
        "declared": bool(instances),
        "type": "classic",
        "messages": sum(i["messages"] for i in instances),
        "consumers": sum(i["consumers"] for i in instances),
        "dlq": None,
        "dlq_messages": None,
        "patterns": list(ext.topology.binding_patterns(spec)),
        "bindings": sorted({k for q, k in bindings if q in running}),
    }


@topology.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def topology_show(ctx: click.Context, as_json: bool) -> None:
    """List each handler queue: type, depth, consumers, DLQ depth and live bindings."""
    ext = extension_of(ctx)
    client = _management(ext)
    bindings = _queue_bindings(ext, client)
    rows: list[dict[str, Any]] = []
    # Depths and consumers come from AMQP (exact now); the management API's statistics lag
    # by seconds, so it is asked only for what AMQP cannot tell: bindings and queue type.
    with broker_connection(ext) as conn:
        for spec in ext.handlers:
            name = ext.topology.handler_queue_name(spec)
            if spec.transient:
                rows.append(_transient_row(ext, spec, bindings, client))
                continue
            stats = _stats(conn, name)
            rows.append(
                {
                    "handler": spec.name,
                    "task": spec.task_name,
                    "queue": name,
                    "declared": stats is not None,
                    "type": _queue_type(client, name),
                    "messages": stats[0] if stats else None,
                    "consumers": stats[1] if stats else None,
                    "dlq": ext.topology.dead_letter_queue(spec).name,
                    "dlq_messages": queues.depth(conn, ext.topology.dead_letter_queue(spec).name),
                    "patterns": list(ext.topology.binding_patterns(spec)),
                    "bindings": sorted(k for q, k in bindings if q == name),
                    "transient": False,
                }
            )
        unrouted = ext.settings.unrouted_queue
        summary = {
            "exchange": ext.settings.exchange,
            "retry_exchange": ext.topology.retry_exchange().name,
            "unrouted_queue": unrouted,
            "unrouted_messages": queues.depth(conn, unrouted) if unrouted else None,
            "queues": rows,
        }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(
        f"exchange {summary['exchange']} (topic), retries via {summary['retry_exchange']}, "
        f"unrouted: {unrouted or 'dropped'} ({summary['unrouted_messages'] or 0} messages)"
    )
    for row in rows:
        state = (
            f"{row['type']}, {row['messages']} messages, {row['consumers']} consumers, "
            f"DLQ {row['dlq_messages'] or 0}"
            if row["declared"]
            else "not declared yet"
        )
        if row["transient"]:
            state = f"transient, no DLQ, {len(row['instances'])} running worker queue(s)" + "".join(
                f"\n    {q['queue']}: {q['messages']} messages" for q in row["instances"]
            )
        click.echo(f"{row['queue']}  [{state}]")
        click.echo(
            f"    bound by: {', '.join(row['bindings']) or '-'}"
            f"   (declared in code: {', '.join(row['patterns'])})"
        )


@topology.command("declare")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def topology_declare(ctx: click.Context, as_json: bool) -> None:
    """Declare everything now (before any worker runs, so no event is missed)."""
    ext = extension_of(ctx)
    with broker_connection(ext) as conn:
        declare(ext.topology.worker_entities(ext.handlers), conn.default_channel)
    if as_json:
        declared = [
            {
                "queue": ext.topology.handler_queue_name(spec),
                "patterns": list(ext.topology.binding_patterns(spec)),
                "dlq": ext.topology.dead_letter_queue(spec).name,
            }
            for spec in ext.handlers
            if not spec.transient
        ]
        click.echo(json.dumps(declared, indent=2))
        return
    for spec in ext.handlers:
        if spec.transient:
            click.echo(
                f"skipped  {ext.topology.handler_queue_name(spec)} (transient: each worker "
                "declares its own queue)"
            )
            continue
        click.echo(
            f"declared {ext.topology.handler_queue_name(spec)} bound by {', '.join(spec.patterns)} "
            f"(+ {ext.topology.dead_letter_queue(spec).name})"
        )


def _report(diff: BindingDiff, as_json: bool) -> None:
    if as_json:
        report = {
            "clean": diff.clean,
            "missing": [list(pair) for pair in diff.missing],
            "stale": [list(pair) for pair in diff.stale],
            "orphaned_queues": list(diff.orphaned_queues),
        }
        click.echo(json.dumps(report, indent=2))
        return
    for queue, pattern in diff.missing:
        click.echo(f"missing  {queue}  {pattern}")
    for queue, pattern in diff.stale:
        click.echo(f"stale    {queue}  {pattern}")
    for queue in diff.orphaned_queues:
        click.echo(f"orphaned {queue}  (no handler; still bound, it keeps collecting events)")
    if diff.clean:
        click.echo("topology matches the handlers")


def _repair(ext: DomainEvents, diff: BindingDiff, prune: bool, apply_missing: bool) -> list[str]:
    done = []
    transient = {ext.topology.handler_queue_name(s) for s in ext.handlers if s.transient}
    with broker_connection(ext) as conn:
        channel: Any = conn.default_channel
        if prune:
            for queue, pattern in diff.stale:
                if queue.rpartition(".")[0] in transient:
                    # Exclusive to its worker's connection (RabbitMQ refuses anyone else's
                    # unbind); the worker's next start declares a queue without it.
                    done.append(f"skipped  {queue}  {pattern}  (transient: restart its worker)")
                    continue
                channel.queue_unbind(queue, ext.settings.exchange, pattern)
                done.append(f"unbound  {queue}  {pattern}")
        if apply_missing:
            declare(ext.topology.worker_entities(ext.handlers), channel)
            done.append(f"declared {len(diff.missing)} missing binding(s)")
    return done


@topology.command("diff")
@click.option("--prune", is_flag=True, help="Unbind stale bindings (queues are never deleted).")
@click.option("--apply", "apply_missing", is_flag=True, help="Declare missing bindings.")
@click.option("--json", "as_json", is_flag=True, help="Print the difference as JSON.")
@click.pass_context
def topology_diff(ctx: click.Context, prune: bool, apply_missing: bool, as_json: bool) -> None:
    """Compare RabbitMQ's bindings with the handlers' patterns; exit 1 if they differ."""
    ext = extension_of(ctx)
    patterns = {
        ext.topology.handler_queue_name(s): (s.transient, ext.topology.binding_patterns(s))
        for s in ext.handlers
    }
    diff = diff_bindings(
        {q: p for q, (transient, p) in patterns.items() if not transient},
        _queue_bindings(ext, _management(ext)),
        ext.settings.service,
        transient={q: p for q, (transient, p) in patterns.items() if transient},
    )
    _report(diff, as_json)
    if diff.clean:
        return
    if prune or apply_missing:
        for line in _repair(ext, diff, prune, apply_missing):
            if not as_json:
                click.echo(line)
    if (
        (diff.stale and not prune)
        or (diff.missing and not apply_missing)
        or (diff.orphaned_queues and not (prune or apply_missing))
    ):
        ctx.exit(EXIT_FOUND_DIFFERENCE)


@domain_events.group(name="catalogue", invoke_without_command=True)
@click.option(
    "--asyncapi",
    type=click.Choice(catalogue.ASYNCAPI_VERSIONS),
    default="3.0.0",
    show_default=True,
    help="AsyncAPI version of the document.",
)
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Write to a file.")
@click.pass_context
def catalogue_command(ctx: click.Context, asyncapi: str, output: str | None) -> None:
    """Export events, versions, JSON schemas, handlers and queues as AsyncAPI JSON.

    With a subcommand, compare catalogue files instead (no app needed).
    """
    if ctx.invoked_subcommand is not None:
        return
    document = json.dumps(catalogue.build(extension_of(ctx), asyncapi), indent=2, sort_keys=False)
    if output:
        with open(output, "w", encoding="utf-8") as f:
            f.write(document + "\n")
        click.echo(f"wrote AsyncAPI {asyncapi} catalogue to {output}")
    else:
        click.echo(document)


def _read_catalogue(path: str, role: str) -> schema_diff.Catalogue:
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
        return schema_diff.read(document, f"{role} {path}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnreadableInput(f"{role} {path}: {exc}".splitlines()[0]) from None
    except CatalogueError as exc:
        raise UnreadableInput(str(exc).splitlines()[0]) from None


_catalogue_file = click.Path(dir_okay=False)


@catalogue_command.command("diff")
@click.argument("old", type=_catalogue_file)
@click.argument("new", type=_catalogue_file)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def catalogue_diff(ctx: click.Context, old: str, new: str, as_json: bool) -> None:
    """Compare two catalogues of one service (OLD release, NEW); exit 1 on a breaking change."""
    try:
        changes = schema_diff.diff(_read_catalogue(old, "OLD"), _read_catalogue(new, "NEW"))
    except CatalogueError as exc:  # two services' catalogues
        raise UnreadableInput(str(exc).splitlines()[0]) from None
    breaking = [c for c in changes if c.breaking]
    if as_json:
        report = {
            "breaking": bool(breaking),
            "summary": {"breaking": len(breaking), "compatible": len(changes) - len(breaking)},
            "changes": [c.as_dict() for c in changes],
        }
        click.echo(json.dumps(report, indent=2))
    else:
        for change in changes:
            click.echo(change.line())
        click.echo(
            f"{len(breaking)} breaking, {len(changes) - len(breaking)} compatible change(s)"
            if changes
            else "no changes"
        )
    if breaking:
        ctx.exit(EXIT_FOUND_DIFFERENCE)


@catalogue_command.command("check")
@click.option("--producer", required=True, type=_catalogue_file, help="The sender's catalogue.")
@click.option("--consumer", required=True, type=_catalogue_file, help="The receiver's catalogue.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def catalogue_check(ctx: click.Context, producer: str, consumer: str, as_json: bool) -> None:
    """Can the consumer's handlers decode every event version the producer sends? Exit 1 if not."""
    sender = _read_catalogue(producer, "producer")
    receiver = _read_catalogue(consumer, "consumer")
    try:
        deliveries = schema_diff.check(sender, receiver)
    except CatalogueError as exc:
        raise UnreadableInput(str(exc).splitlines()[0]) from None
    problems = [d for d in deliveries if not d.decodable]
    if as_json:
        report = {
            "ok": not problems,
            "producer": sender.service,
            "consumer": receiver.service,
            "deliveries": [d.as_dict() for d in deliveries],
        }
        click.echo(json.dumps(report, indent=2))
    else:
        for delivery in deliveries:
            click.echo(delivery.line())
        click.echo(
            f"{len(problems)} problem(s) in {len(deliveries)} pairing(s) of a sent event version "
            f"with a handler bound to it ({sender.service or producer} -> "
            f"{receiver.service or consumer})"
        )
    if problems:
        ctx.exit(EXIT_FOUND_DIFFERENCE)
