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
