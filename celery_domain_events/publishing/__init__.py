"""The publishing side (any process): ``emit()`` buffers, ``transmit()`` publishes confirmed.

``buffer`` (the context-local buffer, a leaf), ``send`` (events to messages, published through
the app's transport), ``task_scope`` (events of a Celery task leave when it succeeds) and
``api`` (``emit``, ``transmit``, ``discard``, ``scope``). Never imports the worker side.
"""
