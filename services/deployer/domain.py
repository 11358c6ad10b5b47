"""The App aggregate and the per-account App name registry. Pure rules."""

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from contracts.events import (
    AppCreated,
    AppCredentialChanged,
    AppDeleted,
    AppNameClaimed,
    AppNameReleased,
    AppStopped,
    DeployFailed,
    DeployRequested,
    DeploySucceeded,
    Event,
)


class AppError(Exception):
    """Root of the deployer's errors."""


class AppNotFoundError(AppError):
    """No such App in this account (or it was deleted)."""


class AppNameTakenError(AppError):
    """Another App of the account already has this name."""


class AppExistsError(AppError):
    """An App with this id already exists."""


@dataclass
class App:
    """State of one App as its events tell it."""

    id: str
    version: int = 0
    exists: bool = False
    deleted: bool = False
    account_id: str = ""
    name: str = ""
    image: str = ""
    digest: str = ""
    credential_id: str | None = None
    port: int = 0
    warnings: list[str] = field(default_factory=list)
    created_at: datetime | None = None
    deploys: list[str] = field(default_factory=list)
    finished: set[str] = field(default_factory=set)
    url: str | None = None
    commands: set[str] = field(default_factory=set)

    @property
    def live(self) -> bool:
        return self.exists and not self.deleted

    def apply(self, event: Event, position: int, command_id: str | None) -> None:
        match event:
            case AppCreated():
                self.exists = True
                self.account_id = event.account_id
                self.name = event.name
                self.image = event.image
                self.digest = event.digest
                self.credential_id = event.credential_id
                self.port = event.port
                self.warnings = list(event.warnings)
            case AppCredentialChanged():
                self.credential_id = event.credential_id
                self.digest = event.digest
            case DeployRequested():
                self.deploys.append(event.deploy_id)
            case DeploySucceeded():
                self.finished.add(event.deploy_id)
                self.url = event.url
            case DeployFailed():
                self.finished.add(event.deploy_id)
            case AppStopped():
                self.url = None
            case AppDeleted():
                self.deleted = True
        self.version = position
        if command_id:
            self.commands.add(command_id)

    def require(self, account_id: str) -> None:
        if not (self.live and self.account_id == account_id):
            raise AppNotFoundError(self.id)

    def create(
        self,
        *,
        account_id: str,
        name: str,
        image: str,
        digest: str,
        platform_digest: str | None,
        credential_id: str | None,
        port: int,
        warnings: list[str],
        deploy_id: str,
    ) -> list[Event]:
        """Record the App with its first deploy queued: no redeploy step."""
        if self.exists:
            raise AppExistsError(self.id)
        return [
            AppCreated(
                app_id=self.id,
                account_id=account_id,
                name=name,
                image=image,
                digest=digest,
                platform_digest=platform_digest,
                credential_id=credential_id,
                port=port,
                warnings=warnings,
            ),
            DeployRequested(
                deploy_id=deploy_id,
                app_id=self.id,
                reason="create",
                credential_id=credential_id,
            ),
        ]

    def change_credential(
        self, account_id: str, credential_id: str, digest: str, deploy_id: str
    ) -> list[Event]:
        self.require(account_id)
        return [
            AppCredentialChanged(
                app_id=self.id,
                credential_id=credential_id,
                previous_credential_id=self.credential_id,
                digest=digest,
            ),
            DeployRequested(
                deploy_id=deploy_id,
                app_id=self.id,
                reason="credential_changed",
                credential_id=credential_id,
            ),
        ]

    def redeploy(
        self,
        account_id: str,
        deploy_id: str,
        reason: Literal["redeploy", "restore"] = "redeploy",
    ) -> list[Event]:
        self.require(account_id)
        return [
            DeployRequested(
                deploy_id=deploy_id,
                app_id=self.id,
                reason=reason,
                credential_id=self.credential_id,
            )
        ]

    def delete(self, account_id: str) -> list[Event]:
        self.require(account_id)
        return [AppDeleted(app_id=self.id)]


@dataclass
class AppName:
    """Who holds one App name in one account; its stream arbitrates races."""

    key: str
    version: int = 0
    holder: str | None = None

    def apply(self, event: Event, position: int) -> None:
        match event:
            case AppNameClaimed():
                self.holder = event.app_id
            case AppNameReleased():
                if self.holder == event.app_id:
                    self.holder = None
        self.version = position

    def claim(self, account_id: str, name: str, app_id: str) -> list[Event]:
        if self.holder == app_id:
            return []
        if self.holder is not None:
            raise AppNameTakenError(name)
        return [AppNameClaimed(account_id=account_id, name=name, app_id=app_id)]

    def release(self, account_id: str, name: str, app_id: str) -> list[Event]:
        if self.holder != app_id:
            return []
        return [AppNameReleased(account_id=account_id, name=name, app_id=app_id)]
