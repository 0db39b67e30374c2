"""Private RabbitMQ nodes for tests that stop a broker or need a cluster.

Tests never stop, restart or reconfigure the broker the suite runs against (it may be a
developer's own). A test that needs a broker failure starts its own node here: its own
``RABBITMQ_NODENAME``, AMQP and distribution ports, data and log directories (owned by the
``rabbitmq`` user when run as root), no plugins, and stops it afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from kombu import Connection

__all__ = ["RabbitNode", "free_port", "node_support"]


def free_port() -> int:
    """A TCP port nothing listens on now (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_support() -> str | None:
    """Why private nodes cannot run here, or None when they can."""
    if shutil.which("rabbitmq-server") is None or shutil.which("rabbitmqctl") is None:
        return "rabbitmq-server is not installed on this machine"
    if os.geteuid() != 0:
        return "starting a private RabbitMQ node needs root (its files belong to 'rabbitmq')"
    return None


class RabbitNode:
    """One RabbitMQ node of our own on 127.0.0.1, started with ``start()``."""

    def __init__(self, name: str, base: Path | None = None) -> None:
        self.name = name
        self.node = f"{name}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base))
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
        }

    def ctl(self, *args: str, timeout: float = 120) -> str:
        """Run ``rabbitmqctl -n <this node> ARGS`` and return its output."""
        result = subprocess.run(
            ["rabbitmqctl", "-n", self.node, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {result.stdout}{result.stderr}")
        return result.stdout

    def start(self) -> RabbitNode:
        """Boot the node and wait until it accepts AMQP connections."""
        (self.dir / "mnesia").mkdir(exist_ok=True)
        (self.dir / "log").mkdir(exist_ok=True)
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {self.port}\nloopback_users = none\n"
        )
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(self.dir)], check=True)
        subprocess.run(
            ["rabbitmq-server", "-detached"], env=self._env(), check=True, capture_output=True
        )
        self._await_startup()
        return self

    def _await_startup(self, timeout: float = 90) -> None:
        # The node registers with epmd a moment after -detached returns.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ctl("await_startup", "--timeout", "60", timeout=90)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        self.wait_for_port()

    def wait_for_port(self, timeout: float = 60) -> None:
        """Wait until the AMQP port accepts connections."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"{self.node} did not open port {self.port}")

    def wait_for_queue(self, queue: str, timeout: float = 60) -> None:
        """Wait until a new AMQP connection can declare ``queue`` passively (it is recovered).

        A restarted node accepts connections before a durable queue with many messages is
        back; publishes routed to it wait for it, which a publisher's deadline may not cover.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                # A recovering queue may not answer: bound the wait for its reply too.
                options = {"read_timeout": 10, "write_timeout": 10}
                with Connection(self.url, connect_timeout=5, transport_options=options) as conn:
                    conn.default_channel.queue_declare(queue, passive=True)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the node's log files, for a failing test's message."""
        tails = []
        for log in sorted((self.dir / "log").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"== {log.name}\n" + "\n".join(text))
        return "\n".join(tails)

    def stop_app(self) -> None:
        """Stop the RabbitMQ application (connections drop; the node stays up)."""
        self.ctl("stop_app")

    def start_app(self) -> None:
        """Start the application again and wait for it."""
        self.ctl("start_app")
        self._await_startup()

    def stop(self) -> None:
        """Halt the node (killing it if it does not answer) and remove its files."""
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.ctl("stop", timeout=60)
        for pid in self._pids():  # whatever is left of it, even if it never finished booting
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _pids(self) -> list[int]:
        # The node's name is in its environment, not on its command line.
        marker = f"RABBITMQ_NODENAME={self.node}".encode()
        pids = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if marker in environ.read_bytes().split(b"\0"):
                    pids.append(int(environ.parent.name))
            except OSError:
                continue
        return pids
