"""The running suite, each service its own process, driven through the gateway."""

from collections.abc import Iterator

import httpx
import pytest

from tests.support.registry import LocalRegistry
from tests.support.suite import Suite, running_suite


@pytest.fixture(scope="session")
def suite(
    nats_url: str,
    database_url: str,
    registry_basic: LocalRegistry,
    registry_token: LocalRegistry,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Suite]:
    with running_suite(
        nats_url,
        database_url,
        tmp_path_factory.mktemp("suite"),
        (registry_basic, registry_token),
        # Apps here use images that do not boot; deploys have their own suite.
        extra_env={"CRABGLAMP_DEPLOY_WORKERS": "0"},
    ) as suite:
        yield suite


@pytest.fixture(scope="session")
def token(suite: Suite) -> str:
    return suite.new_account("team-a")


@pytest.fixture(scope="session")
def api(suite: Suite, token: str) -> Iterator[httpx.Client]:
    with suite.client(token) as client:
        yield client
