"""Replies to commands: the outcome a waiting caller acts on."""

from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, SecretStr, field_serializer

from contracts.errors import ErrorCode, RegistryError
from contracts.events import AppRef


class Reply(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Failure(BaseModel):
    """Why a command was refused; ``code`` is one of the API's error codes."""

    model_config = ConfigDict(frozen=True)

    code: ErrorCode
    detail: str
    registry_error: RegistryError | None = None
    apps: list[AppRef] | None = None
    extra: dict[str, Any] | None = None


class CredentialView(BaseModel):
    """A credential as the credentials service holds it: never the secret."""

    model_config = ConfigDict(frozen=True)

    id: str
    account_id: str
    name: str
    registry: str
    username: str
    secret_hint: str
    created_at: AwareDatetime
    updated_at: AwareDatetime
    verified_at: AwareDatetime
    expires_at: AwareDatetime | None = None
    apps: list[AppRef] = []


class CredentialReply(Reply):
    ok: bool
    credential: CredentialView | None = None
    failure: Failure | None = None
    position: int | None = None


class AccountReply(Reply):
    ok: bool
    account_id: str
    position: int


class ResolvedCredential(Reply):
    """The current secret of a credential, for the service that pulls with it."""

    ok: bool
    registry: str | None = None
    username: str | None = None
    secret: SecretStr | None = None
    failure: Failure | None = None

    @field_serializer("secret", when_used="json")
    def _reveal(self, value: SecretStr | None) -> str | None:
        return None if value is None else value.get_secret_value()


class Verification(Reply):
    """The verifier's answer: accepted, or the registry's refusal explained."""

    outcome: Literal["accepted", "rejected"]
    registry: str
    error: RegistryError | None = None
    expires_at: AwareDatetime | None = None
