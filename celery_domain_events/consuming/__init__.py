"""The consuming side: handlers, the Celery task they run as, and the worker's bootsteps.

``handlers`` (``@domain_event_handler``) and ``task`` (retries, dead letters) are imported
wherever handlers are declared; ``bootstep`` and ``delivery`` only by a worker, which Celery
finds by the dotted path ``DomainEvents`` registers.
"""
