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


class ImageConfig(BaseModel):
    """What the VM's init needs from the image's config blob."""

    model_config = ConfigDict(frozen=True)

    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: list[str] = []
    working_dir: str | None = None
    exposed_ports: list[int] = []


class ImageCheck(Reply):
    """The verifier's answer on an image: pinned and runnable, or why not."""

    outcome: Literal["accepted", "rejected"]
    image: str
    digest: str | None = None
    media_type: str | None = None
    platform_digest: str | None = None
    platforms: list[str] = []
    warnings: list[str] = []
    config: ImageConfig | None = None
    error: RegistryError | None = None


class DeployView(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    app_id: str
    reason: str
    status: str
    credential_id: str | None = None
    digest: str | None = None


class AppView(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    account_id: str
    name: str
    image: str
    digest: str | None
    credential_id: str | None
    port: int
    warnings: list[str] = []


class AppReply(Reply):
    ok: bool
    app: AppView | None = None
    deploy: DeployView | None = None
    failure: Failure | None = None
    position: int | None = None
