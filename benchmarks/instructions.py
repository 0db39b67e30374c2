"""Instructions per task, counted by valgrind's callgrind: the noise-free side of the benchmark.

Throughput on a shared 2-core machine moves by 30% from one run to the next; the number of
instructions a process executes for the same work does not. ``python -m benchmarks.run
--instructions`` adds, side by side:

* (b) vs (c): instructions the **worker** (main process and pool children) executes per plain
  no-op task and per handler run, with the solo and the prefork pool.
* (d): instructions the **publishing process** executes per event for ``emit()`` +
  ``transmit()`` and for the raw batched-confirm publish of the same bodies.

Each process runs under ``valgrind --tool=callgrind --instr-atstart=no``: start-up (imports,
connecting, declaring) is not counted. Instrumentation is switched on with
``callgrind_control -i on`` once the process is ready, before any message is published, and off
once the work is done; then the counters are dumped. Counting covers user-space instructions
only: system calls and the broker's work are not in it, which is why this complements the
throughput table rather than replacing it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis
from celery import Celery
from kombu import Connection

from celery_domain_events import DomainEvents, emit, transmit
from celery_domain_events.wire import envelope

from .bench_app import EVENT_NAME, BenchHappened, build_app
from .run import (
    PAYLOAD,
    POOLS,
    PREPUBLISH_BATCH,
    ROOT,
    Bench,
    delete_entities,
    event_bodies,
    prepublish_tasks,
    raw_publish,
    run_env,
)

#: Handler runs (c) and tasks (b) counted per worker run; enough to drown the idle loop.
WORKER_N = 1000
#: Events counted per publishing run (d).
PUBLISH_N = 2000


@dataclass
class Count:
    """Instructions per unit of work in one run."""

    label: str
    units: int
    instructions: int

    @property
    def per_unit(self) -> float:
        return self.instructions / self.units


def available() -> bool:
    """Whether valgrind and callgrind_control are installed."""
    return all(
        subprocess.run(["which", tool], capture_output=True, check=False).returncode == 0
        for tool in ("valgrind", "callgrind_control")
    )


def _valgrind(out: Path) -> list[str]:
    return [
        "valgrind",
        "--tool=callgrind",
        "--trace-children=yes",  # prefork's pool processes
        "--instr-atstart=no",
        f"--callgrind-out-file={out}.%p",
    ]


def _tree(pid: int) -> list[int]:
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            pids += _tree(int(child))
    return pids


def _control(pids: list[int], *options: str) -> None:
    for pid in pids:
        subprocess.run(["callgrind_control", *options, str(pid)], check=True, capture_output=True)


def _total(out: Path) -> int:
    # One file per process (and per dump); each holds the totals of what it recorded.
    total = 0
    for path in out.parent.glob(out.name + ".*"):
        best = 0
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                best = max(best, int(line.split()[1]))
        total += best
    return total


def count_worker(b: Bench, mode: str, pool: str, n: int = WORKER_N) -> Count:
    """Instructions per completion of a real ``celery worker`` draining (b) or (c)."""
    uid = uuid.uuid4().hex[:8]
    env = run_env(b, uid, mode, 4)
    app = build_app(env)
    r = redis.Redis.from_url(b.redis_url)
    out = b.log_dir / f"callgrind.{mode}.{pool}.{uid}"
    log = b.log_dir / f"callgrind.{mode}.{pool}.{uid}.log"
    cmd = [
        *_valgrind(out),
        sys.executable,
        *("-m", "celery", "-A", "benchmarks.bench_app", "worker", "--loglevel", "WARNING"),
        *("--without-mingle", "--without-gossip", "--without-heartbeat"),
        *("--hostname", f"cg-{uid}@%h", *POOLS[pool]),
    ]
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 600
    try:
        _wait(lambda: r.get(f"{env['BENCH_KEY']}:ready") is not None, proc, deadline, log)
        time.sleep(1)  # let the pool processes settle
        pids = _tree(proc.pid)
        _control(pids, "-i", "on")
        expected = _fill(app, env, mode, n)
        _wait(lambda: int(r.get(env["BENCH_KEY"]) or 0) >= expected, proc, deadline, log)
        _control(pids, "-i", "off")
        _control(pids, "-d")
        return Count(f"{mode}.{pool}", expected, _total(out))
    finally:
        _stop(proc)
        _clean(b, app, env, r)


def _wait(
    done: Callable[[], bool], proc: subprocess.Popen[bytes], deadline: float, log: Path
) -> None:
    while not done():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the callgrind worker stopped or took too long; see {log}")
        time.sleep(0.5)


def _fill(app: Celery, env: dict[str, str], mode: str, n: int) -> int:
    """Publish the work (after instrumentation is on); return the completions to expect."""
    if mode == "plain":
        prepublish_tasks(app, env["BENCH_TASK_QUEUE"], n)
        return n
    handlers = len(DomainEvents.of(app).handlers)
    events = n // handlers
    for start in range(0, events, PREPUBLISH_BATCH):
        for seq in range(start, min(events, start + PREPUBLISH_BATCH)):
            emit(BenchHappened(seq=seq, payload=PAYLOAD))
        transmit(app)
    return events * handlers


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _clean(b: Bench, app: Celery, env: dict[str, str], r: redis.Redis) -> None:
    queues = [env["BENCH_TASK_QUEUE"], env["BENCH_UNROUTED"]]
    if env["BENCH_MODE"] == "events":
        ext = DomainEvents.of(app)
        for spec in ext.handlers:
            queues += [
                ext.topology.handler_queue_name(spec),
                ext.topology.handler_queue_name(spec) + ".dlq",
            ]
    exchange = env["BENCH_EXCHANGE"]
    delete_entities(
        b.broker_url,
        queues,
        [env["BENCH_TASK_QUEUE"], exchange, exchange + ".retry", env["BENCH_UNROUTED"]],
    )
    key = env["BENCH_KEY"]
    r.delete(key, f"{key}:times", f"{key}:ready")
    app.close()


def count_publish(b: Bench, which: str, n: int = PUBLISH_N) -> Count:
    """Instructions per event of the publishing process: ``transmit`` or ``raw`` (see (d))."""
    uid = uuid.uuid4().hex[:8]
    exchange, unrouted = f"bench.{uid}.events", f"bench.{uid}.unrouted"
    out = b.log_dir / f"callgrind.publish.{which}.{uid}"
    cmd = [
        *_valgrind(out),
        sys.executable,
        "-m",
        "benchmarks.instructions",
        which,
        str(n),
        b.broker_url,
        exchange,
        unrouted,
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    if proc.stdin is None or proc.stdout is None:
        raise RuntimeError("no pipes to the publisher")
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the {which} publisher did not start")
        _control([proc.pid], "-i", "on")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        if proc.stdout.readline().strip() != "done":
            raise RuntimeError(f"the {which} publisher failed")
        _control([proc.pid], "-i", "off")
        _control([proc.pid], "-d")
        proc.stdin.write("exit\n")
        proc.stdin.flush()
        proc.wait(timeout=120)
        return Count(f"publish.{which}", n, _total(out))
    finally:
        if proc.poll() is None:
            proc.kill()
        delete_entities(b.broker_url, [unrouted], [exchange, unrouted])


def _publisher(which: str, n: int, broker_url: str, exchange: str, unrouted: str) -> None:
    """The process count_publish() measures: warm up, then publish ``n`` events when told."""
    app = Celery("bench-publisher", broker=broker_url, set_as_current=False)
    service = "bpub"
    # Under callgrind a batch takes far longer than the default 10 s publish deadline.
    DomainEvents(
        app,
        service=service,
        handlers=[],
        exchange=exchange,
        unrouted_queue=unrouted,
        publish_timeout=600.0,
    )
    events = [BenchHappened(seq=i, payload=PAYLOAD) for i in range(n)]
    bodies = event_bodies(n, service)
    with Connection(broker_url) as conn:
        conn.connect()
        for event in events[:10]:  # declarations, pooled connection, confirm channel
            emit(event)
        transmit(app)
        raw_publish(conn, exchange, EVENT_NAME, bodies[:10], envelope.CONTENT_TYPE)
        print("ready", flush=True)
        sys.stdin.readline()
        if which == "transmit":
            for event in events:
                emit(event)
            transmit(app)
        else:
            raw_publish(conn, exchange, EVENT_NAME, bodies, envelope.CONTENT_TYPE)
        print("done", flush=True)
        sys.stdin.readline()
    app.close()


def run_instructions(b: Bench) -> list[tuple[str, float, float]]:
    """Count every pair once; return ``(title, baseline per unit, library per unit)`` rows."""
    rows = []
    for pool in POOLS:
        plain = count_worker(b, "plain", pool)
        b.say(f"instructions: plain {pool} {plain.per_unit:,.0f}/task")
        events = count_worker(b, "events", pool)
        b.say(f"instructions: events {pool} {events.per_unit:,.0f}/run")
        title = f"worker, {pool}: no-op task (b) vs handler run (c)"
        rows.append((title, plain.per_unit, events.per_unit))
    raw = count_publish(b, "raw")
    sent = count_publish(b, "transmit")
    rows.append(("publisher: raw publish vs emit()+transmit() (d)", raw.per_unit, sent.per_unit))
    return rows


def print_instructions(rows: list[tuple[str, float, float]]) -> None:
    print(
        f"\n{'instructions per unit (callgrind)':<52} {'baseline':>10} {'library':>10} "
        f"{'baseline/library':>17}"
    )
    for title, baseline, library in rows:
        print(f"{title:<52} {baseline:>10,.0f} {library:>10,.0f} {baseline / library:>17.2f}")


if __name__ == "__main__":
    _publisher(sys.argv[1], int(sys.argv[2]), *sys.argv[3:6])
