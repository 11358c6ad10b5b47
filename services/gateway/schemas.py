"""Request and response bodies of the HTTP API."""

from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr

from contracts.events import AppRef


def _printable(value: str) -> str:
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise ValueError("must not contain control characters")
    if value != value.strip():
        raise ValueError("must not start or end with white space")
    return value


def _username(value: str) -> str:
    if ":" in value:
        raise ValueError("must not contain ':' (registries use it as a separator)")
    return _printable(value)


def _secret(value: SecretStr) -> SecretStr:
    plain = value.get_secret_value()
    if plain.strip() == "":
        raise ValueError("must not be empty")
    if len(plain) > 65536:
        raise ValueError("must be at most 65536 characters")
    if "\x00" in plain:
        raise ValueError("must not contain NUL characters")
    return value


Registry = Annotated[
    str, Field(min_length=1, max_length=255), AfterValidator(_printable)
]
Username = Annotated[
    str, Field(min_length=1, max_length=255), AfterValidator(_username)
]
Secret = Annotated[SecretStr, AfterValidator(_secret)]
Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_printable)]


class CredentialIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    registry: Registry
    username: Username
    secret: Secret
    name: Name | None = None


class CredentialPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: Username | None = None
    secret: Secret | None = None
    name: Name | None = None


class CredentialOut(BaseModel):
    id: str
    name: str
    registry: str
    username: str
    secret_hint: str
    created_at: datetime
    updated_at: datetime
    verified_at: datetime
    expires_at: datetime | None
    apps: list[AppRef]


class CredentialList(BaseModel):
    items: list[CredentialOut]


class AuditEvent(BaseModel):
    position: int
    type: str
    subject: str
    occurred_at: datetime
    actor: str
    data: dict[str, object]


class AuditPage(BaseModel):
    items: list[AuditEvent]
    next: int
