"""Command handlers of the deployer: creating, changing and deleting Apps.

An App is recorded only after its image was found readable and runnable on
linux/amd64 with its credential. The credential's own stream arbitrates the
"in use" invariant: creation attaches first, then records the App, and
detaches again if recording fails.
"""

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import structlog

from contracts.commands import (
    AddCredential,
    AttachCredential,
    ChangeAppCredential,
    CheckImage,
    Command,
    CreateApp,
    DeleteApp,
    DetachCredential,
    RedeployApp,
    ResolveCredential,
)
from contracts.envelope import new_id
from contracts.errors import ErrorCode, RegistryError
from contracts.events import AppCreateRejected, parse_event
from contracts.references import (
    ImageReference,
    InvalidReferenceError,
    parse_reference,
    same_registry,
)
from contracts.replies import (
    AppReply,
    AppView,
    CredentialReply,
    DeployView,
    Failure,
    ImageCheck,
    ResolvedCredential,
)
from services.backbone.errors import ConcurrencyError, ServiceUnavailableError
from services.backbone.eventlog import EventLog, with_retries
from services.deployer.domain import (
    App,
    AppError,
    AppName,
    AppNameTakenError,
    AppNotFoundError,
)

log = structlog.get_logger(__name__)
DEFAULT_PORT = 8080


@dataclass(frozen=True)
class Peers:
    """The other services the deployer asks, as plain async calls (ports)."""

    add_credential: Callable[[AddCredential], Awaitable[CredentialReply]]
    attach: Callable[[AttachCredential], Awaitable[CredentialReply]]
    detach: Callable[[DetachCredential], Awaitable[CredentialReply]]
    resolve: Callable[[ResolveCredential], Awaitable[ResolvedCredential]]
    check_image: Callable[[CheckImage], Awaitable[ImageCheck]]


