"""A small client of the RabbitMQ management HTTP API (bindings and queue statistics).

AMQP cannot list bindings, so ``domain-events topology show/diff`` asks the management plugin
(``rabbitmq-plugins enable rabbitmq_management``). The URL defaults to port 15672 on the
broker's host with the broker's credentials, for a single broker on port 5672 (anything else
must set ``domain_events_management_url``).
Credentials never appear in errors or logs.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from kombu.utils.url import url_to_parts

from celery_domain_events.exceptions import ConfigurationError
from celery_domain_events.urls import default_management_url, redact, split

__all__ = ["ManagementClient"]


class ManagementClient:
    """Read bindings and queue statistics through the HTTP API (read-only)."""

    def __init__(self, url: str, vhost: str = "/", timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        self._auth = base64.b64encode(
            f"{unquote(parts.username or 'guest')}:{unquote(parts.password or 'guest')}".encode()
        ).decode()
        netloc = parts.hostname or "127.0.0.1"
        if parts.port:
            netloc += f":{parts.port}"
        self.base = urlunsplit((parts.scheme or "http", netloc, parts.path.rstrip("/"), "", ""))
        self.vhost = vhost
        self.timeout = timeout
        self.safe_url = redact(url)

    @classmethod
    def for_broker(cls, broker_url: str, management_url: str | None = None) -> ManagementClient:
        """Build a client for the broker at ``broker_url`` (its vhost; host and user too).

        Raises:
            ConfigurationError: no ``management_url`` and none can be guessed (see
                :func:`celery_domain_events.urls.default_management_url`).
        """
        first = split(broker_url)[0] if split(broker_url) else "amqp://127.0.0.1//"
        vhost = url_to_parts(first).path or "/"
        return cls(management_url or default_management_url(broker_url), vhost=vhost)

    def _request(self, method: str, path: str) -> Any:
        request = urllib.request.Request(
            f"{self.base}/api/{path}",
            method=method,
            headers={"Authorization": f"Basic {self._auth}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:  # noqa: PLR2004 (HTTP status)
                return None
            raise ConfigurationError(
                f"RabbitMQ management API at {self.safe_url} answered {exc.code} {exc.reason}"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            raise ConfigurationError(
                f"cannot reach the RabbitMQ management API at {self.safe_url} ({exc}); enable "
                "rabbitmq_management or set domain_events_management_url"
            ) from None
        try:
            return json.loads(body) if body else None
        except ValueError:
            raise ConfigurationError(
                f"the RabbitMQ management API at {self.safe_url} did not answer with JSON"
            ) from None

    def _vhost(self) -> str:
        return quote(self.vhost, safe="")

    def bindings_from(self, exchange: str) -> list[dict[str, Any]]:
        """Return the bindings whose source is ``exchange`` (empty if it does not exist)."""
        path = f"exchanges/{self._vhost()}/{quote(exchange, safe='')}/bindings/source"
        return list(self._request("GET", path) or [])

    def queue(self, name: str) -> dict[str, Any] | None:
        """Return the queue's statistics (messages, consumers, type), or None."""
        result = self._request("GET", f"queues/{self._vhost()}/{quote(name, safe='')}")
        return dict(result) if result else None
