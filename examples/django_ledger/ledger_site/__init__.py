"""The ledger service's Django project.

Importing the Celery app here (as the Celery docs' "First steps with Django" recommend) makes
it the current app as soon as Django starts, so ``@shared_task`` and the domain event handlers
bind to it in every process: web, worker and management commands.
"""

from .celery import app as celery_app

__all__ = ("celery_app",)
