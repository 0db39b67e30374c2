"""``domain_events_relay``."""
