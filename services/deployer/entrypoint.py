"""The deployer process: App commands over NATS request/reply."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import structlog
from faststream import FastStream
from faststream.nats import NatsBroker
from nats.aio.client import Client as NATS
from pydantic import BaseModel

from contracts import subjects
from contracts.commands import ChangeAppCredential, CreateApp, DeleteApp, RedeployApp
from contracts.replies import (
    AppReply,
    CredentialReply,
    Failure,
    ImageCheck,
    ResolvedCredential,
)
from services.backbone import bus
from services.backbone.eventlog import EventLog
from services.backbone.settings import Settings
from services.deployer.handlers import DeployerHandlers, Peers

if TYPE_CHECKING:
    from services.deployer.worker import DeployWorker

log = structlog.get_logger(__name__)
QUEUE = "deployer"
R = TypeVar("R", bound=BaseModel)


def peers(nc: NATS, settings: Settings) -> Peers:
    """The credentials service and the verifier, reached over NATS."""
    timeout_s = settings.request_timeout_s

    def ask(subject: str, reply: type[R]) -> Callable[[BaseModel], Awaitable[R]]:
        async def call(command: BaseModel) -> R:
            return await bus.request(nc, subject, command, reply, timeout_s=timeout_s)

        return call

    return Peers(
        add_credential=ask(subjects.ADD_CREDENTIAL, CredentialReply),
        attach=ask(subjects.ATTACH_CREDENTIAL, CredentialReply),
        detach=ask(subjects.DETACH_CREDENTIAL, CredentialReply),
        resolve=ask(subjects.RESOLVE_CREDENTIAL, ResolvedCredential),
        check_image=ask(subjects.CHECK_IMAGE, ImageCheck),
    )


def build_app(settings: Settings) -> FastStream:
    broker = NatsBroker(settings.nats_url, logger=None)
    app = FastStream(broker, logger=None)
    state: dict[str, DeployerHandlers] = {}

    tasks: list[asyncio.Task[None]] = []
    workers: list[DeployWorker] = []

    @app.on_startup
    async def connect() -> None:
        # Build the adapters before any subscriber takes a message.
        await broker.connect()
        nc = broker.connection
        events = EventLog(nc)
        await events.ensure_stream(settings.stream_replicas)
        ports = peers(nc, settings)
        handlers = DeployerHandlers(events, ports)
        state["handlers"] = handlers
        if settings.deploy_workers < 1:
            # A command-only replica, e.g. on a node that cannot run VMs.
            log.info("deployer ready without deploy worker", nats=settings.nats_url)
            return
        tasks.append(
            asyncio.create_task(
                _run_worker(settings, nc, events, handlers, ports, workers),
                name="deploy-worker",
            )
        )
        log.info("deployer ready", nats=settings.nats_url)

    @app.on_shutdown
    async def stop() -> None:
        # VMs stop with the suite; the log still says which Apps to restore.
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=10)
        for worker in workers:
            await worker.stop_all()
        log.info("deployer stopped")

    def invalid(detail: str) -> AppReply:
        return AppReply(
            ok=False, failure=Failure(code="invalid_request", detail=detail)
        )

    async def create(cmd: CreateApp) -> AppReply:
        return await state["handlers"].create_app(cmd)

    async def change(cmd: ChangeAppCredential) -> AppReply:
        return await state["handlers"].change_credential(cmd)

    async def redeploy(cmd: RedeployApp) -> AppReply:
        return await state["handlers"].redeploy_app(cmd)

    async def delete(cmd: DeleteApp) -> AppReply:
        return await state["handlers"].delete_app(cmd)

    subscribe = broker.subscriber
    serve = bus.command_subscriber
    subscribe(subjects.CREATE_APP, queue=QUEUE)(serve(CreateApp, create, invalid))
    subscribe(subjects.CHANGE_APP_CREDENTIAL, queue=QUEUE)(
        serve(ChangeAppCredential, change, invalid)
    )
    subscribe(subjects.REDEPLOY_APP, queue=QUEUE)(serve(RedeployApp, redeploy, invalid))
    subscribe(subjects.DELETE_APP, queue=QUEUE)(serve(DeleteApp, delete, invalid))
    return app


async def _run_worker(
    settings: Settings,
    nc: NATS,
    events: EventLog,
    handlers: DeployerHandlers,
    ports: Peers,
    workers: list["DeployWorker"],
) -> None:
    """Prepare the VM platform, then keep the deploy worker following.

    Runs beside the command subscribers, which answer meanwhile: fetching the
    kernel on a first start takes seconds. A failure is logged and retried.
    """
    # The VM machinery loads only where VMs run.
    from services.deployer.pull import BlobCache, ImagePuller
    from services.deployer.vm import PlatformAssets, QemuDriver
    from services.deployer.worker import DeployWorker

    data_dir = settings.data_dir.resolve() / "deployer"
    worker: DeployWorker | None = None
    while True:
        try:
            if worker is None:
                assets = await PlatformAssets.ensure(data_dir)
                worker = DeployWorker(
                    nc,
                    events,
                    handlers,
                    ports,
                    ImagePuller(settings, BlobCache(data_dir / "blobs")),
                    QemuDriver(assets, accel=settings.vm_accel),
                    data_dir,
                    memory_mb=settings.vm_memory_mb,
                    cpus=settings.vm_cpus,
                )
                workers.append(worker)
            await worker.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("deploy worker stopped; starting again")
            await asyncio.sleep(2)


def run(settings: Settings) -> None:
    asyncio.run(build_app(settings).run())
