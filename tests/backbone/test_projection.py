"""Checkpointed projections against real NATS and PostgreSQL."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import api
from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    MetaData,
    String,
    Table,
    func,
    select,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from contracts.envelope import Envelope, new_id
from contracts.subjects import EVENT_STREAM
from services.backbone.eventlog import EventLog, StoredEvent
from services.backbone.projection import ProjectionRunner
from services.gateway.migrate import upgrade

metadata = MetaData()
rows = Table(
    "test_projection_rows",
    metadata,
    Column("position", BigInteger, primary_key=True),
    Column("aggregate_id", String(80), nullable=False),
    Column("n", Integer, nullable=False),
)


class CountingProjector:
    """Writes one row per event of its own aggregate; may crash on one ``n``."""

    tables: Sequence[Table] = (rows,)

    def __init__(self, aggregate_id: str, crash_at: int | None = None) -> None:
        self.name = f"test_{aggregate_id}"[:64]
        self.aggregate_id = aggregate_id
        self.crash_at = crash_at

    async def project(self, conn: AsyncConnection, event: StoredEvent) -> None:
        if event.envelope.aggregate_id != self.aggregate_id:
            return
        n = int(event.envelope.data["n"])
        if n == self.crash_at:
            raise RuntimeError("projector crashed")
        await conn.execute(
            rows.insert().values(
                position=event.position, aggregate_id=self.aggregate_id, n=n
            )
        )


@pytest.fixture(scope="module")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    await asyncio.to_thread(upgrade, database_url)
    engine = create_async_engine(database_url)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    yield engine
    await engine.dispose()


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    client = await nats.connect(nats_url)
    await EventLog(client).ensure_stream()
    yield client
    await client.drain()


async def write(nc: NATS, aggregate_id: str, count: int) -> int:
    events = EventLog(nc)
    position = 0
    for n in range(count):
        env = Envelope(
            type="TestHappened",
            aggregate_type="app",
            aggregate_id=aggregate_id,
            account_id="acct_test",
            actor="test",
            correlation_id=new_id("cor"),
            data={"n": n},
        )
        (appended,) = await events.append([env], position, new_id("cmd"))
        position = appended.position
    return position


async def projected(engine: AsyncEngine, aggregate_id: str) -> list[int]:
    async with engine.connect() as conn:
        result = await conn.execute(
            select(rows.c.n)
            .where(rows.c.aggregate_id == aggregate_id)
            .order_by(rows.c.n)
        )
        return list(result.scalars())


async def run_until(runner: ProjectionRunner, position: int) -> None:
    task = asyncio.create_task(runner.run())
    try:
        assert await runner.wait_for(position, 10), "projection did not catch up"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_redelivered_batch_is_applied_once(
    nc: NATS, engine: AsyncEngine
) -> None:
    aggregate = new_id("redeliver")
    last = await write(nc, aggregate, 3)
    runner = ProjectionRunner(nc, engine, CountingProjector(aggregate))
    await run_until(runner, last)

    # Deliver the same events again, twice, as JetStream does when acks are lost.
    js = nc.jetstream()
    for _ in range(2):
        sub = await js.pull_subscribe(
            f"crabglamp.events.app.{aggregate}",
            durable=None,
            stream=EVENT_STREAM,
            config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL),
        )
        await runner._apply(await sub.fetch(3, timeout=5))
        await sub.unsubscribe()
    assert await projected(engine, aggregate) == [0, 1, 2]


async def test_a_crashed_projection_resumes_at_its_checkpoint(
    nc: NATS, engine: AsyncEngine
) -> None:
    aggregate = new_id("resume")
    first = await write(nc, aggregate, 4)
    await run_until(ProjectionRunner(nc, engine, CountingProjector(aggregate)), first)
    assert await projected(engine, aggregate) == [0, 1, 2, 3]

    # More events arrive; the projector dies on one of them mid-stream.
    events = EventLog(nc)
    position = first
    for n in range(4, 8):
        env = Envelope(
            type="TestHappened",
            aggregate_type="app",
            aggregate_id=aggregate,
            account_id="acct_test",
            actor="test",
            correlation_id=new_id("cor"),
            data={"n": n},
        )
        (appended,) = await events.append([env], position, new_id("cmd"))
        position = appended.position
    crashing = ProjectionRunner(nc, engine, CountingProjector(aggregate, crash_at=6))
    with pytest.raises(RuntimeError, match="projector crashed"):
        await asyncio.wait_for(crashing.run(), 10)
    assert 6 not in await projected(engine, aggregate)

    # A restart carries on from the committed checkpoint, nothing doubled.
    await run_until(
        ProjectionRunner(nc, engine, CountingProjector(aggregate)), position
    )
    assert await projected(engine, aggregate) == list(range(8))
    async with engine.connect() as conn:
        total = await conn.execute(
            select(func.count())
            .select_from(rows)
            .where(rows.c.aggregate_id == aggregate)
        )
        assert total.scalar_one() == 8
