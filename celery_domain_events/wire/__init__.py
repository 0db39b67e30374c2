"""What is on the wire, as pure functions and values: no I/O, no Celery.

``envelope`` (CloudEvents JSON), ``topology`` (names, exchanges, queues, bindings), ``message``
(an outbound AMQP message), ``inbound`` (the checks an untrusted delivery must pass) and
``dead_letter`` (the failure record). Everything above this layer may use it.
"""
