"""The event log against a real NATS JetStream server."""

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS

from contracts.envelope import Envelope, new_id
from services.backbone.errors import ConcurrencyError
from services.backbone.eventlog import EventLog


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    client = await nats.connect(nats_url)
    await EventLog(client).ensure_stream()
    yield client
    await client.drain()


def envelope(aggregate_id: str, n: int) -> Envelope:
    return Envelope(
        type="TestHappened",
        aggregate_type="app",
        aggregate_id=aggregate_id,
        account_id="acct_test",
        actor="test",
        correlation_id=new_id("cor"),
        data={"n": n},
    )


async def test_two_appends_at_one_version_exactly_one_wins(nats_url: str) -> None:
    aggregate = new_id("race")
    clients = [await nats.connect(nats_url) for _ in range(2)]
    logs = [EventLog(client) for client in clients]
    await logs[0].ensure_stream()
    try:
        for round_ in range(20):
            version = await logs[0].load("app", aggregate)
            position = version[-1].position if version else 0
            results = await asyncio.gather(
                *(
                    log.append([envelope(aggregate, round_)], position, new_id("cmd"))
                    for log in logs
                ),
                return_exceptions=True,
            )
            wins = [r for r in results if not isinstance(r, BaseException)]
            losses = [r for r in results if isinstance(r, ConcurrencyError)]
            assert (len(wins), len(losses)) == (1, 1), results
        assert len(await logs[0].load("app", aggregate)) == 20
    finally:
        for client in clients:
            await client.drain()


async def test_a_retried_command_is_stored_once(nc: NATS) -> None:
    events = EventLog(nc)
    aggregate = new_id("dedup")
    command_id = new_id("cmd")
    first = await events.append([envelope(aggregate, 1)], 0, command_id)
    again = await events.append([envelope(aggregate, 1)], 0, command_id)
    assert not first[0].duplicate
    assert again[0].duplicate and again[0].position == first[0].position
    assert [e.envelope.data for e in await events.load("app", aggregate)] == [{"n": 1}]


async def test_load_replays_only_its_own_subject_in_order(nc: NATS) -> None:
    events = EventLog(nc)
    mine, other = new_id("mine"), new_id("other")
    position, other_position = 0, 0
    for n in range(3):
        (theirs,) = await events.append(
            [envelope(other, n)], other_position, "c" + str(n) + other
        )
        other_position = theirs.position
        (appended,) = await events.append([envelope(mine, n)], position, new_id("c"))
        position = appended.position
    loaded = await events.load("app", mine)
    assert [e.envelope.data["n"] for e in loaded] == [0, 1, 2]
    assert loaded[-1].position == position
