"""Credential add: POST /v1/credentials end to end ÷ the bare registry calls.

The baseline is a plain httpx script making the calls a verification needs
against the same local token-auth registry: the ``/v2/`` challenge, a token
from the realm with Basic credentials, and ``/v2/`` again with the token.
"""

from time import perf_counter

import httpx

from bench.stack import bearer_token, report, suite_with_registry
from tests.support.registry import ALICE, LocalRegistry

REQUESTS = 100


def bare(registry: LocalRegistry) -> float:
    started = perf_counter()
    with httpx.Client(timeout=10) as client:
        token = bearer_token(client, registry)
        answer = client.get(
            f"{registry.url}/v2/", headers={"Authorization": f"Bearer {token}"}
        )
        assert answer.status_code == 200
    return perf_counter() - started


def main() -> None:
    with suite_with_registry() as (suite, registry):
        username, password = ALICE
        body = {"registry": registry.host, "username": username, "secret": password}
        ours: list[float] = []
        with suite.client(suite.new_account("bench")) as api:
            for _ in range(REQUESTS + 5):
                started = perf_counter()
                response = api.post("/v1/credentials", json=body)
                ours.append(perf_counter() - started)
                assert response.status_code == 201, response.text
        baseline = [bare(registry) for _ in range(REQUESTS + 5)]
    report("POST /v1/credentials", ours, baseline)


if __name__ == "__main__":
    main()
