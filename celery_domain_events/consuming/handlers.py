"""``@domain_event_handler``: declare a function as the handler of matching events.

::

    @domain_event_handler("user.*", retry=RetryPolicy(max_retries=5), time_limit=30)
    def send_welcome_email(event: UserCreated) -> None:
        ...

    @domain_event_handler("user.*")
    async def sync_crm(event: UserCreated) -> None:
        await crm.upsert(event.user_id)

    @domain_event_handler("order.*", batch=Batch(max_size=500, max_wait=2.0))
    def index_orders(events: list[OrderPaid]) -> None:
        search.bulk_index(events)

Each handler becomes one Celery task, ``domain_events.<module>.<name>``, registered on every
Celery app the way ``@shared_task`` is (no app needs to exist when the decorator runs), and gets
its own durable queue ``<service>.<name>`` bound by its patterns when a worker starts.

An ``async def`` handler is a Celery task like any other (retries, dead letters, time limits,
trace context): its coroutine runs on one event loop per worker process, in a thread of its own,
while the pool thread waits for it (:mod:`.aio_loop`). Called directly, a handler is the
function it decorates: ``await handler(event)`` for an async one.

A batch handler (``batch=``) takes a list of events and runs as one Celery task per batch
(:mod:`celery_domain_events.batching`).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import types
import typing
from collections.abc import Callable
from typing import Any, Generic, ParamSpec, TypeVar, cast

from celery import Celery, Task
from celery import current_app as _current_app
from celery.signals import celeryd_after_setup

from celery_domain_events import _compat
from celery_domain_events.batching import Batch
from celery_domain_events.events import DomainEvent, GenericEvent, default_events
from celery_domain_events.exceptions import ConfigurationError, EventDefinitionError
from celery_domain_events.extension import DomainEvents
from celery_domain_events.inbox import AsyncInbox, Inbox
from celery_domain_events.registry import (
    BATCH_ANNOTATIONS,
    HandlerRegistry,
    HandlerSpec,
    default_handlers,
)
from celery_domain_events.retry import RetryPolicy
from celery_domain_events.routing import matches, validate_pattern, validate_word

from . import queue_options  # noqa: F401 (connects the worker's -Q/-X handling)
from .task import DomainEventTask

log = logging.getLogger(__name__)

__all__ = ["TASK_OPTIONS", "Handler", "domain_event_handler"]

P = ParamSpec("P")
R = TypeVar("R")

#: Celery task options a handler may set; anything else is rejected when the decorator runs.
TASK_OPTIONS = frozenset(
    {
        "time_limit",
        "soft_time_limit",
        "rate_limit",
        "track_started",
        "acks_on_failure_or_timeout",
        "priority",
    }
)

_DEFAULT_RETRY = RetryPolicy()
#: Celery's retry options, and RetryPolicy's own names, given to the decorator by mistake.
_RETRY_OPTIONS = frozenset(
    {
        *RetryPolicy().task_options(),
        *(field.name for field in dataclasses.fields(RetryPolicy)),
        "dont_autoretry_for",
        "default_retry_delay",
        "retry_kwargs",
    }
)


class Handler(Generic[P, R]):
    """What ``@domain_event_handler`` returns: the function, still callable, plus its spec."""

    def __init__(self, spec: HandlerSpec) -> None:
        self.spec = spec
        self.__wrapped__ = spec.fn
        self.__doc__ = spec.fn.__doc__
        self.__name__ = spec.fn.__name__
        self.__module__ = spec.fn.__module__

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the handler function directly (no broker involved)."""
        result: R = self.spec.fn(*args, **kwargs)
        return result

    @property
    def name(self) -> str:
        """The handler's unique name."""
        return self.spec.name

    @property
    def patterns(self) -> tuple[str, ...]:
        """The routing patterns the handler's queue is bound by."""
        return self.spec.patterns

    def task_for(self, app: Celery | None = None) -> Task[Any, Any]:
        """Return the Celery task of this handler in ``app`` (default: the current app)."""
        app = app or _current_app
        return app.tasks[self.spec.task_name]

    def __repr__(self) -> str:
        return f"<Handler {self.spec.name} {' '.join(self.spec.patterns)}>"


