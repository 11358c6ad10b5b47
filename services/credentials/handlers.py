"""Command handlers of the credentials service.

Each handler loads the credential from its subject, decides, and appends
with the loaded version, retrying the whole round when another writer won.
A command already recorded (same command id) answers with the current state.
"""

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

import structlog

from contracts.commands import (
    AddCredential,
    AttachCredential,
    Command,
    DeleteCredential,
    DetachCredential,
    ResolveCredential,
    UpdateCredential,
    VerifyCredential,
)
from contracts.envelope import utc_now
from contracts.errors import ErrorCode
from contracts.events import AppRef, CredentialRejected, Event, parse_event
from contracts.replies import (
    CredentialReply,
    CredentialView,
    Failure,
    ResolvedCredential,
    Verification,
)
from services.backbone.errors import ConcurrencyError, ServiceUnavailableError
from services.backbone.eventlog import EventLog, with_retries
from services.credentials.domain import (
    Credential,
    CredentialError,
    CredentialExistsError,
    CredentialInUseError,
    CredentialNotFoundError,
    secret_hint,
)
from services.credentials.sealing import (
    DataKey,
    DataKeyDestroyedError,
    DataKeyStore,
    seal,
    unseal,
)

log = structlog.get_logger(__name__)

Verifier = Callable[[VerifyCredential], Awaitable[Verification]]
Clock = Callable[[], datetime]


