"""Where a handler run's time goes: the library's steps timed inside a real worker.

``python -m benchmarks.steps`` runs row (c) once (N events to the two benchmark handlers, a
real ``celery worker``) with a wrapper around each step the library adds to a Celery task,
and prints the mean wall time per call of each step, measured in the worker while it drains
the queues. Microbenchmarks of the same functions on a warm cache give about a quarter of
these figures: in a worker each step runs between Celery's, kombu's and py-amqp's own, with
cold caches. The wrappers add about half a microsecond per step and call.

Steps (per handler run; each includes those indented below it):

* main thread: ``dispatch`` (the handler queue's ``on_message``, including Celery's own
  handling of the task message and, with the solo pool, the whole run), ``check`` (the
  untrusted-wire check), ``task_message`` (the task message: ``task_id``, ``headers``,
  ``meta``, ``message``);
* pool: ``deliver`` (the run, handler included), ``decode`` (JSON and CloudEvents envelope),
  ``to_event`` (the event model), ``trace`` (``spans.handle``), ``scope`` (the emit scope),
  ``handler`` (the benchmark handler's body: one Redis round trip); with ``--metrics``
  (row (i)), ``metrics_start`` and ``metrics_end`` (recording the run's lag, duration and
  outcome).

    .venv/bin/python -m benchmarks.steps [--events N] [--pool solo|prefork] [--metrics]

``--compare`` runs row (b) and row (c) instead, alternating ``--repeat`` times, with the *CPU
time* of the calling thread (``time.thread_time_ns``) around the layers both go through
(:data:`LAYERS`: py-amqp reading frames and decoding the properties, kombu's receive callback,
Celery's ``Request``, the task's body) and the library's own (check, task message, the run
around the body), and prints each layer's CPU per task or handler run for both, side by side:

    .venv/bin/python -m benchmarks.steps --compare [--pool solo|prefork] [--repeat R]
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: (module, attribute, step name) of each wrapped function.
STEPS = (
    ("celery_domain_events.consuming.bootstep", "_Dispatch.__call__", "dispatch"),
    ("celery_domain_events.wire.inbound", "check", "check"),
    ("celery_domain_events.consuming.bootstep", "to_task_message", "task_message"),
    ("celery_domain_events.consuming.delivery", "task_id_for", "task_id"),
    ("celery_domain_events.consuming.delivery", "_task_headers", "headers"),
    ("celery_domain_events.consuming.delivery", "_meta", "meta"),
    ("celery_domain_events._compat", "decoded_task_message", "message"),
    ("celery_domain_events.consuming.task", "DomainEventTask.deliver", "deliver"),
    ("celery_domain_events.wire.envelope", "decode", "decode"),
    ("celery_domain_events.wire.envelope", "to_event", "to_event"),
    ("celery_domain_events.consuming.spans", "handle", "trace"),
    ("celery_domain_events.publishing.api", "handler_scope", "scope"),
    ("celery_domain_events.metrics", "handler_started", "metrics_start"),
    ("celery_domain_events.metrics", "handler_outcome", "metrics_end"),
    ("benchmarks.bench_app", "record_completion", "handler"),
)
#: ``--compare``: (module, attribute, layer) wrapped in both rows, then the library's own.
LAYERS = (
    ("amqp.transport", "_AbstractTransport.read_frame", "py-amqp: read a frame"),
    ("amqp.serialization", "GenericContent._load_properties", "py-amqp: properties, headers"),
    ("kombu.messaging", "Consumer._receive_callback", "kombu: receive callback"),
    ("celery.worker.request", "Request.__init__", "celery: Request.__init__"),
    ("celery_domain_events.wire.inbound", "check", "library: untrusted-wire check"),
    ("celery_domain_events.consuming.bootstep", "to_task_message", "library: task message"),
    ("celery_domain_events.consuming.task", "DomainEventTask.deliver", "library: run, with body"),
    ("benchmarks.bench_app", "record_completion", "the body (same code in both)"),
)
_OUT = "BENCH_STEPS_OUT"
_CLOCK = "BENCH_STEPS_CLOCK"
_WRAP = "BENCH_STEPS_WRAP"


def _install() -> None:
    """In the worker: wrap every step (module attributes are looked up at call time)."""
    from celery.signals import worker_process_shutdown, worker_shutdown

    totals: dict[str, list[int]] = {}
    compare = os.environ.get(_WRAP) == "layers"
    # Thread CPU time leaves out what a wall clock counts while the thread waits (the body's
    # Redis round trip, the other core's work); it costs a system call per read.
    clock = time.thread_time_ns if os.environ.get(_CLOCK) == "cpu" else time.perf_counter_ns
    for module_name, attribute, step in LAYERS if compare else STEPS:
        owner: Any = importlib.import_module(module_name)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, name)

        def timed(*args: Any, _f: Any = original, _step: str = step, **kwargs: Any) -> Any:
            started = clock()
            try:
                return _f(*args, **kwargs)
            finally:
                entry = totals.setdefault(_step, [0, 0])
                entry[0] += clock() - started
                entry[1] += 1

        setattr(owner, name, functools.wraps(original)(timed))

    def dump(**_: Any) -> None:
        path = Path(os.environ[_OUT]) / f"{os.getpid()}.json"
        path.write_text(json.dumps(totals))

    worker_shutdown.connect(dump, weak=False)
    worker_process_shutdown.connect(dump, weak=False)


def _worker_main() -> None:
    """``python -m benchmarks.steps --worker ...``: a celery worker with the steps wrapped."""
    from celery.__main__ import main as celery_main

    _install()
    sys.argv = ["celery", *sys.argv[2:]]
    celery_main()


def _totals(out: Path) -> dict[str, list[int]]:
    totals: dict[str, list[int]] = {}
    for path in out.glob("*.json"):
        for step, (ns, calls) in json.loads(path.read_text()).items():
            entry = totals.setdefault(step, [0, 0])
            entry[0] += ns
            entry[1] += calls
    return totals


def _wrapper_cost() -> float:
    """CPU microseconds one wrapper adds to one call (two thread-clock reads and the rest)."""
    totals: dict[str, list[int]] = {}
    clock = time.thread_time_ns

    def nothing() -> None:
        return None

    def timed(_f: Any = nothing) -> Any:
        started = clock()
        try:
            return _f()
        finally:
            entry = totals.setdefault("x", [0, 0])
            entry[0] += clock() - started
            entry[1] += 1

    calls = 200_000
    started = time.thread_time()
    for _ in range(calls):
        timed()
    wrapped = time.thread_time() - started
    started = time.thread_time()
    for _ in range(calls):
        nothing()
    return (wrapped - (time.thread_time() - started)) / calls * 1e6


def compare(args: argparse.Namespace, out_root: Path) -> int:
    """``--compare``: CPU per layer of (b) and (c), alternating, medians of the repeats."""
    import statistics

    from . import run

    b = run.bench_of(run.parse_args(["--events", str(args.events), "--repeat", "1"]))
    per_unit: dict[str, dict[str, list[float]]] = {"plain": {}, "events": {}}
    for repeat in range(args.repeat):
        for mode in ("plain", "events") if repeat % 2 == 0 else ("events", "plain"):
            out = Path(tempfile.mkdtemp(prefix=f"{mode}-", dir=out_root))
            os.environ[_OUT] = str(out)
            drain = run.scenario_worker(b, mode, args.pool, run.DEFAULT_PREFETCH)
            values = per_unit[mode]
            values.setdefault("worker CPU (/proc, all processes)", []).append(drain.cpu_us)
            values.setdefault("rate (units/s)", []).append(drain.rate)
            for layer, (ns, _calls) in _totals(out).items():
                values.setdefault(layer, []).append(ns / 1000 / max(drain.done, 1))
            print(
                f"  repeat {repeat + 1} {mode}: {drain.rate:,.0f}/s, CPU {drain.cpu_us:.0f} us",
                file=sys.stderr,
            )
    print(
        f"CPU per unit, us (thread CPU time around each layer, inclusive; medians of "
        f"{args.repeat}), {args.pool}, N={args.events}: no-op task (b) vs handler run (c); "
        f"{run.code_version()}"
    )
    print(f"{'layer':<36} {'no-op task':>11} {'handler run':>12} {'difference':>11}")
    for layer in [
        "rate (units/s)",
        "worker CPU (/proc, all processes)",
        *(name for _, _, name in LAYERS),
    ]:
        a = per_unit["plain"].get(layer)
        c = per_unit["events"].get(layer)
        left = statistics.median(a) if a else 0.0
        right = statistics.median(c) if c else 0.0
        digits = 0 if layer.startswith(("rate", "worker")) else 1
        cells = f"{left:>11,.{digits}f} {right:>12,.{digits}f} {right - left:>+11,.{digits}f}"
        print(f"{layer:<36} {cells}")
    print(f"one wrapper adds about {_wrapper_cost():.2f} us of CPU per wrapped call")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.steps", description=__doc__)
    parser.add_argument("--events", type=int, default=10_000, help="N (2N handler runs)")
    parser.add_argument("--pool", choices=("solo", "prefork"), default="solo")
    parser.add_argument("--metrics", action="store_true", help="metrics on, as in row (i)")
    parser.add_argument("--compare", action="store_true", help="(b) vs (c), CPU per layer")
    parser.add_argument("--repeat", type=int, default=4, help="--compare: runs of each row")
    args = parser.parse_args(argv)
    from . import run

    out = Path(tempfile.mkdtemp(prefix="bench-steps-"))

    def start_worker(env: dict[str, str], pool: str, log_path: Path, uid: str) -> Any:
        cmd = [sys.executable, "-m", "benchmarks.steps", "--worker", "-A", "benchmarks.bench_app"]
        cmd += ["worker", "--loglevel", "WARNING", "--without-mingle", "--without-gossip"]
        cmd += ["--without-heartbeat", "--hostname", f"steps-{uid}@%h", *run.POOLS[pool]]
        with log_path.open("ab") as log:
            return subprocess.Popen(
                cmd,
                cwd=run.ROOT,
                env={_OUT: str(out), **os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    run.start_worker = start_worker  # type: ignore[assignment]
    if args.compare:
        os.environ[_CLOCK] = "cpu"
        os.environ[_WRAP] = "layers"
        return compare(args, out)
    b = run.bench_of(run.parse_args(["--events", str(args.events), "--repeat", "1"]))
    drain = run.scenario_worker(b, "events", args.pool, run.DEFAULT_PREFETCH, metrics=args.metrics)
    totals = _totals(out)
    print(
        f"steps of ({'i' if args.metrics else 'c'}), {args.pool}: {drain.done} handler runs "
        f"at {drain.rate:,.0f}/s, "
        f"worker CPU {drain.cpu_us:.0f} us per run; {run.code_version()}"
    )
    print(f"{'step':<14} {'us per call':>12} {'calls per run':>14}")
    for _, _, step in STEPS:
        ns, calls = totals.get(step, (0, 0))
        if calls:
            print(f"{step:<14} {ns / calls / 1000:>12.2f} {calls / max(drain.done, 1):>14.2f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker_main()
    else:
        sys.exit(main())
