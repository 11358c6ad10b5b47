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


class AppCreated(Event):
    type: Literal["AppCreated"] = "AppCreated"
    app_id: str
    account_id: str
    name: str
    image: str
    digest: str
    platform_digest: str | None = None
    credential_id: str | None
    port: int
    warnings: list[str] = []


class AppCreateRejected(Event):
    """A creation refused before the App existed: kept for the audit log."""

    type: Literal["AppCreateRejected"] = "AppCreateRejected"
    app_id: str
    account_id: str
    name: str
    image: str
    code: str
    detail: str
    error: RegistryError | None = None
    platforms: list[str] = []


class AppCredentialChanged(Event):
    type: Literal["AppCredentialChanged"] = "AppCredentialChanged"
    app_id: str
    credential_id: str
    previous_credential_id: str | None
    digest: str


class AppDeleted(Event):
    type: Literal["AppDeleted"] = "AppDeleted"
    app_id: str


class DeployRequested(Event):
    type: Literal["DeployRequested"] = "DeployRequested"
    deploy_id: str
    app_id: str
    reason: Literal["create", "credential_changed", "redeploy", "restore"]
    credential_id: str | None


class DeployStarted(Event):
    type: Literal["DeployStarted"] = "DeployStarted"
    deploy_id: str
    app_id: str
    attempt: int = 1


class ImagePulled(Event):
    type: Literal["ImagePulled"] = "ImagePulled"
    deploy_id: str
    app_id: str
    digest: str
    platform_digest: str | None
    bytes_fetched: int
    bytes_total: int
    pull_ms: int
    unpack_ms: int


class VmBooted(Event):
    type: Literal["VmBooted"] = "VmBooted"
    deploy_id: str
    app_id: str
    url: str
    boot_ms: int


class DeploySucceeded(Event):
    type: Literal["DeploySucceeded"] = "DeploySucceeded"
    deploy_id: str
    app_id: str
    digest: str
    url: str
    stages: dict[str, int]


class DeployError(BaseModel):
    """Why a deploy failed: the stage, our code, and the registry's words."""

    model_config = ConfigDict(frozen=True)

    stage: Literal["resolve", "pull", "unpack", "boot"]
    code: str
    registry_status: int | None = None
    registry_code: str | None = None
    registry_message: str | None = None
    explanation: str


class DeployFailed(Event):
    type: Literal["DeployFailed"] = "DeployFailed"
    deploy_id: str
    app_id: str
    error: DeployError
    stages: dict[str, int] = {}


class AppStopped(Event):
    """The App's VM was stopped (App deleted); no URL answers any more."""

    type: Literal["AppStopped"] = "AppStopped"
    app_id: str
    deploy_id: str | None = None


class AppNameClaimed(Event):
    type: Literal["AppNameClaimed"] = "AppNameClaimed"
    account_id: str
    name: str
    app_id: str


class AppNameReleased(Event):
    type: Literal["AppNameReleased"] = "AppNameReleased"
    account_id: str
    name: str
    app_id: str


DomainEvent = Annotated[
    AccountCreated
    | CredentialAdded
    | CredentialUpdated
    | CredentialRejected
    | CredentialAttached
    | CredentialDetached
    | CredentialDeleted
    | CredentialDeleteRefused
    | AppCreated
    | AppCreateRejected
    | AppCredentialChanged
    | AppDeleted
    | DeployRequested
    | AppNameClaimed
    | AppNameReleased
    | DeployStarted
    | ImagePulled
    | VmBooted
    | DeploySucceeded
    | DeployFailed
    | AppStopped,
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
        AppCreated,
        AppCreateRejected,
        AppCredentialChanged,
        AppDeleted,
        DeployRequested,
        AppNameClaimed,
        AppNameReleased,
        DeployStarted,
        ImagePulled,
        VmBooted,
        DeploySucceeded,
        DeployFailed,
        AppStopped,
    )
}


def parse_event(type_: str, data: dict[str, Any]) -> Event | None:
    """Build the typed event from an envelope's ``type`` and ``data``.

    ``None`` for a type this version does not know, so readers written
    before a new event type existed skip it instead of stopping.
    """
    model = EVENT_TYPES.get(type_)
    return None if model is None else model.model_validate(data)
