"""Deploys: pull the image with the App's current credential and boot a VM.

A durable JetStream consumer, shared by deployer replicas, delivers App
events. A ``DeployRequested`` is acknowledged only after its outcome
(``DeploySucceeded`` or ``DeployFailed``) is in the log, so a deployer that
dies mid-deploy leaves it to be delivered again and retried from the start.
"""

import asyncio
import contextlib
import os
import signal
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import api
from nats.js.errors import NotFoundError

from contracts.commands import Command, RedeployApp, ResolveCredential
from contracts.envelope import Envelope, new_id
from contracts.events import (
    AppDeleted,
    AppStopped,
    DeployError,
    DeployFailed,
    DeployRequested,
    DeployStarted,
    DeploySucceeded,
    Event,
    ImagePulled,
    VmBooted,
    parse_event,
)
from contracts.replies import ImageConfig
from contracts.subjects import EVENT_STREAM, EVENTS_PREFIX
from services.backbone.eventlog import EventLog, with_retries
from services.deployer.domain import App
from services.deployer.handlers import DeployerHandlers, Peers
from services.deployer.pull import ImagePuller, PulledImage, PullError
from services.deployer.unpack import UnpackError, UnsafeLayerError, unpack_layers
from services.deployer.vm import (
    BootFailedError,
    VmDriver,
    VmError,
    VmHandle,
    VmSpec,
    build_rootfs_image,
    free_host_port,
)

log = structlog.get_logger(__name__)

CONSUMER = "deployer"
APP_EVENTS = f"{EVENTS_PREFIX}.app.>"
BOOT_TIMEOUT_S = 180.0
# A deploy in progress says so every HEARTBEAT_S; one silent for ACK_WAIT_S
# (its deployer died) is delivered again.
ACK_WAIT_S = 30
HEARTBEAT_S = 10
T = TypeVar("T")
UPDATE_ADVICE = "Update the credential under Registry credentials, then redeploy."


class DeployFailure(Exception):
    """A deploy stopped at a stage, with the error users will see."""

    def __init__(self, error: DeployError) -> None:
        super().__init__(error.explanation)
        self.error = error


@dataclass
class Running:
    """A VM this process runs for an App."""

    handle: VmHandle
    deploy_id: str


