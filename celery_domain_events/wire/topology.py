"""The broker topology: kombu entity builders (no I/O but the entities' own declare).

::

    emit("user.created") ──► [domain_events]  topic exchange, durable
                               │ user.*              │ #               │ (nothing bound)
                               ▼                     ▼                 ▼
    [domain_events.retry] ──► billing.on_user_created  audit.record_all  [domain_events.unrouted]
      topic, key = queue name  │                                         fanout, alternate exchange
      (retries of one handler) ▼ retries spent / poison                  ▼
                    billing.on_user_created.dlq                  domain_events.unrouted

Each handler owns one durable queue, ``<service>.<handler>``, bound by its patterns, and one
dead-letter queue ``<queue>.dlq`` that has no TTL: nothing expires unseen. Handler queues name
their DLQ as ``x-dead-letter-*`` too, so a message the broker itself rejects (a quorum
``x-delivery-limit`` reached, a task Celery refuses) lands there as well.

Retries go through a second topic exchange, ``<exchange>.retry``, to which each handler queue is
bound by its own name, so a retry reaches exactly one queue. It is a topic exchange, not the
default one, because Celery's native delayed delivery (quorum queues) forwards delayed messages
only through topic exchanges, by ``#.<routing key>``; service and handler names are single
words, so ``#.<service>.<handler>`` cannot match another handler's queue.

A transient handler (``transient=True``) has neither: each worker consumption declares an
exclusive, auto-delete, non-durable classic queue ``<service>.<handler>.<instance>``, where
``<instance>`` is one word (the worker's hostname with every character but letters, digits,
``_``, ``-`` and ``@`` made ``_``, then ``-`` and a random suffix), bound by the handler's
patterns and, by its own name, to the retry exchange.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from kombu import Exchange, Queue, binding

from celery_domain_events.config import KeyFormat, QueueType, Settings
from celery_domain_events.registry import HandlerSpec

__all__ = [
    "DLQ_SUFFIX",
    "RETRY_SUFFIX",
    "Auxiliary",
    "BindingDiff",
    "Topology",
    "binding_patterns",
    "dead_letter_queue",
    "dead_letter_queue_name",
    "diff_bindings",
    "exchange",
    "handler_queue",
    "handler_queue_name",
    "queue_arguments",
    "retry_exchange",
    "retry_queue",
    "routing_key",
    "transient_instance",
    "transient_queue",
    "unrouted_advice",
    "unrouted_exchange",
    "unrouted_queue",
]

#: Suffix of every dead-letter queue.
DLQ_SUFFIX = ".dlq"
#: Suffix of the retry exchange's name.
RETRY_SUFFIX = ".retry"
#: How much of a worker's hostname a transient queue's name keeps (names: at most 255 bytes).
_HOSTNAME_MAX = 100


def unrouted_exchange(settings: Settings) -> Exchange | None:
    """Return the fanout alternate exchange that keeps unroutable events, if enabled."""
    if settings.unrouted_queue is None:
        return None
    return Exchange(settings.unrouted_queue, type="fanout", durable=True, auto_delete=False)


def unrouted_advice(name: str) -> str:
    """How to bound an unrouted queue declared earlier with other arguments: a policy."""
    pattern = "^" + name.replace(".", "\\.") + "$"
    return (
        "To bound it, use a policy: rabbitmqctl set_policy domain-events-unrouted "
        f'\'{pattern}\' \'{{"max-length": 100000, "overflow": "drop-head"}}\' '
        "--apply-to queues"
    )


def unrouted_queue(settings: Settings) -> Queue | None:
    """Return the queue that keeps events no handler was bound to, if enabled.

    It follows ``queue_type`` (a classic queue on a lost cluster node would stop publishers
    and workers) and keeps at most ``unrouted_max_length`` events, dropping the oldest.
    """
    ae = unrouted_exchange(settings)
    if ae is None:
        return None
    arguments: dict[str, Any] = {"x-queue-type": settings.queue_type.value}
    if settings.unrouted_max_length is not None:
        arguments["x-max-length"] = settings.unrouted_max_length
        arguments["x-overflow"] = "drop-head"
    return Queue(ae.name, ae, durable=True, auto_delete=False, queue_arguments=arguments)


def exchange(settings: Settings) -> Exchange:
    """Return the durable topic exchange events are published to."""
    ae = unrouted_exchange(settings)
    return Exchange(
        settings.exchange,
        type="topic",
        durable=True,
        auto_delete=False,
        delivery_mode=Exchange.PERSISTENT_DELIVERY_MODE,
        arguments={"alternate-exchange": ae.name} if ae is not None else None,
    )


def retry_exchange(settings: Settings) -> Exchange:
    """Return the topic exchange that routes retries to one handler queue by its name."""
    return Exchange(
        settings.exchange + RETRY_SUFFIX,
        type="topic",
        durable=True,
        auto_delete=False,
        delivery_mode=Exchange.PERSISTENT_DELIVERY_MODE,
    )


def routing_key(name: str, version: int, settings: Settings) -> str:
    """Return the routing key of an event: its name, or the petisco-style long form."""
    if settings.key_format is KeyFormat.PETISCO:
        return f"{settings.organization}.{settings.service}.{version}.event.{name}"
    return name


def binding_patterns(spec: HandlerSpec, settings: Settings) -> tuple[str, ...]:
    """Return the patterns the handler's queue is bound by, in this app's key format.

    Handlers are always written against event names (``user.*``); with petisco-style keys
    the binding also accepts any service and version of the organization's events.
    """
    if settings.key_format is KeyFormat.PETISCO:
        return tuple(f"{settings.organization}.*.*.event.{p}" for p in spec.patterns)
    return spec.patterns


def handler_queue_name(spec: HandlerSpec, settings: Settings) -> str:
    """Return ``<service>.<handler>``."""
    return f"{settings.service}.{spec.name}"


def dead_letter_queue_name(queue_name: str) -> str:
    """Return the dead-letter queue name of a handler queue."""
    return queue_name + DLQ_SUFFIX


def queue_arguments(spec: HandlerSpec, settings: Settings) -> dict[str, Any]:
    """Return the ``x-*`` arguments of a handler queue."""
    args: dict[str, Any] = {
        "x-queue-type": settings.queue_type.value,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead_letter_queue_name(handler_queue_name(spec, settings)),
    }
    if settings.queue_type is QueueType.QUORUM and settings.delivery_limit is not None:
        args["x-delivery-limit"] = settings.delivery_limit
    return args


def handler_queue(spec: HandlerSpec, settings: Settings) -> Queue:
    """Return the durable queue of one handler, bound to the exchange by each of its patterns.

    kombu leaves ``Queue.exchange`` unset when ``bindings`` are given; the bindings themselves
    declare the exchange, so ``Queue.declare()`` creates exchange, queue and every binding.
    """
    name = handler_queue_name(spec, settings)
    return Queue(
        name,
        bindings=_bindings(spec, settings, name),
        durable=True,
        auto_delete=False,
        queue_arguments=queue_arguments(spec, settings),
    )


def _bindings(spec: HandlerSpec, settings: Settings, queue: str) -> list[binding]:
    # The handler's patterns on the events exchange, and its own name on the retry exchange:
    # a retry comes back to this queue only.
    return [
        *(binding(exchange(settings), routing_key=p) for p in binding_patterns(spec, settings)),
        binding(retry_exchange(settings), routing_key=queue),
    ]


def retry_queue(spec: HandlerSpec, settings: Settings) -> Queue:
    """Return the handler's queue as a retry addresses it: retry exchange, key = queue name.

    It is the same broker queue as :func:`handler_queue`; the worker publishes retries and
    replays to it (see :mod:`celery_domain_events.consuming.task`), and Celery binds it for
    native delayed delivery when handler queues are quorum queues.
    """
    name = handler_queue_name(spec, settings)
    return Queue(
        name,
        exchange=retry_exchange(settings),
        routing_key=name,
        durable=True,
        auto_delete=False,
        queue_arguments=queue_arguments(spec, settings),
    )


def transient_instance(hostname: str, suffix: str) -> str:
    """Return the one-word ``<instance>`` of a transient queue name: ``<hostname>-<suffix>``."""
    return re.sub(r"[^\w@-]", "_", hostname, flags=re.ASCII)[:_HOSTNAME_MAX] + "-" + suffix


def transient_queue(spec: HandlerSpec, settings: Settings, instance: str) -> Queue:
    """Return one worker's queue of a transient handler: ``<service>.<handler>.<instance>``.

    Exclusive (only the declaring connection may use it, and it goes with that connection),
    auto-delete, not durable, and always classic (RabbitMQ refuses exclusive quorum queues),
    with no dead-letter queue. Bound by the handler's patterns, and to the retry exchange by
    its own name, so a retry comes back to this worker only.
    """
    name = f"{handler_queue_name(spec, settings)}.{instance}"
    return Queue(
        name,
        bindings=_bindings(spec, settings, name),
        durable=False,
        exclusive=True,
        auto_delete=True,
        queue_arguments={"x-queue-type": QueueType.CLASSIC.value},
    )


def dead_letter_queue(spec: HandlerSpec, settings: Settings) -> Queue:
    """Return the dead-letter queue of one handler (reached through the default exchange)."""
    name = dead_letter_queue_name(handler_queue_name(spec, settings))
    return Queue(
        name,
        exchange=Exchange(""),
        routing_key=name,
        durable=True,
        auto_delete=False,
        queue_arguments={"x-queue-type": settings.queue_type.value},
    )


@dataclass(frozen=True)
class BindingDiff:
    """How the bindings on the exchange differ from what the handlers declare."""

    #: (queue, pattern) pairs a handler declares that RabbitMQ does not have.
    missing: tuple[tuple[str, str], ...]
    #: (queue, pattern) pairs RabbitMQ has for this service's queues that no handler declares.
    stale: tuple[tuple[str, str], ...]
    #: Queues of this service bound to the exchange that belong to no handler any more.
    orphaned_queues: tuple[str, ...]

    @property
    def clean(self) -> bool:
        """True when RabbitMQ matches the code."""
        return not (self.missing or self.stale or self.orphaned_queues)


def diff_bindings(
    expected: dict[str, tuple[str, ...]],
    actual: list[tuple[str, str]],
    service: str,
    transient: dict[str, tuple[str, ...]] | None = None,
) -> BindingDiff:
    """Compare declared patterns per queue with the exchange's actual queue bindings.

    Args:
        expected: handler queue name -> its patterns.
        actual: (queue, routing key) of every queue binding on the events exchange.
        service: only queues named ``<service>.*`` are this service's to judge.
        transient: transient handlers' ``<service>.<handler>`` -> their patterns. Their
            running workers' queues (``<service>.<handler>.<instance>``) are judged against
            those patterns; none running is no difference.
    """
    transient = transient or {}
    running = {
        q: transient[q.rpartition(".")[0]]
        for q, _ in actual
        if q not in expected and q.rpartition(".")[0] in transient
    }
    expected = {**expected, **running}
    want = {(q, p) for q, patterns in expected.items() for p in patterns}
    mine = {(q, k) for q, k in actual if q in expected or q.startswith(service + ".")}
    return BindingDiff(
        missing=tuple(sorted(want - mine)),
        stale=tuple(sorted(mine - want)),
        orphaned_queues=tuple(sorted({q for q, _ in mine} - set(expected))),
    )


@dataclass(frozen=True)
class Auxiliary:
    """A queue whose declaration must never stop a publisher or worker: unrouted, DLQs.

    :func:`celery_domain_events.amqp.queues.declare_entity` declares it on a channel of its
    own, so a refusal (it exists with other arguments, or its home node of a cluster is down)
    cannot close the caller's channel; the refusal is logged with :attr:`advice` and the
    publisher or worker carries on.
    """

    queue: Queue
    #: What to tell an operator whose queue exists with other arguments.
    advice: str = ""

    @property
    def name(self) -> str:
        """The queue's name."""
        return str(self.queue.name)


