"""The running suite and a token-auth registry, for end-to-end benchmarks."""

import contextlib
import shutil
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx

from services.backbone.embedded import EmbeddedNats, EmbeddedPostgres
from tests.support.registry import ADMIN, ALICE, LocalRegistry, parse_challenge
from tests.support.suite import Suite, running_suite


@contextlib.contextmanager
def suite_with_registry() -> Iterator[tuple[Suite, LocalRegistry]]:
    """Embedded NATS and PostgreSQL, the services, a registry; gone after."""
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
            yield suite, registry
    finally:
        shutil.rmtree(base, ignore_errors=True)


def bearer_token(
    client: httpx.Client, registry: LocalRegistry, scope: str | None = None
) -> str:
    """What a bare client does to log in: challenge, then the realm's token."""
    username, password = ALICE
    _, params = parse_challenge(
        client.get(f"{registry.url}/v2/").headers["www-authenticate"]
    )
    query = {"service": params["service"]}
    if scope is not None:
        query["scope"] = scope
    answer = client.get(params["realm"], params=query, auth=(username, password))
    return str(answer.json()["token"])


def report(label: str, ours: list[float], baseline: list[float]) -> None:
    """p50 and p99 of both, and their ratios; the first 5 samples warm up."""
    rows = [
        (label, *_percentiles(ours[5:])),
        ("bare httpx calls", *_percentiles(baseline[5:])),
    ]
    for name, p50, p99 in rows:
        print(f"{name:22} p50 {p50 * 1000:7.1f} ms  p99 {p99 * 1000:7.1f} ms")
    (_, ours_p50, ours_p99), (_, bare_p50, bare_p99) = rows
    print(f"ratio p50 {ours_p50 / bare_p50:.2f}   p99 {ours_p99 / bare_p99:.2f}")


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered), p99
