"""One asyncio event loop per process, on which ``async def`` handlers run.

A handler task runs in Celery's pool: the main thread of a prefork child, the worker's own
thread with ``-P solo``, one of several threads with ``-P threads``. None of them runs an event
loop, and a loop per run (``asyncio.run``) would throw away every loop-bound client (an async
database engine, an HTTP connection pool) after each event. So each process owns one loop, run
forever by a daemon thread started on first use. :func:`run` submits a coroutine to it and
blocks the calling (pool) thread until the coroutine is done::

    result = aio_loop.run(handler(event))     # in the pool thread

* **Context.** The coroutine runs in a copy of the *calling* thread's context (contextvars):
  the task is created by a callback that ``call_soon_threadsafe(..., context=ctx)`` runs in
  ``ctx = copy_context()``, which is ``ctx.run(...)`` on the loop thread (Python 3.10 has no
  ``create_task(context=)``). ``emit()`` appends to the buffer of the scope the handler task
  opened, and the trace context is the handler's. Changes the coroutine makes to context
  variables stay in its copy (the handler task takes back the one that matters, the emit()
  buffer the coroutine leaves current, so that ``discard()`` works as in a plain function).
* **Interruption.** If the wait is interrupted by any ``BaseException`` (Celery's soft time limit
  raises ``SoftTimeLimitExceeded`` in the pool thread; a ``KeyboardInterrupt``), the asyncio
  task is cancelled, so the coroutine sees ``CancelledError`` where it awaits and stops; the
  pool thread waits up to ``cancel_timeout`` seconds for it to finish (its ``except`` and
  ``finally`` blocks), then re-raises. A coroutine that swallows the cancellation and goes on
  is logged and left running on the loop.
* **Signals.** The loop thread blocks asynchronous signals. The kernel delivers a signal sent
  to the process (billiard's SIGUSR1 for the soft time limit) to any thread that does not block
  it (Linux prefers the main thread, but not always): were it the loop thread, the pool
  thread's wait would not be interrupted, and the soft time limit would fire only once the
  coroutine had finished. Threads the loop starts (``asyncio.to_thread``) inherit the mask.
* **Results.** A small coroutine around the caller's hands its result or exception to a
  ``concurrent.futures.Future``, rather than a done callback on the task: it also catches the
  ``SystemExit`` and ``KeyboardInterrupt`` a coroutine may raise, which asyncio lets escape
  ``run_forever`` and which would end the loop thread, hanging every later run.
* **Fork.** A forked child never uses its parent's loop (the thread running it does not exist
  there): ``os.register_at_fork`` drops the inherited state in the child, and the owner's pid
  is checked on every run as well. The child starts a loop of its own on first use. The
  inherited loop object is kept, neither used nor closed: it still looks running, so it cannot
  be closed, and freeing it would only warn.
* **Sharing.** Every handler of the process runs on this one loop, so a coroutine that blocks
  (``time.sleep``, a synchronous driver, CPU work) blocks all of them; with ``-P threads`` the
  runs of several pool threads overlap on it. Blocking work belongs in
  ``asyncio.to_thread`` (or ``loop.run_in_executor``).

Not supported on the eventlet and gevent pools, whose monkey-patched threads are greenlets
(untested there).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import os
import signal
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["CANCEL_TIMEOUT", "THREAD_NAME", "get_loop", "run"]

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Seconds a cancelled coroutine has to finish before :func:`run` re-raises without it.
CANCEL_TIMEOUT = 5.0

#: The name of the thread running the loop (as thread dumps and ``py-spy`` show it).
THREAD_NAME = "celery-domain-events-asyncio"

#: Faults the thread itself raises: never blocked (the kernel would force them anyway).
_SYNCHRONOUS_SIGNALS = {
    getattr(signal, name)
    for name in ("SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL")
    if hasattr(signal, name)
}


class _LoopThread:
    """An event loop, the daemon thread running it forever, and the process owning both."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        #: Strong references: asyncio keeps only weak ones to running tasks.
        self.tasks: set[asyncio.Task[None]] = set()
        self.thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        _start_without_signals(self.thread)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        except BaseException:  # not expected: _settle lets nothing escape a task
            log.exception("The event loop of async handlers stopped; the next run starts another")

    def usable(self) -> bool:
        return self.pid == os.getpid() and self.thread.is_alive()


