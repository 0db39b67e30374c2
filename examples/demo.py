"""End-to-end demo: a real `celery worker` runs the shop's handlers while we publish events.

Run it with ``./scripts/demo`` (which installs everything first) or ``python -m examples.demo``.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

from .shop import foreign, publish

#: user.created -> send_welcome_email + audit_trail, order.paid -> book_revenue + audit_trail,
#: user.disabled -> audit_trail; the foreign producer's user.created -> 2 more. Its task
#: message is dead-lettered by both handlers bound to user.created, never run.
EXPECTED_HANDLED = 7
EXPECTED_POISON = 2


def start_worker() -> tuple[subprocess.Popen[str], queue.Queue[str]]:
    cmd = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "examples.shop.app",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        "2",
        "--loglevel",
        "INFO",
        "--without-mingle",
        "--without-gossip",
        "--hostname",
        f"demo-{os.getpid()}@%h",
    ]
    print("$", " ".join(cmd[2:]), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip())

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def wait_for_lines(
    lines: queue.Queue[str], expected: dict[str, int], timeout: float
) -> dict[str, int]:
    """Echo the worker's interesting lines until each marker was seen as often as expected."""
    seen = dict.fromkeys(expected, 0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        if "Domain events:" in line or "HANDLED" in line or "ERROR" in line or "Poison" in line:
            print("  worker |", line.split("] ", 1)[-1], flush=True)
        for marker in expected:
            if marker in line:
                seen[marker] += 1
        if all(seen[marker] >= count for marker, count in expected.items()):
            break
    return seen


def main() -> int:
    proc, lines = start_worker()
    try:
        if not wait_for_lines(lines, {" ready.": 1}, timeout=60)[" ready."]:
            print("the worker did not start; is RabbitMQ running?", file=sys.stderr)
            return 1
        publish.main()
        foreign.main()
        # The poison lines are awaited too: a worker stopped after the last handler run
        # may not have logged the second dead-lettered task message yet.
        seen = wait_for_lines(lines, {"HANDLED": EXPECTED_HANDLED, "Poison": EXPECTED_POISON}, 60)
        print(f"{seen['HANDLED']} of {EXPECTED_HANDLED} handler runs seen", flush=True)
        return 0 if seen["HANDLED"] >= EXPECTED_HANDLED else 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
