"""For operators: the ``celery domain-events`` CLI, the AsyncAPI catalogue, the HTTP API."""