class Topology:
    """The topology of one app: the builders above, bound to its settings.

    ``DomainEvents.topology`` is one; everything that names or declares a queue asks it.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def exchange(self) -> Exchange:
        """The topic exchange events are published to."""
        return exchange(self.settings)

    def retry_exchange(self) -> Exchange:
        """The exchange retries and replays go through."""
        return retry_exchange(self.settings)

    def unrouted_queue(self) -> Queue | None:
        """The queue that keeps events no handler is bound to, if enabled."""
        return unrouted_queue(self.settings)

    def routing_key(self, event: Any) -> str:
        """The routing key ``event`` is published with."""
        return routing_key(event.event_name, event.event_version, self.settings)

    def binding_patterns(self, spec: HandlerSpec) -> tuple[str, ...]:
        """The patterns ``spec``'s queue is bound by (after the key format)."""
        return binding_patterns(spec, self.settings)

    def handler_queue_name(self, spec: HandlerSpec) -> str:
        """``<service>.<handler>``."""
        return handler_queue_name(spec, self.settings)

    def handler_queue(self, spec: HandlerSpec) -> Queue:
        """The handler's durable queue with its bindings."""
        return handler_queue(spec, self.settings)

    def retry_queue(self, spec: HandlerSpec) -> Queue:
        """The handler's queue as the retry exchange addresses it."""
        return retry_queue(spec, self.settings)

    def transient_queue(self, spec: HandlerSpec, instance: str) -> Queue:
        """One worker's exclusive queue of the transient handler ``spec``."""
        return transient_queue(spec, self.settings, instance)

    def dead_letter_queue(self, spec: HandlerSpec) -> Queue:
        """The handler's dead-letter queue."""
        return dead_letter_queue(spec, self.settings)

    def publisher_entities(self) -> list[Any]:
        """What a publisher declares: the exchange and, if enabled, the unrouted queue."""
        unrouted = self.unrouted_queue()
        if unrouted is None:
            return [self.exchange()]
        return [self.exchange(), Auxiliary(unrouted, unrouted_advice(unrouted.name))]

    def worker_entities(self, handlers: list[HandlerSpec]) -> list[Any]:
        """What a worker declares: the publisher's, then each handler's DLQ and queue.

        Transient handlers are left out: each worker consumption declares its own queue.
        """
        entities = self.publisher_entities()
        for spec in handlers:
            if spec.transient:
                continue
            entities += [Auxiliary(self.dead_letter_queue(spec)), self.handler_queue(spec)]
        return entities
