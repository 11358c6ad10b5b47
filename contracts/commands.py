"""Commands: imperative requests sent over NATS request/reply.

A secret is a ``SecretStr``: masked in ``repr``, ``str`` and Python dumps, and
written in clear only when the command is serialised to JSON for the wire.
Commands are never persisted.
"""

from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    SerializationInfo,
    field_serializer,
)

from contracts.envelope import new_id

Secret = Annotated[SecretStr, Field(min_length=1, max_length=65536)]


class Command(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    command_id: str = Field(default_factory=lambda: new_id("cmd"))
    account_id: str
    actor: str
    correlation_id: str = Field(default_factory=lambda: new_id("cor"))


class WireSecret(BaseModel):
    """Mixin: reveal ``secret`` on JSON serialisation only (the wire format)."""

    @field_serializer("secret", when_used="json", check_fields=False)
    def _reveal(self, value: SecretStr | None, info: SerializationInfo) -> str | None:
        return None if value is None else value.get_secret_value()


class AddCredential(Command, WireSecret):
    credential_id: str = Field(default_factory=lambda: new_id("cred"))
    registry: str
    username: str
    secret: Secret
    name: str | None = None


class UpdateCredential(Command, WireSecret):
    credential_id: str
    username: str | None = None
    secret: Secret | None = None
    name: str | None = None


class DeleteCredential(Command):
    credential_id: str


class AttachCredential(Command):
    credential_id: str
    app_id: str
    app_name: str


class DetachCredential(Command):
    credential_id: str
    app_id: str


class ResolveCredential(Command):
    """Ask for a credential's current secret, at pull time."""

    credential_id: str


class CreateAccount(Command):
    account_id: str = Field(default_factory=lambda: new_id("acct"))
    name: str
    token_sha256: str


class VerifyCredential(WireSecret, BaseModel):
    """Ask the verifier whether a registry accepts a username and secret."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    registry: str
    username: str
    secret: Secret
    image: str | None = None


class CheckImage(WireSecret, BaseModel):
    """Ask the verifier whether an image is readable and runs on linux/amd64.

    ``image`` is a full reference as ``contracts.references`` normalises it
    (``registry/repository[:tag][@digest]``); ``username`` and ``secret`` are
    absent for an anonymous pull.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    image: str
    username: str | None = None
    secret: Secret | None = None


class InlineCredential(WireSecret, BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    registry: str | None = None
    username: str
    secret: Secret
    name: str | None = None


class CreateApp(Command):
    app_id: str = Field(default_factory=lambda: new_id("app"))
    name: str
    image: str
    credential_id: str | None = None
    credential: InlineCredential | None = None
    port: int | None = None


class ChangeAppCredential(Command):
    app_id: str
    credential_id: str


class DeleteApp(Command):
    app_id: str


class RedeployApp(Command):
    app_id: str
    deploy_id: str = Field(default_factory=lambda: new_id("dep"))
