"""The suite as separate processes on real servers, for tests and benchmarks."""

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from uuid import uuid4

import httpx
import pytest
from sqlalchemy import create_engine, make_url, text

from services.backbone.embedded import EmbeddedNats
from services.backbone.settings import Settings
from services.cli import create_account
from services.gateway.migrate import upgrade
from tests.support.registry import LocalRegistry

SERVICES = ("verifier", "credentials", "deployer", "gateway")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Suite:
    url: str
    settings: Settings
    logs: dict[str, Path]
    env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def new_account(self, name: str) -> str:
        # A loop of its own, apart from the one pytest-asyncio may be running.
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(
                asyncio.run, create_account(self.settings, name)
            ).result()

    def client(self, token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def start(self, service: str) -> None:
        """Start one service (again), appending to its log."""
        self.processes[service] = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "serve", service],
            env=self.env,
            stdout=self.logs[service].open("ab"),
            stderr=subprocess.STDOUT,
        )

    def stop(self, service: str) -> None:
        """Stop one service the way an operator would (SIGTERM)."""
        process = self.processes[service]
        process.terminate()
        process.wait(timeout=30)

    def kill(self, service: str) -> None:
        """Kill one service abruptly, as a crash would."""
        process = self.processes[service]
        process.kill()
        process.wait()

    def log_text(self) -> str:
        return "".join(path.read_text(errors="replace") for path in self.logs.values())


def insecure_hosts(*registries: LocalRegistry) -> list[str]:
    """Registries and their token issuers, all plain HTTP on loopback."""
    hosts = []
    for registry in registries:
        hosts.append(registry.host)
        if registry.issuer is not None:
            hosts.append(f"127.0.0.1:{registry.issuer.port}")
    return hosts


@contextlib.contextmanager
def running_suite(
    nats_url: str,
    database_url: str,
    directory: Path,
    registries: tuple[LocalRegistry, ...],
    log_level: str = "DEBUG",
    extra_env: dict[str, str] | None = None,
) -> Iterator[Suite]:
    """Start every service as its own process; stop them by PID on exit."""
    port = free_port()
    env = {
        **os.environ,
        "CRABGLAMP_NATS_URL": nats_url,
        "CRABGLAMP_DATABASE_URL": database_url,
        "CRABGLAMP_HTTP_PORT": str(port),
        "CRABGLAMP_DATA_DIR": str(directory / "data"),
        "CRABGLAMP_INSECURE_REGISTRIES": ",".join(insecure_hosts(*registries)),
        "CRABGLAMP_ALLOW_REGISTRIES": "127.0.0.1",
        "CRABGLAMP_LOG_LEVEL": log_level,
        **(extra_env or {}),
    }
    upgrade(database_url)
    settings = Settings(
        nats_url=nats_url, database_url=database_url, data_dir=directory / "data"
    )
    suite = Suite(f"http://127.0.0.1:{port}", settings, {}, env)
    try:
        for service in SERVICES:
            suite.logs[service] = directory / f"{service}.log"
            suite.start(service)
        _wait_ready(suite)
        yield suite
    finally:
        for process in suite.processes.values():
            process.terminate()
        for process in suite.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(suite: Suite) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for name, process in list(suite.processes.items()):
            if process.poll() is None:
                continue
            log = suite.logs[name].read_text()
            if name == "gateway" and "address already in use" in log:
                # Another server took the free port first: take another one.
                port = free_port()
                suite.env["CRABGLAMP_HTTP_PORT"] = str(port)
                suite.url = f"http://127.0.0.1:{port}"
                suite.start(name)
                continue
            raise RuntimeError(f"{name} exited:\n{log}")
        try:
            if httpx.get(f"{suite.url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    else:
        raise RuntimeError("the gateway did not become ready:\n" + suite.log_text())

    # Bad input passes through every service: each of them answers.
    with suite.client(suite.new_account("readiness-probe")) as client:
        while time.monotonic() < deadline:
            probe = {"registry": "bad host", "username": "u", "secret": "s"}
            app = {"name": "probe", "image": "Not/A/Reference"}
            if (
                client.post("/v1/credentials", json=probe).status_code == 422
                and client.post("/v1/apps", json=app).status_code == 422
            ):
                return
            time.sleep(0.2)
    raise RuntimeError("the services did not answer:\n" + suite.log_text())


@contextlib.contextmanager
def own_nats(use_containers: bool, directory: Path) -> Iterator[str]:
    """A NATS server of its own, so no other suite answers this one's commands."""
    if use_containers:
        from testcontainers.community.nats import NatsContainer

        with NatsContainer("nats:2.10", jetstream=True) as container:
            yield container.nats_uri()
        return
    with EmbeddedNats(directory) as server:
        yield server.url


@contextlib.contextmanager
def own_database(database_url: str) -> Iterator[str]:
    """A database of its own on the shared server, dropped afterwards."""
    name = f"crabglamp_suite_{uuid4().hex[:8]}"
    admin = create_engine(database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'create database "{name}"'))
    try:
        url = make_url(database_url).set(database=name)
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'drop database if exists "{name}" with (force)'))
        admin.dispose()


@contextlib.contextmanager
def isolated_suite(
    request: pytest.FixtureRequest,
    *registries: LocalRegistry,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Suite]:
    """The whole suite on its own NATS and database, trusting ``registries``."""
    containers: bool = request.getfixturevalue("use_containers")
    database_url: str = request.getfixturevalue("database_url")
    factory: pytest.TempPathFactory = request.getfixturevalue("tmp_path_factory")
    with (
        own_nats(containers, factory.mktemp("nats")) as nats_url,
        own_database(database_url) as own_url,
        running_suite(
            nats_url,
            own_url,
            factory.mktemp("suite"),
            registries,
            extra_env=extra_env,
        ) as suite,
    ):
        yield suite