def domain_event_handler(
    *patterns: str,
    name: str | None = None,
    retry: RetryPolicy | None = _DEFAULT_RETRY,
    idempotent: Inbox | AsyncInbox | None = None,
    batch: Batch | int | None = None,
    transient: bool = False,
    registry: HandlerRegistry = default_handlers,
    **task_options: Any,
) -> Callable[[Callable[P, R]], Handler[P, R]]:
    """Declare the decorated function as the handler of events matching ``patterns``.

    Args:
        patterns: AMQP topic patterns (``user.created``, ``user.*``, ``#``); at least one.
        name: handler name, unique per service; defaults to the function's name. It names the
            queue (``<service>.<name>``), so renaming a handler means a new queue.
        retry: the retry policy; ``None`` dead-letters on the first failure.
        idempotent: an inbox (``SqlAlchemyInbox``, ``AsyncSqlAlchemyInbox`` for ``async def``
            handlers, ``DjangoInbox``, or the weaker ``RedisInbox``; see the idempotent
            handlers guide): each event runs the handler once, its ``(handler, event id)``
            committed with the handler's side effects (Redis: marked after them); a
            duplicate delivery is skipped.
        batch: make it a batch handler: it takes ``list[Event]`` and runs once per batch of
            up to ``Batch.max_size`` events gathered for at most ``Batch.max_wait`` seconds
            (an int is the max size, with a 1 s wait). Raise
            :class:`~celery_domain_events.BatchItemsFailed` to fail some events alone.
        transient: instead of the durable queue, each worker consumes an exclusive queue of
            its own, ``<service>.<name>.<worker hostname>-<6 hex digits>``, that exists only
            while the worker is connected: every running worker gets every event, events
            published while none runs are not kept, and a final failure is logged at ERROR
            and acked (no dead-letter queue). See the handlers guide.
        registry: where to register (tests pass an isolated one).
        task_options: Celery task options from :data:`TASK_OPTIONS` (``time_limit``, ...).

    Raises:
        InvalidRoutingPattern: a pattern is malformed.
        ConfigurationError: no pattern, an unknown option, an async generator function, or
            ``batch=`` or ``transient=True`` with ``idempotent=``, or both of them.
        EventDefinitionError: the function does not take one event argument (a list of
            events, for a batch handler).
        RegistrationError: another function already has this handler name.
    """
    if not patterns:
        raise ConfigurationError("domain_event_handler() needs at least one routing pattern")
    if callable(patterns[0]) and not isinstance(patterns[0], str):
        raise ConfigurationError(
            "@domain_event_handler needs its routing patterns: write "
            "@domain_event_handler('user.*'), not a bare @domain_event_handler"
        )
    for pattern in patterns:
        validate_pattern(pattern)
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise ConfigurationError(
            f"retry= takes a RetryPolicy or None, not {retry!r}"
            + (f": write retry=RetryPolicy(max_retries={retry})" if type(retry) is int else "")
        )
    unknown = set(task_options) - TASK_OPTIONS
    if unknown:
        retry_options = sorted(unknown & _RETRY_OPTIONS)
        hint = (
            f"; {', '.join(retry_options)} belong in retry=RetryPolicy(...)"
            if retry_options
            else ""
        )
        raise ConfigurationError(
            f"unknown handler option(s) {', '.join(sorted(unknown))}{hint}; handler options "
            "are name, retry, idempotent, batch, transient and the Celery task options "
            f"{', '.join(sorted(TASK_OPTIONS))}"
        )
    batch_policy = None if batch is None else Batch.of(batch)
    if batch_policy is not None and idempotent is not None:
        raise ConfigurationError(
            "batch= and idempotent= cannot be combined yet: claim the events' ids in the batch "
            "handler's own transaction (the idempotent handlers guide shows how)"
        )
    if transient and idempotent is not None:
        # An inbox shared by the workers would let only the first one run each event, which
        # defeats a transient handler: every running worker is meant to handle every event.
        raise ConfigurationError(
            "a transient handler cannot be idempotent=: each running worker handles every "
            "event, so a shared inbox would skip it on all workers but one"
        )
    if transient and batch_policy is not None:
        raise ConfigurationError(
            "batch= and transient=True cannot be combined yet: a transient handler takes one "
            "event per run"
        )

    def decorate(fn: Callable[P, R]) -> Handler[P, R]:
        if isinstance(fn, Handler):
            raise ConfigurationError(f"{fn!r} is already a domain event handler")
        if inspect.isasyncgenfunction(fn):  # calling it would run nothing
            raise ConfigurationError(
                f"{getattr(fn, '__qualname__', fn)!r} is an async generator function (it "
                "yields); a handler is a plain or an async def function"
            )
        _check_signature(fn, batch=batch_policy is not None, patterns=patterns)
        handler_name = name or fn.__name__
        validate_word(handler_name, "handler name")  # queue names are <service>.<handler>
        _check_inbox(fn, idempotent)
        spec = HandlerSpec(
            name=handler_name,
            patterns=tuple(dict.fromkeys(patterns)),
            fn=fn,
            retry=retry,
            task_options=dict(task_options),
            idempotent=idempotent,
            batch=batch_policy,
            transient=transient,
        )
        registry.register(spec)
        _register_task_on_apps(spec)
        return Handler(spec)

    return decorate


