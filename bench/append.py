"""Append path: checked, deduplicated appends ÷ raw nats-py publishes.

Both write the same payloads, one at a time (each waits for its ack), to the
same JetStream stream on the same embedded server, in one process run.
"""

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import nats

from contracts.envelope import Envelope, new_id
from contracts.subjects import EVENT_STREAM, aggregate_subject
from services.backbone.embedded import EmbeddedNats
from services.backbone.eventlog import EventLog

EVENTS = 2000
ROUNDS = 3


def payloads(aggregate_id: str) -> list[Envelope]:
    return [
        Envelope(
            type="BenchHappened",
            aggregate_type="app",
            aggregate_id=aggregate_id,
            account_id="acct_bench",
            actor="bench",
            correlation_id=new_id("cor"),
            data={"n": n, "text": "x" * 200},
        )
        for n in range(EVENTS)
    ]


async def ours(events: EventLog) -> float:
    aggregate = new_id("bench")
    envelopes = payloads(aggregate)
    started = time.perf_counter()
    position = 0
    for envelope in envelopes:
        (appended,) = await events.append([envelope], position, new_id("cmd"))
        position = appended.position
    return time.perf_counter() - started


async def raw(nc: nats.NATS) -> float:
    js = nc.jetstream()
    aggregate = new_id("bench")
    subject = aggregate_subject("app", aggregate)
    bodies = [envelope.model_dump_json().encode() for envelope in payloads(aggregate)]
    started = time.perf_counter()
    for body in bodies:
        await js.publish(subject, body, stream=EVENT_STREAM)
    return time.perf_counter() - started


async def main() -> None:
    with (
        tempfile.TemporaryDirectory() as directory,
        EmbeddedNats(Path(directory)) as server,
    ):
        nc = await nats.connect(server.url)
        events = EventLog(nc)
        await events.ensure_stream()
        await ours(events)  # warm up both paths
        await raw(nc)
        ours_s = [await ours(events) for _ in range(ROUNDS)]
        raw_s = [await raw(nc) for _ in range(ROUNDS)]
        await nc.drain()
    ours_rate = EVENTS / statistics.median(ours_s)
    raw_rate = EVENTS / statistics.median(raw_s)
    print(f"append (checked, dedup): {ours_rate:,.0f} events/s")
    print(f"raw js.publish:          {raw_rate:,.0f} events/s")
    print(f"ratio time ours/raw:     {raw_rate / ours_rate:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
