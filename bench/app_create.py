"""App creation: POST /v1/apps to 201 ÷ the bare registry calls it needs.

The baseline is a plain httpx script against the same local token-auth
registry: the ``/v2/`` challenge, a pull-scoped token, the manifest with all
four media types, and the config blob.
"""

from time import perf_counter

import httpx

from bench.stack import bearer_token, report, suite_with_registry
from tests.support.registry import ACCEPT_ALL, ADMIN, ALICE, LocalRegistry, push_image

REQUESTS = 60
REPO = "bench/app"


def bare(registry: LocalRegistry, config_digest: str) -> float:
    started = perf_counter()
    with httpx.Client(timeout=10) as client:
        token = bearer_token(client, registry, f"repository:{REPO}:pull")
        headers = {"Authorization": f"Bearer {token}"}
        manifest = client.get(
            f"{registry.url}/v2/{REPO}/manifests/1.0",
            headers={**headers, "Accept": ACCEPT_ALL},
        )
        assert manifest.status_code == 200
        blob = client.get(
            f"{registry.url}/v2/{REPO}/blobs/{config_digest}", headers=headers
        )
        assert blob.status_code == 200
    return perf_counter() - started


def main() -> None:
    with suite_with_registry() as (suite, registry):
        pushed = push_image(registry, REPO, "1.0", username=ADMIN[0], password=ADMIN[1])
        config_digest = pushed.config_digests["linux/amd64"]
        ours: list[float] = []
        with suite.client(suite.new_account("bench")) as api:
            credential = api.post(
                "/v1/credentials",
                json={
                    "registry": registry.host,
                    "username": ALICE[0],
                    "secret": ALICE[1],
                },
            ).json()["id"]
            for n in range(REQUESTS + 5):
                body = {
                    "name": f"app-{n}",
                    "image": f"{registry.host}/{REPO}:1.0",
                    "credential_id": credential,
                }
                started = perf_counter()
                response = api.post("/v1/apps", json=body)
                ours.append(perf_counter() - started)
                assert response.status_code == 201, response.text
        baseline = [bare(registry, config_digest) for _ in range(REQUESTS + 5)]
    report("POST /v1/apps", ours, baseline)


if __name__ == "__main__":
    main()