class CredentialsHandlers:
    """Owns the Credential aggregate; the only code that sees secrets open."""

    def __init__(
        self,
        events: EventLog,
        keys: DataKeyStore,
        verify: Verifier,
        clock: Clock = utc_now,
    ) -> None:
        self._events = events
        self._keys = keys
        self._verify = verify
        self._clock = clock

    async def load(self, credential_id: str) -> Credential:
        credential = Credential(credential_id)
        for stored in await self._events.load("credential", credential_id):
            envelope = stored.envelope
            event = parse_event(envelope.type, envelope.data)
            if event is None:
                raise CredentialError(f"unknown event type {envelope.type}")
            credential.apply(
                event, stored.position, envelope.occurred_at, envelope.causation_id
            )
        return credential

    async def _append(
        self, command: Command, credential: Credential, events: Sequence[Event]
    ) -> int:
        return await self._events.record(
            command, "credential", credential.id, credential.version, events
        )

    async def add_credential(self, cmd: AddCredential) -> CredentialReply:
        async def attempt() -> CredentialReply:
            credential = await self.load(cmd.credential_id)
            if cmd.command_id in credential.commands:
                return _reply(credential)
            if credential.exists:
                raise CredentialExistsError(cmd.credential_id)

            # The registry decides first; a refusal is kept for the audit log.
            secret = cmd.secret.get_secret_value()
            verdict = await self._verify(
                VerifyCredential(
                    registry=cmd.registry, username=cmd.username, secret=cmd.secret
                )
            )
            if verdict.outcome == "rejected":
                return await self._reject(cmd, credential, "add", verdict)

            # Seal under a fresh data key, stored before the event names it.
            key = await self._keys.create(credential.id, version=1)
            events = credential.add(
                account_id=cmd.account_id,
                name=cmd.name or default_name(cmd.username, verdict.registry),
                registry=verdict.registry,
                username=cmd.username,
                hint=secret_hint(secret),
                sealed=seal(credential.id, key, secret),
                verified_at=self._clock(),
                expires_at=verdict.expires_at,
            )
            try:
                position = await self._append(cmd, credential, events)
            except ConcurrencyError:
                await self._keys.destroy(credential.id, [key.version])
                raise
            return _reply(await self.load(credential.id), position)

        return await self._guard(cmd, attempt, "add credential")

    async def update_credential(self, cmd: UpdateCredential) -> CredentialReply:
        async def attempt() -> CredentialReply:
            credential = await self.load(cmd.credential_id)
            if cmd.command_id in credential.commands:
                return _reply(credential)
            credential.require(cmd.account_id)
            assert credential.sealed_secret is not None

            # The new username and secret must pass before they replace the old.
            username = cmd.username or credential.username
            if cmd.secret is not None:
                secret = cmd.secret.get_secret_value()
            else:
                current = await self._keys.get(
                    credential.id, credential.sealed_secret.key_version
                )
                secret = unseal(credential.id, current, credential.sealed_secret)
            verdict = await self._verify(
                VerifyCredential(
                    registry=credential.registry, username=username, secret=secret
                )
            )
            if verdict.outcome == "rejected":
                return await self._reject(cmd, credential, "update", verdict)

            # A new data key per version: the old sealed secret is shredded after.
            old_version = credential.sealed_secret.key_version
            key = await self._keys.create(credential.id, version=old_version + 1)
            events = credential.update(
                account_id=cmd.account_id,
                name=cmd.name,
                username=username,
                hint=secret_hint(secret),
                sealed=seal(credential.id, key, secret),
                verified_at=self._clock(),
                expires_at=verdict.expires_at,
            )
            try:
                position = await self._append(cmd, credential, events)
            except ConcurrencyError:
                await self._keys.destroy(credential.id, [key.version])
                raise
            await self._keys.destroy(credential.id, [old_version])
            return _reply(await self.load(credential.id), position)

        return await self._guard(cmd, attempt, "update credential")

    async def delete_credential(self, cmd: DeleteCredential) -> CredentialReply:
        async def attempt() -> CredentialReply:
            credential = await self.load(cmd.credential_id)
            if cmd.command_id in credential.commands and credential.deleted:
                return CredentialReply(ok=True, position=credential.version)
            events = credential.delete(cmd.account_id)
            position = await self._append(cmd, credential, events)
            if credential.apps:
                apps = sorted(credential.apps.values(), key=lambda app: app.name)
                raise CredentialInUseError(apps, position)
            assert credential.sealed_secret is not None

            # The log keeps the sealed secret; destroying the key shreds it.
            await self._keys.destroy(
                credential.id, range(1, credential.sealed_secret.key_version + 1)
            )
            return CredentialReply(ok=True, position=position)

        return await self._guard(cmd, attempt, "delete credential")

    async def attach_credential(self, cmd: AttachCredential) -> CredentialReply:
        async def attempt() -> CredentialReply:
            credential = await self.load(cmd.credential_id)
            events = credential.attach(
                cmd.account_id, AppRef(id=cmd.app_id, name=cmd.app_name)
            )
            position = await self._append(cmd, credential, events)
            return _reply(await self.load(credential.id), position)

        return await self._guard(cmd, attempt, "attach credential")

    async def detach_credential(self, cmd: DetachCredential) -> CredentialReply:
        async def attempt() -> CredentialReply:
            credential = await self.load(cmd.credential_id)
            events = credential.detach(cmd.account_id, cmd.app_id)
            position = await self._append(cmd, credential, events)
            return CredentialReply(ok=True, position=position)

        return await self._guard(cmd, attempt, "detach credential")

    async def resolve_credential(self, cmd: ResolveCredential) -> ResolvedCredential:
        """The current secret, read at the moment of use, never a copy."""
        try:
            credential, key = await self._current_key(cmd)
            assert credential.sealed_secret is not None
            secret = unseal(credential.id, key, credential.sealed_secret)
        except CredentialNotFoundError:
            return ResolvedCredential(
                ok=False,
                failure=Failure(
                    code="credential_not_found",
                    detail=f"Credential {cmd.credential_id} does not exist.",
                ),
            )
        except CredentialError as exc:
            log.error(
                "credential could not be opened",
                credential_id=cmd.credential_id,
                error=str(exc),
            )
            return ResolvedCredential(
                ok=False,
                failure=Failure(
                    code="internal_error",
                    detail="The credential's secret could not be opened.",
                ),
            )
        return ResolvedCredential(
            ok=True,
            registry=credential.registry,
            username=credential.username,
            secret=secret,
        )

    async def _current_key(self, cmd: ResolveCredential) -> tuple[Credential, DataKey]:
        """The credential and the data key of its current secret."""
        for attempt in range(3):
            credential = await self.load(cmd.credential_id)
            credential.require(cmd.account_id)
            assert credential.sealed_secret is not None
            try:
                key = await self._keys.get(
                    credential.id, credential.sealed_secret.key_version
                )
            except DataKeyDestroyedError:
                # An update or delete won the race since the load: read again.
                if attempt == 2:
                    raise
                continue
            return credential, key
        raise AssertionError("unreachable")

    async def _reject(
        self,
        cmd: AddCredential | UpdateCredential,
        credential: Credential,
        attempt: str,
        verdict: Verification,
    ) -> CredentialReply:
        assert verdict.error is not None
        event = CredentialRejected(
            credential_id=credential.id,
            account_id=cmd.account_id,
            attempt="add" if attempt == "add" else "update",
            registry=verdict.registry,
            username=cmd.username or credential.username,
            error=verdict.error,
        )
        position = await self._append(cmd, credential, [event])
        log.info(
            "credential refused by registry",
            credential_id=credential.id,
            registry=verdict.registry,
            code=verdict.error.code,
            registry_status=verdict.error.registry_status,
        )
        return CredentialReply(
            ok=False,
            position=position,
            failure=Failure(
                code=verdict.error.code,
                detail=verdict.error.explanation,
                registry_error=verdict.error,
            ),
        )

    async def _guard(
        self,
        cmd: Command,
        attempt: Callable[[], Awaitable[CredentialReply]],
        what: str,
    ) -> CredentialReply:
        """Run with conflict retries; turn rule violations into failures."""
        bound = log.bind(command_id=cmd.command_id, correlation_id=cmd.correlation_id)
        try:
            reply = await with_retries(attempt, what=what)
        except CredentialInUseError as exc:
            refused = _failure(
                "credential_in_use",
                str(exc).capitalize() + "; point those Apps at another credential"
                " first.",
                exc.apps,
            )
            return refused.model_copy(update={"position": exc.position})
        except CredentialNotFoundError as exc:
            return _failure("credential_not_found", f"Credential {exc} does not exist.")
        except CredentialExistsError as exc:
            return _failure("credential_exists", f"Credential {exc} already exists.")
        except ServiceUnavailableError as exc:
            bound.error(f"{what} failed", error=str(exc))
            return _failure("service_unavailable", f"{exc}; try again shortly.")
        except ConcurrencyError:
            bound.warning(f"{what} kept conflicting")
            return _failure("conflict", "The credential changed meanwhile; try again.")
        except CredentialError as exc:
            bound.error(f"{what} failed", error=str(exc))
            return _failure("internal_error", "The credential could not be processed.")
        bound.info(what, ok=reply.ok)
        return reply


def default_name(username: str, registry: str, limit: int = 200) -> str:
    """``username@registry``, shortened in the middle to fit a name's limit."""
    name = f"{username}@{registry}"
    if len(name) <= limit:
        return name
    keep = limit - len(registry) - 2
    return f"{username[:keep]}…@{registry}"[:limit]


def _failure(
    code: ErrorCode, detail: str, apps: list[AppRef] | None = None
) -> CredentialReply:
    return CredentialReply(
        ok=False, failure=Failure(code=code, detail=detail, apps=apps)
    )


def view(credential: Credential) -> CredentialView:
    assert credential.created_at and credential.updated_at and credential.verified_at
    return CredentialView(
        id=credential.id,
        account_id=credential.account_id,
        name=credential.name,
        registry=credential.registry,
        username=credential.username,
        secret_hint=credential.secret_hint,
        created_at=credential.created_at,
        updated_at=credential.updated_at,
        verified_at=credential.verified_at,
        expires_at=credential.expires_at,
        apps=sorted(credential.apps.values(), key=lambda app: app.name),
    )


def _reply(credential: Credential, position: int | None = None) -> CredentialReply:
    return CredentialReply(
        ok=True,
        credential=view(credential),
        position=position if position is not None else credential.version,
    )
