"""The event log: one JetStream stream, one subject per aggregate instance.

Appends are checked: each carries the stream sequence of the aggregate's last
event as ``Nats-Expected-Last-Subject-Sequence`` and a ``Nats-Msg-Id`` derived
from the command, so a conflicting writer is refused (10071) and a retried
command is stored once.
"""

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import structlog
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import api
from nats.js.errors import APIError, BadRequestError, NotFoundError

from contracts.commands import Command
from contracts.envelope import AggregateType, Envelope
from contracts.events import Event
from contracts.subjects import EVENT_STREAM, EVENTS_ALL, aggregate_subject
from services.backbone.errors import ConcurrencyError, EventLogUnavailableError

log = structlog.get_logger(__name__)

WRONG_LAST_SEQUENCE = 10071
DUPLICATE_WINDOW_S = 15 * 60
T = TypeVar("T")


@dataclass(frozen=True)
class StoredEvent:
    """An envelope and where the log keeps it."""

    position: int
    envelope: Envelope


@dataclass(frozen=True)
class Appended:
    position: int
    duplicate: bool


def envelopes_for(
    command: Command,
    aggregate_type: AggregateType,
    aggregate_id: str,
    events: Sequence[Event],
) -> list[Envelope]:
    """Wrap a command's events; the command id becomes their causation id."""
    return [
        Envelope(
            type=event.type,  # type: ignore[attr-defined]
            aggregate_type=aggregate_type,
            aggregate_id=aggregate_id,
            account_id=command.account_id,
            actor=command.actor,
            correlation_id=command.correlation_id,
            causation_id=command.command_id,
            data=event.model_dump(mode="json"),
        )
        for event in events
    ]


class EventLog:
    """Load aggregates by replaying their subject; append with checks."""

    def __init__(self, nc: NATS, stream: str = EVENT_STREAM) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._stream = stream

    @property
    def stream(self) -> str:
        return self._stream

    async def ensure_stream(self, replicas: int = 1) -> None:
        """Create the stream if missing: file storage, kept forever."""
        config = api.StreamConfig(
            name=self._stream,
            subjects=[EVENTS_ALL],
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS,
            discard=api.DiscardPolicy.NEW,
            max_age=0,
            num_replicas=replicas,
            duplicate_window=DUPLICATE_WINDOW_S,
            allow_direct=True,
        )
        try:
            await self._js.stream_info(self._stream)
        except NotFoundError:
            await self._js.add_stream(config)
            log.info("event stream created", stream=self._stream, replicas=replicas)

    async def load(self, aggregate_type: str, aggregate_id: str) -> list[StoredEvent]:
        """Every event of one aggregate, oldest first."""
        subject = aggregate_subject(aggregate_type, aggregate_id)
        events: list[StoredEvent] = []
        seq = 1
        while True:
            try:
                raw = await self._js.get_msg(
                    self._stream, seq=seq, subject=subject, next=True
                )
            except NotFoundError:
                return events
            except (NatsTimeoutError, NoRespondersError) as exc:
                raise EventLogUnavailableError(f"could not read {subject}") from exc
            assert raw.seq is not None and raw.data is not None
            events.append(StoredEvent(raw.seq, Envelope.model_validate_json(raw.data)))
            seq = raw.seq + 1

    async def append(
        self, envelopes: Sequence[Envelope], expected_position: int, dedup_key: str
    ) -> list[Appended]:
        """Append events to one aggregate, the first checked at its position.

        Each later event is checked against the one appended just before it,
        so a batch interleaved with another writer fails part-way rather than
        silently; deciding again from a reload is then correct.
        """
        appended: list[Appended] = []
        position = expected_position
        for index, envelope in enumerate(envelopes):
            subject = aggregate_subject(envelope.aggregate_type, envelope.aggregate_id)
            msg_id = f"{dedup_key}:{index}"
            headers = {
                "Nats-Msg-Id": msg_id,
                "Nats-Expected-Last-Subject-Sequence": str(position),
                "Crabglamp-Event-Type": envelope.type,
            }
            try:
                ack = await self._js.publish(
                    subject,
                    envelope.model_dump_json().encode(),
                    stream=self._stream,
                    headers=headers,
                )
            except APIError as exc:
                if exc.err_code == WRONG_LAST_SEQUENCE:
                    ours = await self._taken_by(subject, position, msg_id)
                    if ours is not None:
                        appended.append(Appended(ours, duplicate=True))
                        position = ours
                        continue
                    raise ConcurrencyError(
                        f"{subject} moved past position {position}"
                    ) from exc
                raise EventLogUnavailableError(f"append to {subject} refused") from exc
            except (NatsTimeoutError, NoRespondersError) as exc:
                raise EventLogUnavailableError(
                    f"append to {subject} timed out"
                ) from exc
            appended.append(Appended(ack.seq, bool(ack.duplicate)))
            position = ack.seq
        return appended

    async def _taken_by(self, subject: str, position: int, msg_id: str) -> int | None:
        """The position of our own earlier write in the slot, if it is ours.

        The server checks the expected sequence before the duplicate window,
        so a resent append (its first ack lost) fails as a conflict; the event
        right after ``position`` tells whether that write was in fact ours.
        """
        try:
            raw = await self._js.get_msg(
                self._stream, seq=position + 1, subject=subject, next=True
            )
        except NotFoundError:
            return None
        if raw.headers and raw.headers.get("Nats-Msg-Id") == msg_id:
            return raw.seq
        return None

    async def record(
        self,
        command: Command,
        aggregate_type: AggregateType,
        aggregate_id: str,
        version: int,
        events: Sequence[Event],
    ) -> int:
        """Append a command's events at ``version``; the position after them."""
        envelopes = envelopes_for(command, aggregate_type, aggregate_id, events)
        # One command may write several aggregates, or one twice (claim, then
        # undo): the key names the slot, so only a true resend is a duplicate.
        dedup_key = f"{command.command_id}/{aggregate_type}.{aggregate_id}@{version}"
        appended = await self.append(envelopes, version, dedup_key)
        return appended[-1].position if appended else version

    async def last_position(self) -> int:
        """The stream's last sequence: how far a caught-up reader must be."""
        try:
            info = await self._js.stream_info(self._stream)
        except (NotFoundError, BadRequestError):
            return 0
        return int(info.state.last_seq)


async def with_retries(
    attempt: Callable[[], Awaitable[T]], *, attempts: int = 5, what: str
) -> T:
    """Run load-decide-append again while another writer wins the race."""
    for number in range(1, attempts + 1):
        try:
            return await attempt()
        except ConcurrencyError:
            if number == attempts:
                raise
            log.warning("append conflict, deciding again", what=what, attempt=number)
    raise AssertionError("unreachable")
