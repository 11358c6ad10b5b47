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
from contracts.replies import CredentialReply, ResolvedCredential, Verification
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
        ring = MasterKeyring.load_or_create(settings.resolved_master_key_file)
        keys = await DataKeyStore.open(nc, ring, settings.stream_replicas)

        async def verify(command: VerifyCredential) -> Verification:
            return await bus.request(
                nc,
                subjects.VERIFY_CREDENTIAL,
                command,
                Verification,
                timeout=settings.request_timeout_s,
            )

        state["handlers"] = CredentialsHandlers(events, keys, verify)
        log.info("credentials service ready", nats=settings.nats_url)

    @broker.subscriber(subjects.ADD_CREDENTIAL, queue=QUEUE)
    async def add_credential(cmd: AddCredential) -> CredentialReply:
        return await handlers().add_credential(cmd)

    @broker.subscriber(subjects.UPDATE_CREDENTIAL, queue=QUEUE)
    async def update_credential(cmd: UpdateCredential) -> CredentialReply:
        return await handlers().update_credential(cmd)

    @broker.subscriber(subjects.DELETE_CREDENTIAL, queue=QUEUE)
    async def delete_credential(cmd: DeleteCredential) -> CredentialReply:
        return await handlers().delete_credential(cmd)

    @broker.subscriber(subjects.ATTACH_CREDENTIAL, queue=QUEUE)
    async def attach_credential(cmd: AttachCredential) -> CredentialReply:
        return await handlers().attach_credential(cmd)

    @broker.subscriber(subjects.DETACH_CREDENTIAL, queue=QUEUE)
    async def detach_credential(cmd: DetachCredential) -> CredentialReply:
        return await handlers().detach_credential(cmd)

    @broker.subscriber(subjects.RESOLVE_CREDENTIAL, queue=QUEUE)
    async def resolve_credential(cmd: ResolveCredential) -> ResolvedCredential:
        return await handlers().resolve_credential(cmd)

    return app


def run(settings: Settings) -> None:
    asyncio.run(build_app(settings).run())
