"""The storefront: a FastAPI service on SQLAlchemy's asyncio ORM, publishing the shop's events."""
