"""The envelope every event travels in, on the log and to subscribers."""

from datetime import UTC, datetime
from typing import Any, Literal
from uuid import uuid4

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

AggregateType = Literal["credential", "app", "app_name", "account"]


def new_id(prefix: str) -> str:
    """An opaque id with a readable prefix, e.g. ``cred_1f0c…``."""
    return f"{prefix}_{uuid4().hex}"


def utc_now() -> datetime:
    return datetime.now(UTC)


class Envelope(BaseModel):
    """One event as written to the log: metadata around a typed payload."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: str = Field(default_factory=lambda: new_id("evt"))
    type: str
    schema_version: int = 1
    aggregate_type: AggregateType
    aggregate_id: str
    account_id: str
    actor: str
    occurred_at: AwareDatetime = Field(default_factory=utc_now)
    correlation_id: str
    causation_id: str | None = None
    data: dict[str, Any]
