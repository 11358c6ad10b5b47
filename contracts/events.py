"""Domain events: past-tense facts, one model per event type and version.

Events carry no secret in clear: a credential's secret travels only as
``SealedSecret``, which needs the credential's data key to open.
"""

from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from contracts.errors import RegistryError


class Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    schema_version: int = 1


class SealedSecret(BaseModel):
    """AES-256-GCM ciphertext of a secret under the credential's data key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key_version: int
    nonce: str
    ciphertext: str


class AppRef(BaseModel):
    model_config = ConfigDict(frozen=True)
    id: str
    name: str


class AccountCreated(Event):
    type: Literal["AccountCreated"] = "AccountCreated"
    account_id: str
    name: str
    token_sha256: str


class CredentialAdded(Event):
    type: Literal["CredentialAdded"] = "CredentialAdded"
    credential_id: str
    account_id: str
    name: str
    registry: str
    username: str
    secret_hint: str
    sealed_secret: SealedSecret
    verified_at: AwareDatetime
    expires_at: AwareDatetime | None = None


class CredentialUpdated(Event):
    type: Literal["CredentialUpdated"] = "CredentialUpdated"
    credential_id: str
    name: str
    username: str
    secret_hint: str
    sealed_secret: SealedSecret
    verified_at: AwareDatetime
    expires_at: AwareDatetime | None = None


class CredentialRejected(Event):
    """An add or update the registry refused: kept for the audit log."""

    type: Literal["CredentialRejected"] = "CredentialRejected"
    credential_id: str
    account_id: str
    attempt: Literal["add", "update"]
    registry: str
    username: str
    error: RegistryError


class CredentialAttached(Event):
    type: Literal["CredentialAttached"] = "CredentialAttached"
    credential_id: str
    app: AppRef


class CredentialDetached(Event):
    type: Literal["CredentialDetached"] = "CredentialDetached"
    credential_id: str
    app_id: str


class CredentialDeleted(Event):
    type: Literal["CredentialDeleted"] = "CredentialDeleted"
    credential_id: str


class CredentialDeleteRefused(Event):
    type: Literal["CredentialDeleteRefused"] = "CredentialDeleteRefused"
    credential_id: str
    apps: list[AppRef]


DomainEvent = Annotated[
    AccountCreated
    | CredentialAdded
    | CredentialUpdated
    | CredentialRejected
    | CredentialAttached
    | CredentialDetached
    | CredentialDeleted
    | CredentialDeleteRefused,
    Field(discriminator="type"),
]

EVENT_TYPES: dict[str, type[Event]] = {
    model.model_fields["type"].default: model
    for model in (
        AccountCreated,
        CredentialAdded,
        CredentialUpdated,
        CredentialRejected,
        CredentialAttached,
        CredentialDetached,
        CredentialDeleted,
        CredentialDeleteRefused,
    )
}


def parse_event(type_: str, data: dict[str, Any]) -> Event | None:
    """Build the typed event from an envelope's ``type`` and ``data``.

    ``None`` for a type this version does not know, so readers written
    before a new event type existed skip it instead of stopping.
    """
    model = EVENT_TYPES.get(type_)
    return None if model is None else model.model_validate(data)
