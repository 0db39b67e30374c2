"""Management commands of the domain events Django app."""
