"""Image pull: ``ImagePuller.pull`` into an empty cache ÷ ``skopeo copy``.

Both fetch the same multi-layer image (random, incompressible layers made at
run time) from one local distribution registry with token auth, each round
into a fresh cache or directory, in one process run.
"""

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from pydantic import SecretStr

from services.backbone.settings import Settings
from services.deployer.pull import BlobCache, ImagePuller
from tests.support.registry import (
    ADMIN,
    ALICE,
    OCI_CONFIG,
    OCI_LAYER,
    OCI_MANIFEST,
    LocalRegistry,
    build_layer,
    image_config,
    push_blob,
    push_manifest,
    registry_client,
    sha256_digest,
)

LAYERS = 6
LAYER_BYTES = 10 * 1024 * 1024
ROUNDS = 3
REPO = "bench/app"
TAG = "v1"


def push(registry: LocalRegistry) -> int:
    """Push the image; return the bytes of its blobs."""
    blobs = [build_layer({f"data/{n}": os.urandom(LAYER_BYTES)}) for n in range(LAYERS)]
    config = json.dumps(
        image_config("linux", "amd64", None, [diff_id for _, diff_id in blobs])
    ).encode()
    with registry_client(*ADMIN) as client:
        for blob, _ in blobs:
            push_blob(client, registry.url, REPO, blob)
        push_blob(client, registry.url, REPO, config)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": _descriptor(OCI_CONFIG, config),
            "layers": [_descriptor(OCI_LAYER, blob) for blob, _ in blobs],
        }
        push_manifest(client, registry.url, REPO, TAG, manifest, OCI_MANIFEST)
    return len(config) + sum(len(blob) for blob, _ in blobs)


def _descriptor(media_type: str, data: bytes) -> dict[str, object]:
    return {"mediaType": media_type, "digest": sha256_digest(data), "size": len(data)}


async def ours(registry: LocalRegistry, work: Path) -> float:
    cache = work / f"cache-{time.monotonic_ns()}"
    settings = Settings(
        insecure_registries=[registry.host], allow_registries=["127.0.0.1"]
    )
    puller = ImagePuller(settings, BlobCache(cache))
    started = time.perf_counter()
    pulled = await puller.pull(
        f"{registry.host}/{REPO}:{TAG}", ALICE[0], SecretStr(ALICE[1])
    )
    elapsed = time.perf_counter() - started
    assert pulled.bytes_fetched == pulled.bytes_total
    shutil.rmtree(cache)
    return elapsed


def skopeo(registry: LocalRegistry, work: Path) -> float:
    target = work / f"skopeo-{time.monotonic_ns()}"
    command = [
        "skopeo",
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        "--src-creds",
        f"{ALICE[0]}:{ALICE[1]}",
        f"docker://{registry.host}/{REPO}:{TAG}",
        f"dir:{target}",
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    elapsed = time.perf_counter() - started
    shutil.rmtree(target)
    return elapsed


async def main() -> None:
    with (
        tempfile.TemporaryDirectory() as directory,
        LocalRegistry(
            Path(directory) / "registry", auth="token", users=dict([ALICE, ADMIN])
        ) as registry,
    ):
        work = Path(directory)
        size = push(registry)
        await ours(registry, work)  # warm up both paths
        skopeo(registry, work)
        ours_s = [await ours(registry, work) for _ in range(ROUNDS)]
        skopeo_s = [skopeo(registry, work) for _ in range(ROUNDS)]
    ours_median, skopeo_median = statistics.median(ours_s), statistics.median(skopeo_s)
    mib = size / 1024 / 1024
    print(f"image: {LAYERS} layers, {mib:.1f} MiB, median of {ROUNDS}")
    print(f"ImagePuller.pull: {ours_median:.3f} s ({mib / ours_median:.0f} MiB/s)")
    print(f"skopeo copy:      {skopeo_median:.3f} s ({mib / skopeo_median:.0f} MiB/s)")
    print(f"ratio time ours/skopeo: {ours_median / skopeo_median:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
