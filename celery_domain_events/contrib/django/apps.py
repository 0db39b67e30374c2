"""The Django app ``celery_domain_events.contrib.django``: the outbox model, admin and relay."""

from __future__ import annotations

from django.apps import AppConfig

__all__ = ["DomainEventsConfig"]


class DomainEventsConfig(AppConfig):
    """Add ``"celery_domain_events.contrib.django"`` to ``INSTALLED_APPS`` for the outbox."""

    name = "celery_domain_events.contrib.django"
    label = "domain_events"
    verbose_name = "Domain events"
    default_auto_field = "django.db.models.BigAutoField"
