"""App creation: POST /v1/apps to 201 ÷ the bare registry calls it needs.

The baseline is a plain httpx script against the same local token-auth
registry: the ``/v2/`` challenge, a pull-scoped token, the manifest with all
four media types, and the config blob.
"""

import shutil
import statistics
import tempfile
from pathlib import Path
from time import perf_counter

import httpx

from bench.credential_add import percentiles
from services.backbone.embedded import EmbeddedNats, EmbeddedPostgres
from tests.support.registry import (
    ACCEPT_ALL,
    ADMIN,
    ALICE,
    LocalRegistry,
    parse_challenge,
    push_image,
)
from tests.support.suite import running_suite

REQUESTS = 60
REPO = "bench/app"


def bare(registry: LocalRegistry, config_digest: str) -> float:
    username, password = ALICE
    started = perf_counter()
    with httpx.Client(timeout=10) as client:
        _, params = parse_challenge(
            client.get(f"{registry.url}/v2/").headers["www-authenticate"]
        )
        token = client.get(
            params["realm"],
            params={"service": params["service"], "scope": f"repository:{REPO}:pull"},
            auth=(username, password),
        ).json()["token"]
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
    base = Path(tempfile.mkdtemp(prefix="crabglamp-bench-"))
    base.chmod(0o755)
    try:
        with (
            EmbeddedNats(base / "nats") as nats_server,
            EmbeddedPostgres(base / "pg") as postgres,
            LocalRegistry(
                base / "registry", auth="token", users=dict([ALICE, ADMIN])
            ) as registry,
            running_suite(
                nats_server.url, postgres.url, base, (registry,), log_level="WARNING"
            ) as suite,
        ):
            pushed = push_image(
                registry, REPO, "1.0", username=ADMIN[0], password=ADMIN[1]
            )
            config_digest = pushed.config_digests["linux/amd64"]
            with suite.client(suite.new_account("bench")) as api:
                credential = api.post(
                    "/v1/credentials",
                    json={
                        "registry": registry.host,
                        "username": ALICE[0],
                        "secret": ALICE[1],
                    },
                ).json()["id"]
                ours: list[float] = []
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
    finally:
        shutil.rmtree(base, ignore_errors=True)
    ours_p50, ours_p99 = percentiles(ours[5:])
    bare_p50, bare_p99 = percentiles(baseline[5:])
    for label, p50, p99 in (
        ("POST /v1/apps", ours_p50, ours_p99),
        ("bare httpx calls", bare_p50, bare_p99),
    ):
        print(f"{label:22} p50 {p50 * 1000:7.1f} ms  p99 {p99 * 1000:7.1f} ms")
    print(f"ratio p50 {ours_p50 / bare_p50:.2f}   p99 {ours_p99 / bare_p99:.2f}")
    print(f"(median of the baseline: {statistics.median(baseline) * 1000:.1f} ms)")


if __name__ == "__main__":
    main()
