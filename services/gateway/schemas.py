"""Request and response bodies of the HTTP API."""

import unicodedata
from datetime import datetime
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    model_validator,
)

from contracts.events import AppRef

# Bidirectional overrides make text read differently from what it is.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _printable(value: str) -> str:
    if any(unicodedata.category(char) == "Cc" for char in value):
        raise ValueError("must not contain control characters")
    if any(char in _BIDI_CONTROLS for char in value):
        raise ValueError("must not contain bidirectional override characters")
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


class InlineCredentialIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    registry: Registry | None = None
    username: Username
    secret: Secret
    name: Name | None = None


ImageText = Annotated[
    str, Field(min_length=1, max_length=600), AfterValidator(_printable)
]


class AppIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    image: ImageText
    credential_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    credential: InlineCredentialIn | None = None
    port: Annotated[int, Field(ge=1, le=65535)] | None = None

    @model_validator(mode="after")
    def _one_credential(self) -> "AppIn":
        if self.credential_id is not None and self.credential is not None:
            raise ValueError("give either credential_id or credential, not both")
        return self


class AppPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    credential_id: Annotated[str, Field(min_length=1, max_length=64)]


class DeployError(BaseModel):
    stage: str | None = None
    code: str
    registry_status: int | None = None
    registry_code: str | None = None
    registry_message: str | None = None
    explanation: str | None = None


class DeployOut(BaseModel):
    id: str
    app_id: str
    reason: str
    status: str
    digest: str | None
    credential_id: str | None
    requested_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    stages: dict[str, object]
    error: DeployError | None


class AppOut(BaseModel):
    id: str
    name: str
    image: str
    digest: str | None
    credential_id: str | None
    status: str
    url: str | None
    port: int
    warnings: list[str]
    created_at: datetime
    updated_at: datetime
    current_deploy: DeployOut | None


class AppList(BaseModel):
    items: list[AppOut]


class DeployList(BaseModel):
    items: list[DeployOut]
