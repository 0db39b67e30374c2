"""The Celery app the Django integration publishes with, when a call names none."""

from __future__ import annotations

from celery import Celery
from celery import current_app as _current_app
from django.conf import settings
from django.utils.module_loading import import_string

from celery_domain_events.exceptions import ConfigurationError

__all__ = ["resolve_app"]


def resolve_app(app: Celery | None) -> Celery:
    """Return ``app``, else the app named by ``DOMAIN_EVENTS_CELERY_APP``, else the current app.

    Raises:
        ConfigurationError: the setting does not name a Celery app.
    """
    if app is not None:
        return app
    path = getattr(settings, "DOMAIN_EVENTS_CELERY_APP", None)
    if path is None:
        return _current_app
    try:
        named = import_string(path)
    except ImportError as exc:
        raise ConfigurationError(f"DOMAIN_EVENTS_CELERY_APP={path!r}: {exc}") from exc
    if not isinstance(named, Celery):
        raise ConfigurationError(f"DOMAIN_EVENTS_CELERY_APP={path!r} is not a Celery app")
    return named
