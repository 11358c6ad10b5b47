"""The credentials service process: FastStream subscribers over NATS."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from faststream import FastStream
from faststream.nats import NatsBroker
from faststream.nats.annotations import NatsMessage
from pydantic import BaseModel

from contracts import subjects
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
        ring = MasterKeyring.load_or_create(settings.resolved_master_key_file)
        keys = await DataKeyStore.open(nc, ring, settings.stream_replicas)

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

    routes: list[tuple[str, type[Command], Route]] = [
        (subjects.ADD_CREDENTIAL, AddCredential, lambda h: h.add_credential),
        (subjects.UPDATE_CREDENTIAL, UpdateCredential, lambda h: h.update_credential),
        (subjects.DELETE_CREDENTIAL, DeleteCredential, lambda h: h.delete_credential),
        (subjects.ATTACH_CREDENTIAL, AttachCredential, lambda h: h.attach_credential),
        (subjects.DETACH_CREDENTIAL, DetachCredential, lambda h: h.detach_credential),
        (
            subjects.RESOLVE_CREDENTIAL,
            ResolveCredential,
            lambda h: h.resolve_credential,
        ),
    ]
    for subject, model, route in routes:
        broker.subscriber(subject, queue=QUEUE)(_serve(model, route, handlers))
    return app


Route = Callable[[CredentialsHandlers], Callable[[Any], Awaitable[BaseModel]]]


def _serve(
    model: type[Command],
    route: Route,
    handlers: Callable[[], CredentialsHandlers],
) -> Callable[[NatsMessage], Awaitable[bytes]]:
    """A subscriber that validates by hand, so no error quotes a secret.

    The reply is encoded here too: the wire form is the contract's JSON.
    """

    async def serve(message: NatsMessage) -> bytes:
        command = bus.decode(model, message.body)
        reply: BaseModel
        if isinstance(command, str):
            log.warning("invalid command", command=model.__name__, problems=command)
            failure = Failure(code="invalid_request", detail=command)
            if model is ResolveCredential:
                reply = ResolvedCredential(ok=False, failure=failure)
            else:
                reply = CredentialReply(ok=False, failure=failure)
        else:
            reply = await route(handlers())(command)
        return reply.model_dump_json().encode()

    serve.__name__ = f"on_{model.__name__}"
    return serve


def run(settings: Settings) -> None:
    asyncio.run(build_app(settings).run())
