"""kombu I/O: publishing with confirms under one deadline, declaring and reading queues.

``transport`` is the seam ``DomainEvents`` publishes through; ``confirm`` implements it on a
kombu connection; ``queues`` declares the topology and reads dead-letter queues.
"""
