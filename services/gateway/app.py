"""The gateway's HTTP app: JSON API, dashboard, health and metrics."""

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, TypeVar

import nats
import structlog
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from nats.aio.client import Client as NATS
from prometheus_client import Counter, Histogram, make_asgi_app
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from contracts import subjects
from contracts.commands import (
    AddCredential,
    ChangeAppCredential,
    CreateApp,
    DeleteApp,
    DeleteCredential,
    InlineCredential,
    RedeployApp,
    UpdateCredential,
)
from contracts.replies import AppReply, CredentialReply
from services.backbone import bus
from services.backbone.errors import ServiceUnavailableError
from services.backbone.eventlog import EventLog
from services.backbone.projection import ProjectionRunner
from services.backbone.settings import Settings
from services.gateway import queries
from services.gateway.problems import (
    ProblemError,
    from_failure,
    handle_problem,
    handle_validation,
    not_found,
)
from services.gateway.projections import ReadModelProjector
from services.gateway.schemas import (
    AppIn,
    AppList,
    AppOut,
    AppPatch,
    AuditPage,
    CredentialIn,
    CredentialList,
    CredentialOut,
    CredentialPatch,
    DeployList,
    DeployOut,
)

log = structlog.get_logger(__name__)
STATIC = Path(__file__).parent / "static"
READ_YOUR_WRITES_S = 5.0

REQUESTS = Counter(
    "crabglamp_http_requests_total", "HTTP requests", ["method", "route", "status"]
)
LATENCY = Histogram(
    "crabglamp_http_request_seconds", "HTTP request latency", ["method", "route"]
)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


Outcome = TypeVar("Outcome", CredentialReply, AppReply)


@dataclass
class Gateway:
    """What every route needs, built once by the lifespan."""

    settings: Settings
    nc: NATS
    engine: AsyncEngine
    events: EventLog
    projection: ProjectionRunner

    async def command(
        self,
        subject: str,
        command: BaseModel,
        reply_type: type[Outcome] = CredentialReply,  # type: ignore[assignment]
    ) -> Outcome:
        """Send a command and wait, bounded, until its result is readable."""
        try:
            reply = await bus.request(
                self.nc,
                subject,
                command,
                reply_type,
                timeout_s=self.settings.request_timeout_s,
            )
        except ServiceUnavailableError as exc:
            log.error("command not answered", subject=subject, error=str(exc))
            raise ProblemError(
                "service_unavailable", f"{exc}; try again shortly."
            ) from exc
        if reply.position is not None:
            await self.projection.wait_for(reply.position, READ_YOUR_WRITES_S)
        if not reply.ok:
            assert reply.failure is not None
            raise from_failure(reply.failure)
        return reply


def gateway(request: Request) -> Gateway:
    state: Gateway = request.app.state.gateway
    return state


