"""Real servers shared by the whole test run: NATS, PostgreSQL, two registries.

NATS and PostgreSQL come from testcontainers where a Docker engine answers,
otherwise from the embedded servers that ``crabglamp up`` uses.
"""

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from services.backbone.embedded import (  # noqa: E402
    EmbeddedNats,
    EmbeddedPostgres,
    docker_available,
)
from tests.support.registry import ADMIN, ALICE, NOBODY, LocalRegistry  # noqa: E402


@pytest.fixture(scope="session")
def use_containers() -> bool:
    return docker_available()


@pytest.fixture(scope="session")
def nats_url(
    use_containers: bool, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """``nats://`` URL of a JetStream-enabled server."""
    if use_containers:
        from testcontainers.community.nats import NatsContainer

        with NatsContainer("nats:2.10", jetstream=True) as container:
            yield container.nats_uri()
        return
    with EmbeddedNats(tmp_path_factory.mktemp("nats")) as server:
        yield server.url


@pytest.fixture(scope="session")
def database_url(use_containers: bool) -> Iterator[str]:
    """SQLAlchemy ``postgresql+psycopg://`` URL of an empty ``crabglamp`` DB."""
    if use_containers:
        from testcontainers.community.postgres import PostgresContainer

        with PostgresContainer(
            "postgres:15",
            username="crabglamp",
            password="crabglamp",
            dbname="crabglamp",
            driver="psycopg",
        ) as container:
            yield container.get_connection_url()
        return
    # The postgres system user (used when running as root) must reach the cluster.
    base = Path(tempfile.mkdtemp(prefix="crabglamp-pg-"))
    base.chmod(0o755)
    try:
        with EmbeddedPostgres(base / "cluster") as server:
            yield server.url
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def registry_basic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """Registry with htpasswd Basic auth; users alice and admin."""
    registry = LocalRegistry(
        tmp_path_factory.mktemp("registry-basic"), users=dict([ALICE, ADMIN])
    )
    with registry:
        yield registry


@pytest.fixture(scope="session")
def registry_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """Registry with token auth; alice and admin may do anything, nobody nothing."""
    registry = LocalRegistry(
        tmp_path_factory.mktemp("registry-token"),
        auth="token",
        users=dict([ALICE, ADMIN]),
    )
    registry.add_user(*NOBODY, repos={})
    with registry:
        yield registry
