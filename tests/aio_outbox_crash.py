"""A process that commits events to the async outbox, then dies by SIGKILL (a power cut).

``python -m tests.aio_outbox_crash after-commit``: killed after the business commit, before any
relay ran. ``... in-relay``: killed by the relay after RabbitMQ confirmed, before its DELETE.
Configured by the environment (see tests/test_sqlalchemy_async.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import sqlalchemy as sa
from celery import Celery
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from celery_domain_events import DomainEvents
from celery_domain_events.contrib.outbox import Outbox


async def main(mode: str) -> None:
    app = Celery("crash", broker=os.environ["TEST_BROKER_URL"], set_as_current=False)
    app.conf.update(
        domain_events_exchange=os.environ["TEST_EXCHANGE"],
        domain_events_unrouted_queue=os.environ["TEST_UNROUTED"],
    )
    DomainEvents(app, service="crash")
    metadata = sa.MetaData()
    outbox = Outbox(DomainEvents.of(app), metadata, table_name=os.environ["TEST_OUTBOX_TABLE"])
    orders = sa.Table(os.environ["TEST_ORDERS_TABLE"], metadata, sa.Column("id", sa.Integer))
    engine = create_async_engine(os.environ["TEST_DB_URL"])
    maker = async_sessionmaker(engine, class_=AsyncSession)
    async with maker.begin() as session:
        for n in range(int(os.environ["TEST_EVENTS"])):
            await session.execute(sa.insert(orders).values(id=n))
            await outbox.add_async(session, "test.crash.order", {"n": n})
    sys.stdout.write("committed\n")
    sys.stdout.flush()
    if mode == "after-commit":
        os.kill(os.getpid(), signal.SIGKILL)

    async def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    await outbox.relay_once_async(engine, _after_publish=die)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