async def account(request: Request, gw: Annotated[Gateway, Depends(gateway)]) -> str:
    """The account whose bearer token came with the request."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ProblemError(
            "unauthorized", "Send an account token as 'Authorization: Bearer <token>'."
        )
    account_id = await queries.account_by_token(gw.engine, token_digest(token.strip()))
    if account_id is None:
        raise ProblemError("unauthorized", "The account token is not valid.")
    structlog.contextvars.bind_contextvars(account_id=account_id)
    return account_id


GatewayDep = Annotated[Gateway, Depends(gateway)]
AccountDep = Annotated[str, Depends(account)]


def create_app(settings: Settings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nc = await nats.connect(settings.nats_url, name="crabglamp-gateway")
        events = EventLog(nc)
        await events.ensure_stream(settings.stream_replicas)
        engine = create_async_engine(settings.database_url, pool_pre_ping=True)
        runner = ProjectionRunner(nc, engine, ReadModelProjector())
        task = asyncio.create_task(runner.run_supervised(), name="projection")
        app.state.gateway = Gateway(settings, nc, engine, events, runner)
        log.info("gateway ready", port=settings.http_port)
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await nc.drain()
            await engine.dispose()

    app = FastAPI(
        title="CrabGlamp",
        version="1",
        description="Private images on App VMs: registry credentials and Apps.",
        lifespan=lifespan,
    )
    app.add_exception_handler(ProblemError, handle_problem)
    app.add_exception_handler(RequestValidationError, handle_validation)
    app.mount("/metrics", make_asgi_app())
    _observe(app)
    _operations(app)
    _credentials(app)
    _apps(app)
    _audit(app)
    return app


def _observe(app: FastAPI) -> None:
    @app.middleware("http")
    async def metrics(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        LATENCY.labels(request.method, path).observe(time.perf_counter() - started)
        REQUESTS.labels(request.method, path, str(response.status_code)).inc()
        return response


def _operations(app: FastAPI) -> None:
    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(gw: GatewayDep) -> JSONResponse:
        checks: dict[str, str] = {}
        checks["nats"] = "ok" if gw.nc.is_connected else "disconnected"
        try:
            async with gw.engine.connect() as conn:
                await conn.execute(text("select 1"))
            checks["postgres"] = "ok"
        except Exception as exc:  # readiness reports, it does not raise
            checks["postgres"] = type(exc).__name__
        try:
            last = await gw.events.last_position()
            behind = last - gw.projection.position
            checks["projections"] = "ok" if behind <= 0 else f"{behind} behind"
        except Exception as exc:  # readiness reports, it does not raise
            checks["projections"] = type(exc).__name__
        ready = all(value == "ok" for value in checks.values())
        return JSONResponse(checks, status_code=200 if ready else 503)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text())


def _credentials(app: FastAPI) -> None:
    async def one(gw: Gateway, account_id: str, credential_id: str) -> CredentialOut:
        found = await queries.list_credentials(gw.engine, account_id, credential_id)
        if not found:
            raise not_found("credential_not_found", f"Credential {credential_id}")
        return found[0]

    @app.post("/v1/credentials", status_code=201, response_model=CredentialOut)
    async def add_credential(
        body: CredentialIn, gw: GatewayDep, account_id: AccountDep
    ) -> CredentialOut:
        command = AddCredential(
            account_id=account_id,
            actor=account_id,
            registry=body.registry,
            username=body.username,
            secret=body.secret,
            name=body.name,
        )
        await gw.command(subjects.ADD_CREDENTIAL, command)
        return await one(gw, account_id, command.credential_id)

    @app.get("/v1/credentials", response_model=CredentialList)
    async def list_credentials(
        gw: GatewayDep, account_id: AccountDep
    ) -> CredentialList:
        return CredentialList(
            items=await queries.list_credentials(gw.engine, account_id)
        )

    @app.get("/v1/credentials/{credential_id}", response_model=CredentialOut)
    async def get_credential(
        credential_id: str, gw: GatewayDep, account_id: AccountDep
    ) -> CredentialOut:
        return await one(gw, account_id, credential_id)

    @app.patch("/v1/credentials/{credential_id}", response_model=CredentialOut)
    async def update_credential(
        credential_id: str,
        body: CredentialPatch,
        gw: GatewayDep,
        account_id: AccountDep,
    ) -> CredentialOut:
        await one(gw, account_id, credential_id)
        command = UpdateCredential(
            account_id=account_id,
            actor=account_id,
            credential_id=credential_id,
            username=body.username,
            secret=body.secret,
            name=body.name,
        )
        await gw.command(subjects.UPDATE_CREDENTIAL, command)
        return await one(gw, account_id, credential_id)

    @app.delete("/v1/credentials/{credential_id}", status_code=204)
    async def delete_credential(
        credential_id: str, gw: GatewayDep, account_id: AccountDep
    ) -> Response:
        await one(gw, account_id, credential_id)
        command = DeleteCredential(
            account_id=account_id, actor=account_id, credential_id=credential_id
        )
        await gw.command(subjects.DELETE_CREDENTIAL, command)
        return Response(status_code=204)


def _apps(app: FastAPI) -> None:
    async def one(gw: Gateway, account_id: str, app_id: str) -> AppOut:
        found = await queries.list_apps(gw.engine, account_id, app_id)
        if not found:
            raise not_found("app_not_found", f"App {app_id}")
        return found[0]

    @app.post("/v1/apps", status_code=201, response_model=AppOut)
    async def create_app(body: AppIn, gw: GatewayDep, account_id: AccountDep) -> AppOut:
        inline = None
        if body.credential is not None:
            inline = InlineCredential(
                registry=body.credential.registry,
                username=body.credential.username,
                secret=body.credential.secret,
                name=body.credential.name,
            )
        command = CreateApp(
            account_id=account_id,
            actor=account_id,
            name=body.name,
            image=body.image,
            credential_id=body.credential_id,
            credential=inline,
            port=body.port,
        )
        await gw.command(subjects.CREATE_APP, command, AppReply)
        return await one(gw, account_id, command.app_id)

    @app.get("/v1/apps", response_model=AppList)
    async def list_apps(gw: GatewayDep, account_id: AccountDep) -> AppList:
        return AppList(items=await queries.list_apps(gw.engine, account_id))

    @app.get("/v1/apps/{app_id}", response_model=AppOut)
    async def get_app(app_id: str, gw: GatewayDep, account_id: AccountDep) -> AppOut:
        return await one(gw, account_id, app_id)

    @app.patch("/v1/apps/{app_id}", response_model=AppOut)
    async def change_app(
        app_id: str, body: AppPatch, gw: GatewayDep, account_id: AccountDep
    ) -> AppOut:
        await one(gw, account_id, app_id)
        command = ChangeAppCredential(
            account_id=account_id,
            actor=account_id,
            app_id=app_id,
            credential_id=body.credential_id,
        )
        await gw.command(subjects.CHANGE_APP_CREDENTIAL, command, AppReply)
        return await one(gw, account_id, app_id)

    @app.delete("/v1/apps/{app_id}", status_code=204)
    async def delete_app(
        app_id: str, gw: GatewayDep, account_id: AccountDep
    ) -> Response:
        await one(gw, account_id, app_id)
        command = DeleteApp(account_id=account_id, actor=account_id, app_id=app_id)
        await gw.command(subjects.DELETE_APP, command, AppReply)
        return Response(status_code=204)

    @app.post("/v1/apps/{app_id}/deploys", status_code=202, response_model=DeployOut)
    async def redeploy(
        app_id: str, gw: GatewayDep, account_id: AccountDep
    ) -> DeployOut:
        await one(gw, account_id, app_id)
        command = RedeployApp(account_id=account_id, actor=account_id, app_id=app_id)
        await gw.command(subjects.REDEPLOY_APP, command, AppReply)
        found = await queries.list_deploys(
            gw.engine, account_id, deploy_id=command.deploy_id
        )
        return found[0]

    @app.get("/v1/apps/{app_id}/deploys", response_model=DeployList)
    async def app_deploys(
        app_id: str, gw: GatewayDep, account_id: AccountDep
    ) -> DeployList:
        await one(gw, account_id, app_id)
        return DeployList(
            items=await queries.list_deploys(gw.engine, account_id, app_id=app_id)
        )

    @app.get("/v1/deploys/{deploy_id}", response_model=DeployOut)
    async def get_deploy(
        deploy_id: str, gw: GatewayDep, account_id: AccountDep
    ) -> DeployOut:
        found = await queries.list_deploys(gw.engine, account_id, deploy_id=deploy_id)
        if not found:
            raise not_found("deploy_not_found", f"Deploy {deploy_id}")
        return found[0]


def _audit(app: FastAPI) -> None:
    @app.get("/v1/events", response_model=AuditPage)
    async def audit_log(
        gw: GatewayDep,
        account_id: AccountDep,
        after: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        type: Annotated[str | None, Query(max_length=100)] = None,
        subject: Annotated[str | None, Query(max_length=300)] = None,
    ) -> AuditPage:
        items = await queries.audit_page(
            gw.engine, account_id, after, limit, type, subject
        )
        return AuditPage(items=items, next=items[-1].position if items else after)

    @app.get("/v1/events/stream", response_class=StreamingResponse)
    async def audit_stream(
        request: Request,
        gw: GatewayDep,
        account_id: AccountDep,
        after: Annotated[int, Query(ge=0)] = 0,
        type: Annotated[str | None, Query(max_length=100)] = None,
        subject: Annotated[str | None, Query(max_length=300)] = None,
    ) -> StreamingResponse:
        """The audit log as Server-Sent Events, live; ``id`` is the position."""

        async def events() -> AsyncIterator[str]:
            position = int(request.headers.get("last-event-id", after) or after)
            while not await request.is_disconnected():
                items = await queries.audit_page(
                    gw.engine, account_id, position, 100, type, subject
                )
                for item in items:
                    position = item.position
                    body = item.model_dump_json()
                    yield f"id: {item.position}\nevent: {item.type}\ndata: {body}\n\n"
                if not items:
                    # Wait for the projection to move instead of polling hard.
                    await gw.projection.wait_for(gw.projection.position + 1, 15)
                    yield ": keep-alive\n\n"

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store"},
        )
