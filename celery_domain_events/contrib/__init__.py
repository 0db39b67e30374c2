"""Integrations with other frameworks; each module imports only its own optional dependency."""