def _check_inbox(fn: Callable[..., Any], inbox: Any) -> None:
    """Refuse, at decoration, an inbox that cannot serve this kind of handler.

    Raises:
        ConfigurationError: ``inbox`` has no ``claim`` (or, for an ``async def`` handler, no
            ``aclaim``).
    """
    if inbox is None:
        return
    if inspect.iscoroutinefunction(fn):
        if not isinstance(inbox, AsyncInbox):
            raise ConfigurationError(
                f"idempotent={inbox!r} has no aclaim() for the async def handler "
                f"{fn.__qualname__}; an async def handler needs an async inbox "
                "(contrib.inbox.AsyncSqlAlchemyInbox)"
            )
    elif not isinstance(inbox, Inbox):
        raise ConfigurationError(
            f"idempotent={inbox!r} has no claim() for {fn.__qualname__}; pass an inbox "
            "(contrib.inbox.SqlAlchemyInbox, contrib.django.inbox.DjangoInbox, "
            "contrib.redis_inbox.RedisInbox)"
        )


def _check_signature(
    fn: Callable[..., Any], *, batch: bool = False, patterns: tuple[str, ...] = ()
) -> None:
    """Refuse, at decoration, a handler that cannot take one event (a batch handler: a list).

    Raises:
        EventDefinitionError: it does not take exactly one argument, or that argument is
            annotated with a type that is no event (for a batch handler: no ``list[E]`` of
            an event type E), or only with event classes none of ``patterns`` matches. An
            unresolvable forward reference is let through: the worker checks nothing more
            about it.
    """
    name = getattr(fn, "__qualname__", repr(fn))
    try:
        signature = inspect.signature(fn)
        signature.bind(object())
    except (TypeError, ValueError) as exc:
        raise EventDefinitionError(
            f"handler {name} must take one argument, the event: {exc}"
        ) from exc
    first = next(iter(signature.parameters.values()), None)
    if first is None or first.kind is inspect.Parameter.VAR_POSITIONAL:
        return
    try:
        annotation = typing.get_type_hints(fn).get(first.name, Any)
    except Exception:  # a forward reference the module defines later
        return
    if batch:
        _check_batch_annotation(name, first.name, annotation)
        args = typing.get_args(annotation)
        annotation = args[0] if len(args) == 1 else Any
    elif not _is_event_type(annotation):
        raise EventDefinitionError(
            f"handler {name} takes {first.name}: {annotation!r}, which is no event type; "
            "annotate it with a DomainEvent subclass, GenericEvent, or a union of them"
        )
    named = _named_events(annotation)
    # A model declared so far that the patterns match and the annotation takes (a subclass of
    # an annotated event class counts) makes the annotation right.
    receivable = [
        model
        for model in [*named, *default_events.all()]
        if any(matches(p, model.event_name) for p in patterns) and issubclass(model, tuple(named))
    ]
    if named and not receivable:
        events = ", ".join(f"{m.__qualname__} ({m.event_name})" for m in named)
        raise EventDefinitionError(
            f"handler {name} takes {events}, which none of its patterns "
            f"({', '.join(patterns)}) matches: it would receive other events, untyped; "
            "annotate it with the event classes it receives"
        )


