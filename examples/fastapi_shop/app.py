"""The storefront: FastAPI + SQLAlchemy ``AsyncSession`` + PostgreSQL, publishing domain events.

Run it (RabbitMQ and PostgreSQL on their default ports), and a shop worker to handle its events::

    .venv/bin/uvicorn examples.fastapi_shop.app:api
    .venv/bin/celery -A examples.shop.app worker
    curl -X POST localhost:8000/users -H 'content-type: application/json' \\
        -d '{"email": "ada@example.com"}'

Two ways to publish:

* ``POST /users``: the event rides on the session; ``await session.commit()`` publishes it with
  confirms (aio-pika), so the response goes out once RabbitMQ has it. If the broker cannot
  confirm in time, the user is committed anyway and its events go to the outbox instead.
* ``POST /orders/{id}/payment``: the event is an outbox row in the payment's transaction; the
  relay task of this process publishes it (woken at once, and every second).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Annotated, Any

import sqlalchemy as sa
from celery import Celery
from fastapi import Depends, FastAPI, Request, Response, status
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from celery_domain_events import DomainEvents, PublishError
from celery_domain_events.contrib import sqlalchemy as events_sa
from celery_domain_events.contrib.outbox import Outbox
from examples.shop.events import OrderPaid, UserCreated

DEFAULTS = {
    "broker_url": "amqp://guest:guest@127.0.0.1:5672//",
    "db_url": "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "exchange": "domain_events",
    "service": "storefront",
    "table_prefix": "storefront_",
}


class Storefront:
    """What the endpoints share: the Celery app, the database and the outbox with its relay."""

    def __init__(self, conf: dict[str, str]) -> None:
        self.celery_app = Celery("storefront", broker=conf["broker_url"], set_as_current=False)
        self.celery_app.conf.update(domain_events_exchange=conf["exchange"])
        self.events = DomainEvents(
            self.celery_app, service=conf["service"], discover_handlers=False
        )
        self.metadata = sa.MetaData()
        prefix = conf["table_prefix"]
        self.users = sa.Table(
            f"{prefix}users",
            self.metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("email", sa.String(200), nullable=False),
        )
        self.payments = sa.Table(
            f"{prefix}payments",
            self.metadata,
            sa.Column("order_id", sa.Integer, primary_key=True),
            sa.Column("amount", sa.Numeric(12, 2), nullable=False),
        )
        self.outbox = Outbox(self.events, self.metadata, table_name=f"{prefix}outbox")
        self.engine = create_async_engine(conf["db_url"])
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        events_sa.install(self.sessions, self.celery_app)  # a commit publishes its events
        self.relay_now = asyncio.Event()

    async def relay(self, stop: asyncio.Event) -> None:
        """Publish the outbox whenever woken, and every second; until ``stop`` is set."""
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.relay_now.wait(), 1.0)
            self.relay_now.clear()
            with contextlib.suppress(PublishError):  # logged; the rows wait for the next pass
                while await self.outbox.relay_once_async(self.engine):
                    pass

    @contextlib.asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        """Create the tables, relay while the service runs, then close the connections."""
        async with self.engine.begin() as conn:
            await conn.run_sync(self.metadata.create_all)
        stop = asyncio.Event()
        relaying = asyncio.create_task(self.relay(stop))
        try:
            yield
        finally:
            stop.set()
            self.relay_now.set()
            await relaying
            await self.engine.dispose()
            await self.events.aclose()


def storefront(request: Request) -> Storefront:
    """The service's :class:`Storefront` (a FastAPI dependency)."""
    shop: Storefront = request.app.state.storefront
    return shop


Shop = Annotated[Storefront, Depends(storefront)]


class NewUser(BaseModel):
    email: str


class Payment(BaseModel):
    amount: Decimal


async def create_user(body: NewUser, response: Response, shop: Shop) -> dict[str, Any]:
    """Create a user; ``user.created`` is confirmed by RabbitMQ before the response."""
    try:
        async with shop.sessions.begin() as session:
            insert = sa.insert(shop.users).values(email=body.email).returning(shop.users.c.id)
            user_id = (await session.execute(insert)).scalar_one()
            event = events_sa.emit_with(session, UserCreated(user_id=user_id, email=body.email))
    except PublishError as exc:
        # Committed, but the broker did not confirm in time: the outbox keeps the events.
        async with shop.sessions.begin() as session:
            for unsent in exc.events:
                await shop.outbox.add_async(session, unsent)
        shop.relay_now.set()
        response.status_code = status.HTTP_202_ACCEPTED
        return {"user_id": user_id, "event_id": str(event.event_id), "published": False}
    return {"user_id": user_id, "event_id": str(event.event_id), "published": True}


async def pay(order_id: int, body: Payment, shop: Shop) -> dict[str, Any]:
    """Record a payment; ``order.paid`` is written to the outbox in the same transaction."""
    async with shop.sessions.begin() as session:
        await session.execute(
            sa.insert(shop.payments).values(order_id=order_id, amount=body.amount)
        )
        event = await shop.outbox.add_async(
            session, OrderPaid(order_id=order_id, amount=body.amount)
        )
    shop.relay_now.set()
    return {"order_id": order_id, "event_id": str(event.event_id)}


async def health() -> dict[str, str]:
    """Answer while anything else is slow: nothing here waits for the broker."""
    return {"status": "ok"}


def create_app(**options: str) -> FastAPI:
    """Build the service; ``options`` override :data:`DEFAULTS` and the ``STOREFRONT_*`` env."""
    conf = {
        key: options.get(key) or os.environ.get(f"STOREFRONT_{key.upper()}", default)
        for key, default in DEFAULTS.items()
    }
    shop = Storefront(conf)
    api = FastAPI(title="storefront", lifespan=shop.lifespan)
    api.state.storefront = shop
    api.post("/users", status_code=status.HTTP_201_CREATED)(create_user)
    api.post("/orders/{order_id}/payment", status_code=status.HTTP_202_ACCEPTED)(pay)
    api.get("/health")(health)
    return api


api = create_app()
