"""The Credential aggregate: its state, rebuilt from events, and its rules.

Pure: no clock, no I/O. Decisions take the time and the sealed secret as
arguments and return the events that record them.
"""

from dataclasses import dataclass, field
from datetime import datetime

from contracts.events import (
    AppRef,
    CredentialAdded,
    CredentialAttached,
    CredentialDeleted,
    CredentialDeleteRefused,
    CredentialDetached,
    CredentialRejected,
    CredentialUpdated,
    Event,
    SealedSecret,
)


class CredentialError(Exception):
    """Root of the credentials service's errors."""


class CredentialNotFoundError(CredentialError):
    """No such credential in this account (or it was deleted)."""


class CredentialExistsError(CredentialError):
    """A credential with this id already exists."""


class CredentialInUseError(CredentialError):
    """A credential still referenced by Apps cannot be deleted."""

    def __init__(self, apps: list[AppRef], position: int | None = None) -> None:
        names = ", ".join(app.name for app in apps)
        super().__init__(f"the credential is still used by: {names}")
        self.apps = apps
        self.position = position


def secret_hint(secret: str) -> str:
    """At most the last four characters, and fewer for short secrets."""
    if len(secret) >= 16:
        return "…" + secret[-4:]
    if len(secret) >= 10:
        return "…" + secret[-2:]
    return "…"


@dataclass
class Credential:
    """State of one credential as its events tell it."""

    id: str
    version: int = 0
    exists: bool = False
    deleted: bool = False
    account_id: str = ""
    name: str = ""
    registry: str = ""
    username: str = ""
    secret_hint: str = ""
    sealed_secret: SealedSecret | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    verified_at: datetime | None = None
    expires_at: datetime | None = None
    apps: dict[str, AppRef] = field(default_factory=dict)
    commands: set[str] = field(default_factory=set)

    @property
    def live(self) -> bool:
        return self.exists and not self.deleted

    def apply(
        self, event: Event, position: int, at: datetime, command_id: str | None
    ) -> None:
        """Move the state past one event; ``position`` becomes the version."""
        match event:
            case CredentialAdded():
                self.exists = True
                self.account_id = event.account_id
                self.name = event.name
                self.registry = event.registry
                self.created_at = at
                self._take_secret(event, at)
            case CredentialUpdated():
                self.name = event.name
                self._take_secret(event, at)
            case CredentialAttached():
                self.apps[event.app.id] = event.app
            case CredentialDetached():
                self.apps.pop(event.app_id, None)
            case CredentialDeleted():
                self.deleted = True
            case CredentialRejected():
                self.account_id = self.account_id or event.account_id
        self.version = position
        if command_id:
            self.commands.add(command_id)

    def _take_secret(
        self, event: CredentialAdded | CredentialUpdated, at: datetime
    ) -> None:
        self.username = event.username
        self.secret_hint = event.secret_hint
        self.sealed_secret = event.sealed_secret
        self.verified_at = event.verified_at
        self.expires_at = event.expires_at
        self.updated_at = at

    def visible_to(self, account_id: str) -> bool:
        return self.live and self.account_id == account_id

    def require(self, account_id: str) -> None:
        if not self.visible_to(account_id):
            raise CredentialNotFoundError(self.id)

    def add(
        self,
        *,
        account_id: str,
        name: str,
        registry: str,
        username: str,
        hint: str,
        sealed: SealedSecret,
        verified_at: datetime,
        expires_at: datetime | None,
    ) -> list[Event]:
        if self.exists:
            raise CredentialExistsError(self.id)
        return [
            CredentialAdded(
                credential_id=self.id,
                account_id=account_id,
                name=name,
                registry=registry,
                username=username,
                secret_hint=hint,
                sealed_secret=sealed,
                verified_at=verified_at,
                expires_at=expires_at,
            )
        ]

    def update(
        self,
        *,
        account_id: str,
        name: str | None,
        username: str,
        hint: str,
        sealed: SealedSecret,
        verified_at: datetime,
        expires_at: datetime | None,
    ) -> list[Event]:
        self.require(account_id)
        return [
            CredentialUpdated(
                credential_id=self.id,
                name=name if name is not None else self.name,
                username=username,
                secret_hint=hint,
                sealed_secret=sealed,
                verified_at=verified_at,
                expires_at=expires_at,
            )
        ]

    def delete(self, account_id: str) -> list[Event]:
        """Delete, or refuse while Apps are attached (the refusal is recorded)."""
        self.require(account_id)
        if self.apps:
            return [
                CredentialDeleteRefused(
                    credential_id=self.id, apps=sorted(self.apps.values(), key=_by_name)
                )
            ]
        return [CredentialDeleted(credential_id=self.id)]

    def attach(self, account_id: str, app: AppRef) -> list[Event]:
        self.require(account_id)
        if app.id in self.apps:
            return []
        return [CredentialAttached(credential_id=self.id, app=app)]

    def detach(self, account_id: str, app_id: str) -> list[Event]:
        if self.account_id != account_id or app_id not in self.apps:
            return []
        return [CredentialDetached(credential_id=self.id, app_id=app_id)]


def _by_name(app: AppRef) -> str:
    return app.name