class RefusedError(AppError):
    """A creation or change refused with an API error code."""

    def __init__(
        self,
        code: ErrorCode,
        detail: str,
        error: RegistryError | None = None,
        platforms: list[str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.error = error
        self.platforms = platforms or []

    def failure(self) -> Failure:
        extra = {"platforms": self.platforms} if self.platforms else None
        return Failure(
            code=self.code, detail=self.detail, registry_error=self.error, extra=extra
        )


def name_key(account_id: str, name: str) -> str:
    return f"{account_id}_{hashlib.sha256(name.encode()).hexdigest()[:32]}"


class DeployerHandlers:
    """Owns the App aggregate and the per-account App names."""

    def __init__(self, events: EventLog, peers: Peers) -> None:
        self._events = events
        self._peers = peers

    async def load(self, app_id: str) -> App:
        app = App(app_id)
        for stored in await self._events.load("app", app_id):
            event = parse_event(stored.envelope.type, stored.envelope.data)
            if event is not None:
                app.apply(event, stored.position, stored.envelope.causation_id)
        return app

    async def _load_name(self, key: str) -> AppName:
        holder = AppName(key)
        for stored in await self._events.load("app_name", key):
            event = parse_event(stored.envelope.type, stored.envelope.data)
            if event is not None:
                holder.apply(event, stored.position)
        return holder

    async def create_app(self, cmd: CreateApp) -> AppReply:
        bound = log.bind(app_id=cmd.app_id, correlation_id=cmd.correlation_id)
        try:
            reply = await self._create(cmd)
        except RefusedError as exc:
            await self._record_rejection(cmd, exc)
            bound.info("app creation refused", code=exc.code)
            return AppReply(ok=False, failure=exc.failure())
        except ServiceUnavailableError as exc:
            bound.error("app creation failed", error=str(exc))
            return _failure("service_unavailable", f"{exc}; try again shortly.")
        except ConcurrencyError:
            bound.warning("app creation conflicted")
            return _failure("conflict", "The App changed meanwhile; try again.")
        bound.info("app created", image=reply.app.image if reply.app else None)
        return reply

    async def _create(self, cmd: CreateApp) -> AppReply:
        # Everything that can be checked without side effects comes first.
        reference = _parse(cmd.image)
        app = await self.load(cmd.app_id)
        if cmd.command_id in app.commands and app.exists:
            return _reply(app)
        credential_id = await self._inline_credential(cmd, reference)
        check = await self._check(cmd, reference, credential_id)
        assert check.digest is not None
        port = cmd.port or _default_port(check)

        # The name's own stream decides between two creations racing for it.
        key = name_key(cmd.account_id, cmd.name)
        await with_retries(lambda: self._claim(cmd, key), what="claim app name")

        # Attach on the credential's stream first: a racing delete loses there.
        try:
            if credential_id is not None:
                await self._attach(cmd, credential_id, cmd.app_id, cmd.name)
            deploy_id = new_id("dep")
            events = app.create(
                account_id=cmd.account_id,
                name=cmd.name,
                image=str(reference),
                digest=check.digest,
                platform_digest=check.platform_digest,
                credential_id=credential_id,
                port=port,
                warnings=check.warnings,
                deploy_id=deploy_id,
            )
            position = await self._events.record(
                cmd, "app", app.id, app.version, events
            )
        except BaseException:
            # Undo in reverse: nothing may keep pointing at an App that is not.
            await self._undo_create(cmd, key, credential_id)
            raise
        created = await self.load(app.id)
        return _reply(created, position, _deploy(deploy_id, created, "create"))

    async def _attach(
        self, cmd: Command, credential_id: str, app_id: str, app_name: str
    ) -> None:
        """Attach on the credential's stream, which refuses a deleted one."""
        attached = await self._peers.attach(
            AttachCredential(
                account_id=cmd.account_id,
                actor=cmd.actor,
                correlation_id=cmd.correlation_id,
                credential_id=credential_id,
                app_id=app_id,
                app_name=app_name,
            )
        )
        if not attached.ok:
            raise _from_failure(attached.failure)

    async def _detach(self, cmd: Command, credential_id: str, app_id: str) -> None:
        await self._peers.detach(
            DetachCredential(
                account_id=cmd.account_id,
                actor=cmd.actor,
                correlation_id=cmd.correlation_id,
                credential_id=credential_id,
                app_id=app_id,
            )
        )

    async def _claim(self, cmd: CreateApp, key: str) -> None:
        holder = await self._load_name(key)
        try:
            events = holder.claim(cmd.account_id, cmd.name, cmd.app_id)
        except AppNameTakenError as exc:
            raise RefusedError(
                "app_name_taken",
                f"An App named '{cmd.name}' already exists in this account.",
            ) from exc
        await self._events.record(cmd, "app_name", key, holder.version, events)

    async def _release(self, cmd: Command, key: str, name: str, app_id: str) -> None:
        async def attempt() -> None:
            holder = await self._load_name(key)
            events = holder.release(cmd.account_id, name, app_id)
            await self._events.record(cmd, "app_name", key, holder.version, events)

        await with_retries(attempt, what="release app name")

    async def _undo_create(
        self, cmd: CreateApp, key: str, credential_id: str | None
    ) -> None:
        if credential_id is not None:
            await self._detach(cmd, credential_id, cmd.app_id)
        await self._release(cmd, key, cmd.name, cmd.app_id)

    async def _inline_credential(
        self, cmd: CreateApp, reference: ImageReference
    ) -> str | None:
        """Save an inline credential as one of the account's, verified."""
        if cmd.credential is None:
            return cmd.credential_id
        registry = cmd.credential.registry or reference.registry
        if not same_registry(reference, registry):
            raise RefusedError(
                "credential_registry_mismatch",
                f"The credential is for {registry}, but the image is on"
                f" {reference.registry}; use a credential for {reference.registry}.",
            )
        saved = await self._peers.add_credential(
            AddCredential(
                account_id=cmd.account_id,
                actor=cmd.actor,
                correlation_id=cmd.correlation_id,
                registry=registry,
                username=cmd.credential.username,
                secret=cmd.credential.secret,
                name=cmd.credential.name,
            )
        )
        if not saved.ok or saved.credential is None:
            raise _from_failure(saved.failure)
        return saved.credential.id

    async def _check(
        self, cmd: Command, reference: ImageReference, credential_id: str | None
    ) -> ImageCheck:
        """Resolve the credential now and ask the registry about the image."""
        username = secret = None
        if credential_id is not None:
            resolved = await self._peers.resolve(
                ResolveCredential(
                    account_id=cmd.account_id,
                    actor=cmd.actor,
                    correlation_id=cmd.correlation_id,
                    credential_id=credential_id,
                )
            )
            if not resolved.ok:
                raise _from_failure(resolved.failure)
            assert resolved.registry is not None
            if not same_registry(reference, resolved.registry):
                raise RefusedError(
                    "credential_registry_mismatch",
                    f"The credential is for {resolved.registry}, but the image is on"
                    f" {reference.registry}; choose a credential for"
                    f" {reference.registry}.",
                )
            username, secret = resolved.username, resolved.secret
        check = await self._peers.check_image(
            CheckImage(image=str(reference), username=username, secret=secret)
        )
        if check.outcome == "rejected":
            assert check.error is not None
            raise RefusedError(
                check.error.code,
                check.error.explanation,
                check.error,
                check.platforms,
            )
        return check

    async def _record_rejection(self, cmd: CreateApp, exc: RefusedError) -> None:
        async def attempt() -> None:
            app = await self.load(cmd.app_id)
            event = AppCreateRejected(
                app_id=cmd.app_id,
                account_id=cmd.account_id,
                name=cmd.name,
                image=cmd.image[:500],
                code=exc.code,
                detail=exc.detail,
                error=exc.error,
                platforms=exc.platforms,
            )
            await self._events.record(cmd, "app", app.id, app.version, [event])

        await with_retries(attempt, what="record app rejection")

    async def change_credential(self, cmd: ChangeAppCredential) -> AppReply:
        async def attempt() -> AppReply:
            app = await self.load(cmd.app_id)
            app.require(cmd.account_id)
            if cmd.command_id in app.commands:
                return _reply(app)
            previous = app.credential_id
            check = await self._check(cmd, _parse(app.image), cmd.credential_id)
            assert check.digest is not None
            await self._attach(cmd, cmd.credential_id, app.id, app.name)
            deploy_id = new_id("dep")
            events = app.change_credential(
                cmd.account_id, cmd.credential_id, check.digest, deploy_id
            )
            position = await self._events.record(
                cmd, "app", app.id, app.version, events
            )

            # The old credential is free once the App no longer names it.
            if previous is not None and previous != cmd.credential_id:
                await self._detach(cmd, previous, app.id)
            changed = await self.load(app.id)
            return _reply(
                changed, position, _deploy(deploy_id, changed, "credential_changed")
            )

        return await self._guard(cmd, attempt, "change app credential")

    async def redeploy_app(
        self, cmd: RedeployApp, reason: Literal["redeploy", "restore"] = "redeploy"
    ) -> AppReply:
        async def attempt() -> AppReply:
            app = await self.load(cmd.app_id)
            app.require(cmd.account_id)
            if cmd.command_id in app.commands:
                return _reply(app)
            events = app.redeploy(cmd.account_id, cmd.deploy_id, reason)
            position = await self._events.record(
                cmd, "app", app.id, app.version, events
            )
            return _reply(app, position, _deploy(cmd.deploy_id, app, reason))

        return await self._guard(cmd, attempt, "redeploy app")

    async def delete_app(self, cmd: DeleteApp) -> AppReply:
        async def attempt() -> AppReply:
            app = await self.load(cmd.app_id)
            if cmd.command_id in app.commands and app.deleted:
                return AppReply(ok=True, position=app.version)
            events = app.delete(cmd.account_id)
            position = await self._events.record(
                cmd, "app", app.id, app.version, events
            )

            # Release what the App held: its credential and its name.
            if app.credential_id is not None:
                await self._detach(cmd, app.credential_id, app.id)
            await self._release(
                cmd, name_key(app.account_id, app.name), app.name, app.id
            )
            return AppReply(ok=True, position=position)

        return await self._guard(cmd, attempt, "delete app")

    async def _guard(
        self, cmd: Command, attempt: Callable[[], Awaitable[AppReply]], what: str
    ) -> AppReply:
        bound = log.bind(command_id=cmd.command_id, correlation_id=cmd.correlation_id)
        try:
            reply = await with_retries(attempt, what=what)
        except AppNotFoundError as exc:
            return _failure("app_not_found", f"App {exc} does not exist.")
        except RefusedError as exc:
            bound.info(f"{what} refused", code=exc.code)
            return AppReply(ok=False, failure=exc.failure())
        except ServiceUnavailableError as exc:
            bound.error(f"{what} failed", error=str(exc))
            return _failure("service_unavailable", f"{exc}; try again shortly.")
        except ConcurrencyError:
            bound.warning(f"{what} kept conflicting")
            return _failure("conflict", "The App changed meanwhile; try again.")
        bound.info(what, ok=reply.ok)
        return reply


def _parse(image: str) -> ImageReference:
    try:
        return parse_reference(image)
    except InvalidReferenceError as exc:
        raise RefusedError("invalid_image_reference", str(exc)) from exc


def _default_port(check: ImageCheck) -> int:
    """The image's single exposed port, else the platform's default."""
    ports = check.config.exposed_ports if check.config else []
    return ports[0] if len(ports) == 1 else DEFAULT_PORT


def _from_failure(failure: Failure | None) -> RefusedError:
    if failure is None:
        return RefusedError("internal_error", "A peer service refused without reason.")
    return RefusedError(failure.code, failure.detail, failure.registry_error)


def _failure(code: ErrorCode, detail: str) -> AppReply:
    return AppReply(ok=False, failure=Failure(code=code, detail=detail))


def _deploy(deploy_id: str, app: App, reason: str) -> DeployView:
    return DeployView(
        id=deploy_id,
        app_id=app.id,
        reason=reason,
        status="queued",
        credential_id=app.credential_id,
        digest=app.digest,
    )


def view(app: App) -> AppView:
    return AppView(
        id=app.id,
        account_id=app.account_id,
        name=app.name,
        image=app.image,
        digest=app.digest,
        credential_id=app.credential_id,
        port=app.port,
        warnings=app.warnings,
    )


def _reply(
    app: App, position: int | None = None, deploy: DeployView | None = None
) -> AppReply:
    return AppReply(
        ok=True,
        app=view(app),
        deploy=deploy,
        position=position if position is not None else app.version,
    )