def _check_batch_annotation(name: str, argument: str, annotation: Any) -> None:
    if annotation in (Any, object, inspect.Parameter.empty, list):
        return
    args = typing.get_args(annotation)
    if (
        typing.get_origin(annotation) in BATCH_ANNOTATIONS
        and len(args) == 1
        and _is_event_type(args[0])
    ):
        return
    raise EventDefinitionError(
        f"batch handler {name} takes {argument}: {annotation!r}; a batch handler takes a list "
        "of events: annotate it list[E], with E a DomainEvent subclass, GenericEvent, or a "
        "union of them"
    )


def _named_events(annotation: Any) -> list[type[DomainEvent]]:
    # The event classes an annotation accepts, if it accepts only classes with an event_name
    # (not GenericEvent, Any or an abstract base, which take events of any name).
    members = (
        typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType)
        else (annotation,)
    )
    named: list[type[DomainEvent]] = []
    for member in members:
        if member is type(None):
            continue
        if not (
            isinstance(member, type)
            and issubclass(member, DomainEvent)
            and "event_name" in vars(member)  # its own, as models are registered
        ):
            return []
        named.append(member)
    return named


def _is_event_type(annotation: Any) -> bool:
    if annotation in (Any, object, inspect.Parameter.empty):
        return True
    # get_origin: on Python 3.10 a parametrised generic (dict[str, Any]) is a "type" too.
    if isinstance(annotation, type) and typing.get_origin(annotation) is None:
        return issubclass(annotation, DomainEvent | GenericEvent)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return all(arg is type(None) or _is_event_type(arg) for arg in typing.get_args(annotation))
    return False


def _register_task_on_apps(spec: HandlerSpec) -> None:
    # Same mechanism as @shared_task: apps finalized later pick the task up on finalize,
    # apps finalized already get it now.
    _compat.on_every_app(lambda app: bind_task(app, spec))


def bind_task(app: Celery, spec: HandlerSpec) -> Task[Any, Any]:
    """Create (or return, if it exists) the Celery task that runs ``spec`` in ``app``."""
    # app.tasks does not re-enter finalize: Celery marks the app finalized before it calls
    # the finalize callbacks this runs from.
    existing: Task[Any, Any] | None = app.tasks.get(spec.task_name)
    if existing is not None:
        return existing

    def run(self: DomainEventTask, raw_event: str, meta: dict[str, Any] | None = None) -> Any:
        return self.deliver(raw_event)

    def run_batch(self: DomainEventTask, batch: list[dict[str, Any]]) -> Any:
        return self.deliver_batch(batch)

    if spec.batch is not None:
        run = run_batch  # type: ignore[assignment]
    run.__name__ = run.__qualname__ = spec.name
    run.__module__ = spec.fn.__module__
    run.__doc__ = spec.fn.__doc__
    # A batch handler applies its retry policy per event (DomainEventTask.deliver_batch):
    # Celery's own autoretry would run the whole batch again.
    retry_options = (
        spec.retry.task_options()
        if spec.retry is not None and spec.batch is None
        else RetryPolicy(max_retries=0).task_options()
    )
    task = _compat.task_from_fun(
        app,
        run,
        name=spec.task_name,
        base=DomainEventTask,
        bind=True,
        handler_spec=spec,
        **{**retry_options, **spec.task_options},
    )
    # After task_from_fun, which wraps run in Celery's autoretry: the dead letter must see
    # the final outcome, once retries are spent.
    cast(DomainEventTask, task).guard_run()
    return task


@celeryd_after_setup.connect(weak=False)
def _warn_without_extension(instance: Any = None, **_: Any) -> None:
    # Handler tasks are bound to every app, as @shared_task's are: an app without DomainEvents
    # lists them in its banner and consumes none of their queues. (Sent once the worker's
    # logging is set up.)
    app = getattr(instance, "app", None)
    if app is None:
        return
    if DomainEvents.installed_anywhere():
        return  # another app of this process runs them; this one only shares the modules
    names = sorted(
        task.handler_spec.name
        for task in list(app.tasks.values())
        if isinstance(task, DomainEventTask)
    )
    if names:
        log.warning(
            "Celery app %r has domain event handlers (%s) but no DomainEvents, so this worker "
            "consumes none of their queues: if it should run them, call "
            "DomainEvents(app, service=...)",
            app.main,
            ", ".join(names),
        )
