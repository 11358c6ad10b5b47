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

import httpx

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
    }
    upgrade(database_url)
    settings = Settings(
        nats_url=nats_url, database_url=database_url, data_dir=directory / "data"
    )
    suite = Suite(f"http://127.0.0.1:{port}", settings, {})
    try:
        for service in SERVICES:
            log = directory / f"{service}.log"
            suite.logs[service] = log
            suite.processes[service] = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "serve", service],
                env=env,
                stdout=log.open("wb"),
                stderr=subprocess.STDOUT,
            )
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
        for name, process in suite.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited:\n{suite.logs[name].read_text()}")
        try:
            if httpx.get(f"{suite.url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    else:
        raise RuntimeError("the gateway did not become ready:\n" + suite.log_text())

    # A bad host passes gateway, credentials and verifier: all three answer.
    with suite.client(suite.new_account("readiness-probe")) as client:
        while time.monotonic() < deadline:
            probe = {"registry": "bad host", "username": "u", "secret": "s"}
            if client.post("/v1/credentials", json=probe).status_code == 422:
                return
            time.sleep(0.2)
    raise RuntimeError("the services did not answer:\n" + suite.log_text())
