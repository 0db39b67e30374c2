"""Throughput benchmarks against the real RabbitMQ: run ``python -m benchmarks.run``."""
