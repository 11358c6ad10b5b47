"""The credentials service process: FastStream subscribers over NATS."""

import asyncio

import structlog
from faststream import FastStream
from faststream.nats import NatsBroker

from contracts import subjects
from contracts.commands import (
    AddCredential,
    AttachCredential,
    DeleteCredential,
    DetachCredential,
    ResolveCredential,
    UpdateCredential,
    VerifyCredential,
)
from contracts.replies import (
    CredentialReply,
    Failure,
    ResolvedCredential,
    Verification,
)
from services.backbone import bus
from services.backbone.eventlog import EventLog
from services.backbone.settings import Settings
from services.credentials.handlers import CredentialsHandlers
from services.credentials.sealing import DataKeyStore, MasterKeyring

log = structlog.get_logger(__name__)
QUEUE = "credentials"


def build_app(settings: Settings) -> FastStream:
    """Wire the handlers to their subjects; adapters are built on startup."""
    broker = NatsBroker(settings.nats_url, logger=None)
    app = FastStream(broker, logger=None)
    state: dict[str, CredentialsHandlers] = {}

    def handlers() -> CredentialsHandlers:
        return state["handlers"]

    @app.on_startup
    async def connect() -> None:
        # Build the adapters before any subscriber takes a message.
        await broker.connect()
        nc = broker.connection
        events = EventLog(nc)
        await events.ensure_stream(settings.stream_replicas)
        key_file = settings.resolved_master_key_file
        ring = MasterKeyring.load_or_create(key_file)
        keys = await DataKeyStore.open(
            nc,
            ring,
            settings.stream_replicas,
            reload=lambda: MasterKeyring.load_or_create(key_file),
        )

        async def verify(command: VerifyCredential) -> Verification:
            return await bus.request(
                nc,
                subjects.VERIFY_CREDENTIAL,
                command,
                Verification,
                timeout_s=settings.request_timeout_s,
            )

        state["handlers"] = CredentialsHandlers(events, keys, verify)
        log.info("credentials service ready", nats=settings.nats_url)

    def invalid(detail: str) -> CredentialReply:
        return CredentialReply(
            ok=False, failure=Failure(code="invalid_request", detail=detail)
        )

    def invalid_resolve(detail: str) -> ResolvedCredential:
        return ResolvedCredential(
            ok=False, failure=Failure(code="invalid_request", detail=detail)
        )

    async def add(cmd: AddCredential) -> CredentialReply:
        return await handlers().add_credential(cmd)

    async def update(cmd: UpdateCredential) -> CredentialReply:
        return await handlers().update_credential(cmd)

    async def delete(cmd: DeleteCredential) -> CredentialReply:
        return await handlers().delete_credential(cmd)

    async def attach(cmd: AttachCredential) -> CredentialReply:
        return await handlers().attach_credential(cmd)

    async def detach(cmd: DetachCredential) -> CredentialReply:
        return await handlers().detach_credential(cmd)

    async def resolve(cmd: ResolveCredential) -> ResolvedCredential:
        return await handlers().resolve_credential(cmd)

    subscribe = broker.subscriber
    serve = bus.command_subscriber
    subscribe(subjects.ADD_CREDENTIAL, queue=QUEUE)(serve(AddCredential, add, invalid))
    subscribe(subjects.UPDATE_CREDENTIAL, queue=QUEUE)(
        serve(UpdateCredential, update, invalid)
    )
    subscribe(subjects.DELETE_CREDENTIAL, queue=QUEUE)(
        serve(DeleteCredential, delete, invalid)
    )
    subscribe(subjects.ATTACH_CREDENTIAL, queue=QUEUE)(
        serve(AttachCredential, attach, invalid)
    )
    subscribe(subjects.DETACH_CREDENTIAL, queue=QUEUE)(
        serve(DetachCredential, detach, invalid)
    )
    subscribe(subjects.RESOLVE_CREDENTIAL, queue=QUEUE)(
        serve(ResolveCredential, resolve, invalid_resolve)
    )
    return app


def run(settings: Settings) -> None:
    asyncio.run(build_app(settings).run())
