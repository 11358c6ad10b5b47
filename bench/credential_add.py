"""Credential add: POST /v1/credentials end to end ÷ the bare registry calls.

The baseline is a plain httpx script making the calls a verification needs
against the same local token-auth registry: the ``/v2/`` challenge, a token
from the realm with Basic credentials, and ``/v2/`` again with the token.
"""

import shutil
import statistics
import tempfile
from pathlib import Path
from time import perf_counter

import httpx

from services.backbone.embedded import EmbeddedNats, EmbeddedPostgres
from tests.support.registry import ADMIN, ALICE, LocalRegistry
from tests.support.suite import running_suite

REQUESTS = 100


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered), p99


def bare(registry: LocalRegistry, username: str, password: str) -> float:
    started = perf_counter()
    with httpx.Client(timeout=10) as client:
        challenge = client.get(f"{registry.url}/v2/")
        params = dict(
            part.split("=", 1)
            for part in challenge.headers["www-authenticate"][7:].split(",")
        )
        realm = params["realm"].strip('"')
        token = client.get(
            realm,
            params={"service": params["service"].strip('"')},
            auth=(username, password),
        ).json()["token"]
        answer = client.get(
            f"{registry.url}/v2/", headers={"Authorization": f"Bearer {token}"}
        )
        assert answer.status_code == 200
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
            username, password = ALICE
            with suite.client(suite.new_account("bench")) as api:
                body = {
                    "registry": registry.host,
                    "username": username,
                    "secret": password,
                }
                ours: list[float] = []
                for _ in range(REQUESTS + 5):
                    started = perf_counter()
                    response = api.post("/v1/credentials", json=body)
                    ours.append(perf_counter() - started)
                    assert response.status_code == 201, response.text
            baseline = [bare(registry, username, password) for _ in range(REQUESTS + 5)]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    ours_p50, ours_p99 = percentiles(ours[5:])
    bare_p50, bare_p99 = percentiles(baseline[5:])
    for label, p50, p99 in (
        ("POST /v1/credentials", ours_p50, ours_p99),
        ("bare httpx calls", bare_p50, bare_p99),
    ):
        print(f"{label:22} p50 {p50 * 1000:7.1f} ms  p99 {p99 * 1000:7.1f} ms")
    print(f"ratio p50 {ours_p50 / bare_p50:.2f}   p99 {ours_p99 / bare_p99:.2f}")


if __name__ == "__main__":
    main()