class DeployWorker:
    """Reacts to App events: runs deploys, stops the VMs of deleted Apps."""

    def __init__(
        self,
        nc: NATS,
        events: EventLog,
        handlers: DeployerHandlers,
        peers: Peers,
        puller: ImagePuller,
        driver: VmDriver,
        data_dir: Path,
        *,
        memory_mb: int = 128,
        cpus: int = 1,
    ) -> None:
        self._js = nc.jetstream()
        self._events = events
        self._handlers = handlers
        self._peers = peers
        self._puller = puller
        self._driver = driver
        self._data_dir = data_dir
        self._memory_mb = memory_mb
        self._cpus = cpus
        self._running: dict[str, Running] = {}
        self._restored = False

    async def run(self) -> None:
        """Restore the Apps the log says run, then follow App events."""
        await self._ensure_consumer()
        if not self._restored:
            await self.restore()
            self._restored = True
        sub = await self._js.pull_subscribe_bind(durable=CONSUMER, stream=EVENT_STREAM)
        log.info("deploy worker following", consumer=CONSUMER)
        try:
            while True:
                try:
                    (message,) = await sub.fetch(1, timeout=1.0)
                except NatsTimeoutError:
                    continue
                await self._handle(message)
        finally:
            # A subscription left open keeps the connection's drain waiting.
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _ensure_consumer(self) -> None:
        try:
            await self._js.consumer_info(EVENT_STREAM, CONSUMER)
        except NotFoundError:
            # From the start: a deploy requested before any deployer ran is
            # not lost; finished deploys and deleted Apps are skipped cheaply.
            await self._js.add_consumer(
                EVENT_STREAM,
                api.ConsumerConfig(
                    durable_name=CONSUMER,
                    filter_subject=APP_EVENTS,
                    ack_policy=api.AckPolicy.EXPLICIT,
                    deliver_policy=api.DeliverPolicy.ALL,
                    ack_wait=ACK_WAIT_S,
                    max_ack_pending=8,
                ),
            )

    async def _handle(self, message: Msg) -> None:
        envelope = Envelope.model_validate_json(message.data)
        event = parse_event(envelope.type, envelope.data)
        bound = log.bind(
            app_id=envelope.aggregate_id,
            event_id=envelope.event_id,
            position=message.metadata.sequence.stream,
            correlation_id=envelope.correlation_id,
        )
        try:
            match event:
                case DeployRequested():
                    await _alive(
                        message, self.when_deploy_requested(envelope, event, message)
                    )
                case AppDeleted():
                    await self.when_app_deleted(envelope, event)
        except Exception:
            # Not acknowledged: JetStream delivers it again after ack_wait.
            bound.exception("deploy worker failed on an event", type=envelope.type)
            await message.nak(delay=5)
            return
        await message.ack()

    async def when_deploy_requested(
        self, envelope: Envelope, event: DeployRequested, message: Msg
    ) -> None:
        app = await self._handlers.load(event.app_id)
        if not app.live or event.deploy_id in app.finished:
            return
        bound = log.bind(app_id=app.id, deploy_id=event.deploy_id)
        system = _system_command(envelope)
        stages: dict[str, int] = {}
        attempt = message.metadata.num_delivered or 1
        await self._record(
            system,
            app.id,
            [DeployStarted(deploy_id=event.deploy_id, app_id=app.id, attempt=attempt)],
        )
        bound.info("deploy started", attempt=attempt, image=app.image)
        try:
            pulled = await self._pull(envelope, app, event, stages)
            rootfs = await self._unpack(pulled, stages)
            await self._record(
                system,
                app.id,
                [
                    ImagePulled(
                        deploy_id=event.deploy_id,
                        app_id=app.id,
                        digest=pulled.digest,
                        platform_digest=pulled.platform_digest,
                        bytes_fetched=pulled.bytes_fetched,
                        bytes_total=pulled.bytes_total,
                        pull_ms=stages["pull_ms"],
                        unpack_ms=stages["unpack_ms"],
                    )
                ],
            )
            handle, url = await _alive(
                message,
                self._boot(
                    app, event.deploy_id, attempt, rootfs, pulled.config, stages
                ),
            )
        except DeployFailure as failure:
            await self._record(
                system,
                app.id,
                [
                    DeployFailed(
                        deploy_id=event.deploy_id,
                        app_id=app.id,
                        error=failure.error,
                        stages=stages,
                    )
                ],
            )
            bound.warning(
                "deploy failed", stage=failure.error.stage, code=failure.error.code
            )
            return

        # The new VM answers: record it, then retire the one it replaces.
        await self._record(
            system,
            app.id,
            [
                VmBooted(
                    deploy_id=event.deploy_id,
                    app_id=app.id,
                    url=url,
                    boot_ms=stages["boot_ms"],
                ),
                DeploySucceeded(
                    deploy_id=event.deploy_id,
                    app_id=app.id,
                    digest=pulled.digest,
                    url=url,
                    stages=stages,
                ),
            ],
        )
        previous = self._running.get(app.id)
        self._running[app.id] = Running(handle, event.deploy_id)
        self._save(app.id, handle)
        if previous is not None:
            await self._driver.stop(previous.handle)
        bound.info("deploy succeeded", url=url, **stages)

    async def _pull(
        self,
        envelope: Envelope,
        app: App,
        event: DeployRequested,
        stages: dict[str, int],
    ) -> PulledImage:
        # The credential's secret as it is now: an update applies here.
        username = secret = None
        if event.credential_id is not None:
            resolved = await self._peers.resolve(
                ResolveCredential(
                    account_id=envelope.account_id,
                    actor="deployer",
                    correlation_id=envelope.correlation_id,
                    credential_id=event.credential_id,
                )
            )
            if not resolved.ok:
                assert resolved.failure is not None
                raise DeployFailure(
                    DeployError(
                        stage="resolve",
                        code=resolved.failure.code,
                        explanation=resolved.failure.detail,
                    )
                )
            username, secret = resolved.username, resolved.secret
        started = time.monotonic()
        try:
            pulled = await self._puller.pull(app.image, username, secret)
        except PullError as exc:
            registry = exc.registry_error
            explanation = exc.detail
            if exc.code == "credential_rejected" and UPDATE_ADVICE not in explanation:
                explanation = f"{explanation} {UPDATE_ADVICE}"
            raise DeployFailure(
                DeployError(
                    stage="pull",
                    code=exc.code,
                    registry_status=registry.registry_status if registry else None,
                    registry_code=registry.registry_code if registry else None,
                    registry_message=registry.registry_message if registry else None,
                    explanation=explanation,
                )
            ) from exc
        stages["pull_ms"] = _ms_since(started)
        return pulled

    async def _unpack(self, pulled: PulledImage, stages: dict[str, int]) -> Path:
        """The image's root file system as an ext4 disk, built once per digest."""
        started = time.monotonic()
        key = (pulled.platform_digest or pulled.digest).replace(":", "-")
        disks = self._data_dir / "disks"
        disks.mkdir(parents=True, exist_ok=True)
        disk = disks / f"{key}.ext4"
        if not disk.exists():
            with tempfile.TemporaryDirectory(dir=disks) as scratch:
                root = Path(scratch) / "root"
                root.mkdir()
                try:
                    await asyncio.to_thread(unpack_layers, pulled.layers, root)
                except UnpackError as exc:
                    code = (
                        "unsafe_image"
                        if isinstance(exc, UnsafeLayerError)
                        else "unpack_failed"
                    )
                    raise DeployFailure(
                        DeployError(
                            stage="unpack",
                            code=code,
                            explanation=f"The image cannot be unpacked safely: {exc}",
                        )
                    ) from exc
                built = Path(scratch) / "disk.ext4"
                await asyncio.to_thread(build_rootfs_image, root, built)
                built.replace(disk)
        stages["unpack_ms"] = _ms_since(started)
        return disk

    async def _boot(
        self,
        app: App,
        deploy_id: str,
        attempt: int,
        disk: Path,
        config: ImageConfig,
        stages: dict[str, int],
    ) -> tuple[VmHandle, str]:
        started = time.monotonic()
        spec = VmSpec(
            deploy_id=deploy_id,
            rootfs_image=disk,
            config=config,
            guest_port=app.port,
            host_port=free_host_port(),
            memory_mb=self._memory_mb,
            cpus=self._cpus,
            work_dir=self._data_dir / "vms" / f"{deploy_id}-{attempt}",
        )
        handle: VmHandle | None = None
        try:
            handle = await self._driver.start(spec)
            await self._driver.wait_ready(handle, BOOT_TIMEOUT_S)
        except (BootFailedError, VmError) as exc:
            if handle is not None:
                await self._driver.stop(handle)
            raise DeployFailure(
                DeployError(
                    stage="boot",
                    code="boot_failed",
                    explanation=f"The VM did not start serving on port {app.port}:"
                    f" {exc}",
                )
            ) from exc
        stages["boot_ms"] = _ms_since(started)
        return handle, f"http://127.0.0.1:{spec.host_port}"

    async def when_app_deleted(self, envelope: Envelope, event: AppDeleted) -> None:
        running = self._running.pop(event.app_id, None)
        if running is None:
            return
        await self._driver.stop(running.handle)
        self._record_path(event.app_id).unlink(missing_ok=True)
        system = _system_command(envelope)
        await self._record(
            system,
            event.app_id,
            [AppStopped(app_id=event.app_id, deploy_id=running.deploy_id)],
            allow_deleted=True,
        )
        log.info("vm stopped", app_id=event.app_id, deploy_id=running.deploy_id)

    async def restore(self) -> None:
        """Boot again the Apps whose last deploy the log says succeeded."""
        running = await self._running_apps()
        for app_id in running:
            self._adopt(app_id)
        self._stop_orphans()
        for app_id, (account_id, record) in running.items():
            adopted = self._running.get(app_id)
            if adopted is not None and adopted.deploy_id == record:
                continue
            command = RedeployApp(
                account_id=account_id, actor="deployer", app_id=app_id
            )
            reply = await self._handlers.redeploy_app(command, reason="restore")
            log.info("app restore requested", app_id=app_id, ok=reply.ok)

    async def _running_apps(self) -> dict[str, tuple[str, str]]:
        """App id → (account, deploy) for Apps running as of the log's end."""
        running: dict[str, tuple[str, str]] = {}
        last = await self._events.last_position()
        if last == 0:
            return running
        sub = await self._js.subscribe(
            APP_EVENTS, ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL
        )
        try:
            while True:
                message = await sub.next_msg(timeout=5)
                envelope = Envelope.model_validate_json(message.data)
                event = parse_event(envelope.type, envelope.data)
                match event:
                    case DeploySucceeded():
                        running[event.app_id] = (envelope.account_id, event.deploy_id)
                    case AppStopped() | AppDeleted():
                        running.pop(event.app_id, None)
                if message.metadata.num_pending == 0:
                    break
        except NatsTimeoutError:
            pass
        finally:
            await sub.unsubscribe()
        return running

    def _adopt(self, app_id: str) -> VmHandle | None:
        path = self._record_path(app_id)
        if not path.exists():
            return None
        handle = VmHandle.from_json(path.read_text())
        if not self._driver.running(handle):
            path.unlink(missing_ok=True)
            return None
        self._running[app_id] = Running(handle, handle.deploy_id)
        return handle

    def _stop_orphans(self) -> None:
        """Kill VMs left by an attempt that died with its deployer."""
        vms = str(self._data_dir / "vms")
        kept = {str(running.handle.work_dir) for running in self._running.values()}
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            words = [word.decode(errors="replace") for word in argv]
            if (
                not words
                or "qemu-system" not in words[0]
                or not any(vms in word for word in words)
            ):
                continue
            if any(dir_ in word for word in words for dir_ in kept):
                continue
            log.warning("stopping an orphaned vm", pid=proc.name)
            with contextlib.suppress(OSError):
                os.kill(int(proc.name), signal.SIGKILL)

    async def stop_all(self) -> None:
        """Stop every VM of this process; the log still says they run."""
        for app_id, running in list(self._running.items()):
            with contextlib.suppress(Exception):
                await self._driver.stop(running.handle)
            self._record_path(app_id).unlink(missing_ok=True)
        self._running.clear()

    def _record_path(self, app_id: str) -> Path:
        return self._data_dir / "vms" / f"{app_id}.json"

    def _save(self, app_id: str, handle: VmHandle) -> None:
        path = self._record_path(app_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(handle.to_json())

    async def _record(
        self,
        command: Command,
        app_id: str,
        events: list[Event],
        *,
        allow_deleted: bool = False,
    ) -> None:
        """Append stage events at the App's current version, whatever moved."""

        async def attempt() -> None:
            app = await self._handlers.load(app_id)
            if app.deleted and not allow_deleted:
                return
            await self._events.record(command, "app", app_id, app.version, events)

        await with_retries(attempt, what="record deploy stage")


def _system_command(envelope: Envelope) -> Command:
    """The deployer acting on an App's behalf, in the request's correlation."""
    return Command(
        command_id=new_id("sys"),
        account_id=envelope.account_id,
        actor="deployer",
        correlation_id=envelope.correlation_id,
    )


async def _alive(message: Msg, step: Awaitable[T]) -> T:
    """Run a long step, telling JetStream meanwhile that the deploy is alive."""
    task = asyncio.ensure_future(step)
    while True:
        done, _ = await asyncio.wait({task}, timeout=HEARTBEAT_S)
        if done:
            return task.result()
        with contextlib.suppress(Exception):
            await message.in_progress()


def _ms_since(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
