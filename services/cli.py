"""The ``crabglamp`` command: run the suite, one service, or ops tasks."""

import asyncio
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, NoReturn

import httpx
import nats
import typer
from rich.console import Console
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from contracts.envelope import Envelope, new_id
from contracts.events import AccountCreated
from services.backbone.eventlog import EventLog
from services.backbone.logging import configure_logging
from services.backbone.settings import Settings

app = typer.Typer(help="CrabGlamp: private images on App VMs.", no_args_is_help=True)
accounts_app = typer.Typer(help="Accounts and their API tokens.", no_args_is_help=True)
app.add_typer(accounts_app, name="accounts")
deploys_app = typer.Typer(help="Deploys, for ops.", no_args_is_help=True)
app.add_typer(deploys_app, name="deploys")
keys_app = typer.Typer(
    help="The master key that wraps data keys.", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")
console = Console(stderr=True)

RUNTIME_FILE = "runtime.json"
LOCAL_ACCOUNT_FILE = "local-account"


class Service(StrEnum):
    gateway = "gateway"
    credentials = "credentials"
    verifier = "verifier"
    deployer = "deployer"


def load_settings() -> Settings:
    """Environment first; else the URLs a running ``crabglamp up`` recorded."""
    settings = Settings()
    runtime = settings.data_dir / RUNTIME_FILE
    if runtime.exists():
        recorded = json.loads(runtime.read_text())
        updates = {
            key: value
            for key, value in recorded.items()
            if f"CRABGLAMP_{key.upper()}" not in os.environ
        }
        settings = settings.model_copy(update=updates)
    return settings


@app.command()
def serve(service: Service) -> None:
    """Run one service in the foreground (it connects only through NATS)."""
    settings = load_settings()
    configure_logging(service.value, settings.log_format, settings.log_level)
    match service:
        case Service.gateway:
            import uvicorn

            from services.gateway.app import create_app
            from services.gateway.migrate import upgrade

            upgrade(settings.database_url)
            uvicorn.run(
                create_app(settings),
                host=settings.http_host,
                port=settings.http_port,
                log_config=None,
                access_log=False,
            )
        case Service.credentials:
            from services.credentials.entrypoint import run as run_credentials

            run_credentials(settings)
        case Service.deployer:
            from services.deployer.entrypoint import run as run_deployer

            run_deployer(settings)
        case Service.verifier:
            from services.verifier.entrypoint import run as run_verifier

            asyncio.run(run_verifier(settings))


async def create_account(settings: Settings, name: str, wait_s: float = 15.0) -> str:
    """Record a new account and return its token once the gateway knows it."""
    token = "cgt_" + secrets.token_urlsafe(32)
    digest = _digest(token)
    account_id = new_id("acct")
    nc = await nats.connect(settings.nats_url, name="crabglamp-cli")
    try:
        events = EventLog(nc)
        await events.ensure_stream(settings.stream_replicas)
        event = AccountCreated(account_id=account_id, name=name, token_sha256=digest)
        envelope = Envelope(
            type=event.type,
            aggregate_type="account",
            aggregate_id=account_id,
            account_id=account_id,
            actor="cli",
            correlation_id=new_id("cor"),
            data=event.model_dump(mode="json"),
        )
        await events.append([envelope], 0, f"create-{account_id}")
    finally:
        await nc.drain()
    await _wait_for_account(settings, digest, wait_s)
    return token


async def _wait_for_account(settings: Settings, digest: str, wait_s: float) -> None:
    from services.gateway.readmodel import accounts

    engine = create_async_engine(settings.database_url)
    deadline = time.monotonic() + wait_s
    try:
        while time.monotonic() < deadline:
            try:
                async with engine.connect() as conn:
                    found = await conn.execute(
                        select(accounts.c.id).where(accounts.c.token_sha256 == digest)
                    )
                    if found.scalar_one_or_none():
                        return
            except Exception:  # the read model may not exist yet: keep waiting
                pass
            await asyncio.sleep(0.1)
    finally:
        await engine.dispose()
    console.print(
        "[yellow]The account is recorded; the gateway has not projected it yet."
    )


def _digest(token: str) -> str:
    from services.gateway.app import token_digest

    return token_digest(token)


@accounts_app.command("create")
def accounts_create(name: str) -> None:
    """Create an account; its token is the last line printed (shown once)."""
    settings = load_settings()
    token = asyncio.run(create_account(settings, name))
    console.print(f"Account [bold]{name}[/bold] created. Its token, shown only once:")
    print(token)


@keys_app.command("rotate")
def keys_rotate() -> None:
    """Add a new master key and rewrap every live data key under it.

    The event log is not touched. Restart the credentials service afterwards
    so new data keys are wrapped with the new master key too.
    """
    from services.credentials.sealing import DataKeyStore, MasterKeyring

    settings = load_settings()
    path = settings.resolved_master_key_file
    ring = MasterKeyring.load_or_create(path)
    rotated = ring.rotated()
    # Saved first: a data key rewrapped below must never be unreadable.
    rotated.save(path)

    async def rewrap() -> int:
        nc = await nats.connect(settings.nats_url, name="crabglamp-cli")
        try:
            store = await DataKeyStore.open(nc, ring, settings.stream_replicas)
            return await store.rewrap_all(rotated)
        finally:
            await nc.drain()

    count = asyncio.run(rewrap())
    console.print(
        f"Master key version {rotated.active_version} is active;"
        f" {count} data keys rewrapped."
    )
    # TODO: retire old master key versions once no wrapped data key uses them;
    # they stay in the key file so a service still holding the old ring works.


@deploys_app.command("console")
def deploys_console(deploy_id: str) -> None:
    """Print what a deploy's VM wrote to its console (kept on the deployer)."""
    if not re.fullmatch(r"dep_[0-9a-f]{32}", deploy_id):
        _fail(f"'{deploy_id[:80]}' is not a deploy id (dep_ and 32 hex digits).")
    vms = load_settings().data_dir.resolve() / "deployer" / "vms"
    logs = sorted(vms.glob(f"{deploy_id}-*/console.log"))
    if not logs:
        _fail(f"No console is kept for {deploy_id} under {vms}.")
    for path in logs:
        attempt = path.parent.name.rsplit("-", 1)[-1]
        console.print(f"[bold]{deploy_id}, attempt {attempt}[/bold] ({path})")
        print(path.read_text(errors="replace"), end="")


@app.command()
def contracts(directory: Path) -> None:
    """Write the contract: JSON Schema per model and an AsyncAPI document."""
    from contracts.schema import asyncapi, json_schemas

    (directory / "schemas").mkdir(parents=True, exist_ok=True)
    for name, schema in json_schemas().items():
        (directory / "schemas" / f"{name}.json").write_text(
            json.dumps(schema, indent=2)
        )
    (directory / "asyncapi.json").write_text(json.dumps(asyncapi(), indent=2))
    console.print(f"Contract written to {directory}.")


@app.command()
def migrate() -> None:
    """Bring the read model's schema up to date."""
    from services.gateway.migrate import upgrade

    upgrade(load_settings().database_url)


@app.command()
def up(
    nats_url: Annotated[str | None, typer.Option(envvar="CRABGLAMP_NATS_URL")] = None,
    database_url: Annotated[
        str | None, typer.Option(envvar="CRABGLAMP_DATABASE_URL")
    ] = None,
    http_port: Annotated[int, typer.Option(envvar="CRABGLAMP_HTTP_PORT")] = 8080,
    data_dir: Annotated[Path, typer.Option(envvar="CRABGLAMP_DATA_DIR")] = Path(
        ".data"
    ),
) -> None:
    """Run the whole suite on this machine until Ctrl-C."""
    from services.backbone.embedded import EmbeddedNats, EmbeddedPostgres

    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    embedded: list[EmbeddedNats | EmbeddedPostgres] = []
    children: list[subprocess.Popen[bytes]] = []
    try:
        # Servers: the ones given by URL, else embedded ones in the data dir.
        if nats_url is None:
            console.print("Starting embedded NATS with JetStream…")
            nats_server = EmbeddedNats(data_dir / "nats")
            nats_server.start()
            embedded.append(nats_server)
            nats_url = nats_server.url
        if database_url is None:
            console.print("Starting embedded PostgreSQL…")
            postgres = EmbeddedPostgres(data_dir / "postgres")
            postgres.start()
            embedded.append(postgres)
            database_url = postgres.url
        runtime = {
            "nats_url": nats_url,
            "database_url": database_url,
            "http_port": http_port,
            "data_dir": str(data_dir),
        }
        (data_dir / RUNTIME_FILE).write_text(json.dumps(runtime))
        env = {
            **os.environ,
            "CRABGLAMP_NATS_URL": nats_url,
            "CRABGLAMP_DATABASE_URL": database_url,
            "CRABGLAMP_HTTP_PORT": str(http_port),
            "CRABGLAMP_DATA_DIR": str(data_dir),
        }
        settings = Settings(**runtime)  # type: ignore[arg-type]

        # Services: each its own process, talking only through NATS.
        from services.gateway.migrate import upgrade

        upgrade(database_url)
        for service in Service:
            children.append(
                subprocess.Popen(
                    [sys.executable, "-m", "services.cli", "serve", service.value],
                    env=env,
                )
            )
        url = f"http://127.0.0.1:{http_port}"
        _wait_ready(url, children)

        # The local account is made once; its token is shown that one time.
        marker = data_dir / LOCAL_ACCOUNT_FILE
        token = None
        if not marker.exists():
            token = asyncio.run(create_account(settings, "local"))
            marker.write_text("local\n")
        console.print(f"\n[bold green]CrabGlamp is up[/bold green]: {url}")
        if token:
            console.print("Local account token (shown once, keep it):")
            print(token, flush=True)
        else:
            console.print(
                "The local account's token was shown on first start; make another"
                " with `crabglamp accounts create NAME`."
            )
        _wait_for_signal(children)
    finally:
        _stop(children)
        for server in reversed(embedded):
            server.stop()
        console.print("Stopped.")


def _wait_ready(url: str, children: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for child in children:
            if child.poll() is not None:
                _fail(f"a service exited with status {child.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    _fail("the gateway did not become ready within 60 s")


def _fail(message: str) -> NoReturn:
    console.print(f"[red]{message}")
    raise typer.Exit(1)


def _wait_for_signal(children: list[subprocess.Popen[bytes]]) -> None:
    stop = {"now": False}

    def handle(_signum: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    while not stop["now"]:
        for child in children:
            if child.poll() is not None:
                console.print(f"[red]A service exited with status {child.returncode}")
                return
        time.sleep(0.2)


def _stop(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
