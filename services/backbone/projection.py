"""Checkpointed projections: follow the event log into PostgreSQL tables.

A projection writes its rows and its stream position in one transaction, so a
redelivered event (position already covered) changes nothing and a restart
resumes exactly after the last committed event. The checkpoint in the
database is the authority: the durable consumer is recreated from it on
every start, which also makes a rebuild just "reset the checkpoint".
"""

import asyncio
import contextlib
import zlib
from collections.abc import Sequence
from typing import Protocol

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import api
from nats.js.errors import NotFoundError
from sqlalchemy import Table, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from contracts.envelope import Envelope
from contracts.subjects import EVENT_STREAM, EVENTS_ALL
from services.backbone.eventlog import StoredEvent

log = structlog.get_logger(__name__)


class Projector(Protocol):
    """Turns events into rows; must only touch ``conn``."""

    name: str
    tables: Sequence[Table]

    async def project(self, conn: AsyncConnection, event: StoredEvent) -> None: ...


async def read_checkpoint(conn: AsyncConnection, name: str) -> int:
    row = await conn.execute(
        text("select position from projection_checkpoints where name = :name"),
        {"name": name},
    )
    value = row.scalar_one_or_none()
    return int(value) if value is not None else 0


class ProjectionRunner:
    """Runs one projector against the stream until cancelled."""

    def __init__(
        self,
        nc: NATS,
        engine: AsyncEngine,
        projector: Projector,
        *,
        stream: str = EVENT_STREAM,
        batch: int = 256,
    ) -> None:
        self._js = nc.jetstream()
        self._engine = engine
        self._projector = projector
        self._stream = stream
        self._batch = batch
        self._durable = f"projection-{projector.name}"
        self._position = 0
        self._advanced = asyncio.Event()
        self.active = False

    @property
    def position(self) -> int:
        return self._position

    async def run_supervised(self, backoff_s: float = 2.0) -> None:
        """Run, and after a failure log it once and start again from the checkpoint."""
        while True:
            try:
                await self.run()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("projection failed", projection=self._projector.name)
                await asyncio.sleep(backoff_s)

    async def run(self) -> None:
        """Hold the projection's lock, then follow the stream forever."""
        async with self._engine.connect() as lock_conn:
            await self._acquire_lock(lock_conn)
            self.active = True
            try:
                await self._follow()
            finally:
                self.active = False
                # A session lock outlives a pooled connection: close it instead.
                await lock_conn.invalidate()

    async def _acquire_lock(self, conn: AsyncConnection) -> None:
        # One writer per projection across replicas; the others stand by.
        key = zlib.crc32(self._durable.encode())
        while True:
            got = await conn.execute(
                text("select pg_try_advisory_lock(:key)"), {"key": key}
            )
            if got.scalar_one():
                return
            await asyncio.sleep(1.0)

    async def _follow(self) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                text(
                    "insert into projection_checkpoints (name, position)"
                    " values (:name, 0) on conflict (name) do nothing"
                ),
                {"name": self._projector.name},
            )
            self._position = await read_checkpoint(conn, self._projector.name)
        await self._recreate_consumer(self._position + 1)
        sub = await self._js.pull_subscribe_bind(
            durable=self._durable, stream=self._stream
        )
        log.info(
            "projection following",
            projection=self._projector.name,
            after=self._position,
        )
        try:
            while True:
                try:
                    messages = await sub.fetch(self._batch, timeout=1.0)
                except NatsTimeoutError:
                    continue
                await self._apply(messages)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _recreate_consumer(self, start: int) -> None:
        with contextlib.suppress(NotFoundError):
            await self._js.delete_consumer(self._stream, self._durable)
        await self._js.add_consumer(
            self._stream,
            api.ConsumerConfig(
                durable_name=self._durable,
                filter_subject=EVENTS_ALL,
                ack_policy=api.AckPolicy.EXPLICIT,
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=start,
                max_ack_pending=4 * self._batch,
                ack_wait=60,
            ),
        )

    async def _apply(self, messages: list[Msg]) -> None:
        # Rows and position commit together: a redelivery is skipped here.
        async with self._engine.begin() as conn:
            position = await read_checkpoint(conn, self._projector.name)
            for message in messages:
                seq = message.metadata.sequence.stream
                if seq <= position:
                    continue
                event = StoredEvent(seq, Envelope.model_validate_json(message.data))
                await self._projector.project(conn, event)
                position = seq
            await conn.execute(
                text(
                    "update projection_checkpoints set position = :position"
                    " where name = :name"
                ),
                {"position": position, "name": self._projector.name},
            )
        await self._acknowledge(messages)
        log.debug("projected", projection=self._projector.name, position=position)
        self._position = position
        self._advanced.set()
        self._advanced = asyncio.Event()

    async def _acknowledge(self, messages: list[Msg]) -> None:
        for message in messages:
            await message.ack()

    async def wait_for(self, position: int, timeout_s: float) -> bool:
        """Wait, bounded, until the read model includes ``position``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._position < position:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            if not self.active:
                # Another replica holds the lock: read its checkpoint.
                async with self._engine.connect() as conn:
                    self._position = await read_checkpoint(conn, self._projector.name)
                await asyncio.sleep(min(0.05, remaining))
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._advanced.wait(), remaining)
        return True