def _start_without_signals(thread: threading.Thread) -> None:
    # A new thread inherits the signal mask of the thread starting it: block the asynchronous
    # signals here while it starts, so it never has them unblocked, not even for an instant.
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no per-thread masks
        thread.start()
        return
    previous = signal.pthread_sigmask(
        signal.SIG_BLOCK, signal.valid_signals() - _SYNCHRONOUS_SIGNALS
    )
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


_lock = threading.Lock()
_current: _LoopThread | None = None
#: Loops inherited from a parent process: kept alive, never used (see the module docstring).
_inherited: list[_LoopThread] = []


def _loop_thread() -> _LoopThread:
    """The loop thread of this process, started on first use (and after a fork)."""
    global _current  # noqa: PLW0603 (one loop per process)
    current = _current
    if current is not None and current.usable():
        return current
    with _lock:
        current = _current
        if current is None or not current.usable():
            if current is not None:
                _retire(current)
            current = _current = _LoopThread()
        return current


def _retire(old: _LoopThread) -> None:
    if old.pid != os.getpid():
        _inherited.append(old)
    else:  # its thread ended (see _LoopThread._run): the loop no longer runs
        old.loop.close()


def _forget_after_fork() -> None:
    # In the child: a lock held by another thread of the parent at the fork would stay locked
    # for ever, and the loop's thread is gone.
    global _lock, _current  # noqa: PLW0603
    _lock = threading.Lock()
    if _current is not None:
        _inherited.append(_current)
        _current = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def get_loop() -> asyncio.AbstractEventLoop:
    """Return this process's loop for handlers, starting its thread if need be."""
    return _loop_thread().loop


def run(coro: Coroutine[Any, Any, T], *, cancel_timeout: float = CANCEL_TIMEOUT) -> T:
    """Run ``coro`` on this process's loop, in a copy of this thread's context; wait for it.

    Args:
        coro: the coroutine, not yet started.
        cancel_timeout: how long to wait for the coroutine to finish once it is cancelled
            because this wait was interrupted.

    Returns:
        What the coroutine returned.

    Raises:
        BaseException: what the coroutine raised, or what interrupted the wait (after the
            coroutine was cancelled).
        RuntimeError: called on the loop's own thread, where it would wait for itself.
    """
    runner = _loop_thread()
    if threading.current_thread() is runner.thread:
        coro.close()
        raise RuntimeError(
            "aio_loop.run() on the event loop's own thread would wait for itself: await the "
            "coroutine instead"
        )
    done: concurrent.futures.Future[T] = concurrent.futures.Future()
    started: list[asyncio.Task[None]] = []

    def start() -> None:  # on the loop thread, in the copy of the caller's context
        task = runner.loop.create_task(_settle(coro, done))
        runner.tasks.add(task)
        task.add_done_callback(runner.tasks.discard)
        started.append(task)

    runner.loop.call_soon_threadsafe(start, context=contextvars.copy_context())
    try:
        return done.result()
    except BaseException:
        if not done.done():
            _cancel(runner, started, done, cancel_timeout)
        raise


async def _settle(coro: Coroutine[Any, Any, T], done: concurrent.futures.Future[T]) -> None:
    try:
        result = await coro
    except BaseException as exc:  # everything goes to the waiting thread; nothing ends the loop
        done.set_exception(exc)
    else:
        done.set_result(result)


def _cancel(
    runner: _LoopThread,
    started: list[asyncio.Task[None]],
    done: concurrent.futures.Future[Any],
    timeout: float,
) -> None:
    def cancel() -> None:
        # Callbacks run in the order they were scheduled: start() has run.
        for task in started:
            task.cancel()

    runner.loop.call_soon_threadsafe(cancel)
    finished, _ = concurrent.futures.wait([done], timeout=timeout)
    if not finished:
        log.warning(
            "An async handler did not finish within %.1f s of its cancellation; it is left "
            "running on the event loop",
            timeout,
        )
