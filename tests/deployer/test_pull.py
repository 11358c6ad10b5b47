"""Pulling images into the blob cache, against real registries and a fake one.

The real distribution registries run in both auth modes; faults a loopback
registry will not produce (corrupt blobs, storage redirects, a download cut
off mid-stream) are played by a fake behind ``httpx.MockTransport``, with the
address guard still checking every URL.
"""

import asyncio
import base64
import gzip
import hashlib
import io
import ipaddress
import json
import os
import secrets
import tarfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from services.backbone.settings import Settings
from services.deployer.pull import (
    BlobCache,
    CorruptBlobError,
    ImagePuller,
    PulledImage,
    PullError,
)
from services.registry.guard import AddressGuard, IPAddress
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
    push_image,
    push_manifest,
    registry_client,
    sha256_digest,
)

AMD64 = ("linux", "amd64", None)
ARM64 = ("linux", "arm64", "v8")
UPDATE = "update the credential under Registry credentials, then redeploy"


@pytest.fixture(params=["basic", "token"])
def registry(request: pytest.FixtureRequest) -> LocalRegistry:
    """Each test runs once per auth mode: htpasswd Basic and Bearer tokens."""
    found: LocalRegistry = request.getfixturevalue(f"registry_{request.param}")
    return found


def puller_for(registry: LocalRegistry, cache_dir: Path) -> ImagePuller:
    settings = Settings(
        insecure_registries=[registry.host],
        allow_registries=["127.0.0.1"],
        registry_timeout_s=5.0,
    )
    return ImagePuller(settings, BlobCache(cache_dir))


def fresh_repo() -> str:
    """A repository of its own, so tests never see each other's tags."""
    return f"deploy/app-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class Pushed:
    image: str
    digest: str
    config_size: int
    layers: list[str]
    layer_sizes: list[int]


def push_layers(
    registry: LocalRegistry,
    repo: str,
    tag: str,
    layers: list[tuple[bytes, str]],
    *,
    platform: tuple[str, str, str | None] = AMD64,
) -> Pushed:
    """Push a single-platform image made of ``layers`` (blob, diff ID)."""
    os_name, architecture, variant = platform
    base = registry.url
    with registry_client(*ADMIN) as client:
        for blob, _ in layers:
            push_blob(client, base, repo, blob)
        diff_ids = [diff_id for _, diff_id in layers]
        config = json.dumps(
            image_config(os_name, architecture, variant, diff_ids)
        ).encode()
        push_blob(client, base, repo, config)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, config),
            "layers": [descriptor(OCI_LAYER, blob) for blob, _ in layers],
        }
        digest = push_manifest(client, base, repo, tag, manifest, OCI_MANIFEST)
    return Pushed(
        f"{registry.host}/{repo}:{tag}",
        digest,
        len(config),
        [sha256_digest(blob) for blob, _ in layers],
        [len(blob) for blob, _ in layers],
    )


def descriptor(media_type: str, data: bytes) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha256_digest(data), "size": len(data)}


def random_layer(name: str, size: int = 64 * 1024) -> tuple[bytes, str]:
    return build_layer({name: os.urandom(size)})


def layer_files(pulled: PulledImage) -> dict[str, bytes]:
    """Every regular file in the pulled layers, by name."""
    files: dict[str, bytes] = {}
    for layer in pulled.layers:
        with tarfile.open(layer.path, mode="r:gz") as tar:
            for member in tar.getmembers():
                extracted = tar.extractfile(member)
                if extracted is not None:
                    files[member.name] = extracted.read()
    return files


def assert_verified(pulled: PulledImage) -> None:
    for layer in pulled.layers:
        data = layer.path.read_bytes()
        assert sha256_digest(data) == layer.digest
        assert len(data) == layer.size


def partials(cache_dir: Path) -> list[Path]:
    return [p for p in cache_dir.rglob("*") if p.name.startswith(".partial-")]


async def test_pulls_a_single_platform_image(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    repo = fresh_repo()
    base, app = random_layer("base/lib.so"), random_layer("srv/app")
    pushed = push_layers(registry, repo, "v1", [base, app])
    puller = puller_for(registry, tmp_path / "cache")
    seen: list[tuple[int, int]] = []

    pulled = await puller.pull(
        pushed.image,
        ALICE[0],
        SecretStr(ALICE[1]),
        progress=lambda done, total: seen.append((done, total)),
    )

    assert pulled.reference == f"{registry.host}/{repo}:v1"
    assert pulled.digest == pulled.platform_digest == pushed.digest
    assert [layer.digest for layer in pulled.layers] == pushed.layers
    assert [layer.media_type for layer in pulled.layers] == [OCI_LAYER] * 2
    assert_verified(pulled)
    assert pulled.config.entrypoint == ["/bin/sh", "-c"]
    assert pulled.config.exposed_ports == [8080]
    total = pushed.config_size + sum(pushed.layer_sizes)
    assert pulled.bytes_fetched == pulled.bytes_total == total
    assert seen[-1] == (total, total)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


async def test_picks_linux_amd64_from_a_multi_platform_index(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    pushed = push_image(
        registry,
        fresh_repo(),
        "v1",
        platforms=[ARM64, AMD64, ("linux", "s390x", None)],
        media="docker",
        attestation=True,
    )
    puller = puller_for(registry, tmp_path / "cache")

    pulled = await puller.pull(
        f"{registry.host}/{pushed.repo}:v1", ALICE[0], SecretStr(ALICE[1])
    )

    assert pulled.digest == pushed.digest
    assert pulled.platform_digest == pushed.platform_digests["linux/amd64"]
    assert len(pulled.layers) == 1
    assert_verified(pulled)
    assert layer_files(pulled) == {"etc/crabglamp-test": b"linux/amd64\n"}


async def test_a_second_pull_fetches_nothing(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    repo = fresh_repo()
    push_layers(registry, repo, "v1", [random_layer("a"), random_layer("b")])
    puller = puller_for(registry, tmp_path / "cache")
    image = f"{registry.host}/{repo}:v1"

    first = await puller.pull(image, ALICE[0], SecretStr(ALICE[1]))
    second = await puller.pull(image, ALICE[0], SecretStr(ALICE[1]))

    assert first.bytes_fetched == first.bytes_total > 0
    assert second.bytes_fetched == 0
    assert second.bytes_total == first.bytes_total
    assert second.layers == first.layers
    assert_verified(second)


async def test_an_image_sharing_base_layers_fetches_only_its_own(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    base = [random_layer("usr/lib/one"), random_layer("usr/lib/two")]
    first = push_layers(registry, fresh_repo(), "v1", [*base, random_layer("a")])
    second = push_layers(registry, fresh_repo(), "v1", [*base, random_layer("b")])
    puller = puller_for(registry, tmp_path / "cache")
    await puller.pull(first.image, ALICE[0], SecretStr(ALICE[1]))

    pulled = await puller.pull(second.image, ALICE[0], SecretStr(ALICE[1]))

    assert pulled.layers[:2] == [
        layer for layer in pulled.layers if layer.digest in first.layers
    ]
    assert pulled.bytes_fetched == second.config_size + second.layer_sizes[2]
    assert pulled.bytes_total == second.config_size + sum(second.layer_sizes)
    assert_verified(pulled)


async def test_two_pulls_at_once_download_each_blob_once(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    pushed = push_layers(
        registry, fresh_repo(), "v1", [random_layer(f"l{n}") for n in range(3)]
    )
    puller = puller_for(registry, tmp_path / "cache")

    pulls = await asyncio.gather(
        *(puller.pull(pushed.image, ALICE[0], SecretStr(ALICE[1])) for _ in range(3))
    )

    assert sum(pulled.bytes_fetched for pulled in pulls) == pulls[0].bytes_total
    assert partials(tmp_path / "cache") == []
    for pulled in pulls:
        assert_verified(pulled)


async def test_a_wrong_password_is_the_credential_rejected(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    repo = fresh_repo()
    pushed = push_layers(registry, repo, "v1", [random_layer("a")])
    puller = puller_for(registry, tmp_path / "cache")
    wrong = "wrong-pass-" + secrets.token_hex(8)

    with pytest.raises(PullError) as caught:
        await puller.pull(pushed.image, ALICE[0], SecretStr(wrong))

    error = caught.value
    assert error.code == "credential_rejected"
    assert error.registry_error is not None
    assert error.registry_error.registry == registry.host
    assert error.registry_error.registry_status == 401
    assert error.registry_error.registry_code == "UNAUTHORIZED"
    assert error.registry_error.registry_message == "authentication required"
    assert UPDATE in error.registry_error.explanation
    assert UPDATE in error.detail
    shown = repr(error) + str(error) + error.registry_error.model_dump_json()
    assert wrong not in shown
    assert base64.b64encode(f"alice:{wrong}".encode()).decode() not in shown
    assert list((tmp_path / "cache").rglob("*")) == []


async def test_a_missing_tag_is_image_not_found(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    repo = fresh_repo()
    push_layers(registry, repo, "v1", [random_layer("a")])
    puller = puller_for(registry, tmp_path / "cache")

    with pytest.raises(PullError) as caught:
        await puller.pull(f"{registry.host}/{repo}:v2", ALICE[0], SecretStr(ALICE[1]))

    error = caught.value
    assert error.code == "image_not_found"
    assert error.registry_error is not None
    assert error.registry_error.registry_status == 404
    assert error.registry_error.registry_code == "MANIFEST_UNKNOWN"
    assert f"{repo}:v2" in error.detail


async def test_a_tag_moved_to_an_arm64_only_image_is_refused(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    repo = fresh_repo()
    pushed = push_layers(registry, repo, "v1", [random_layer("a")])
    puller = puller_for(registry, tmp_path / "cache")
    await puller.pull(pushed.image, ALICE[0], SecretStr(ALICE[1]))
    arm = push_layers(registry, repo, "v1", [random_layer("b")], platform=ARM64)

    with pytest.raises(PullError) as caught:
        await puller.pull(pushed.image, ALICE[0], SecretStr(ALICE[1]))

    error = caught.value
    assert error.code == "platform_not_supported"
    assert "linux/arm64/v8" in error.detail
    assert error.registry_error is not None
    assert error.registry_error.code == "platform_not_supported"
    cache = BlobCache(tmp_path / "cache")
    assert not cache.has(arm.layers[0])


async def test_an_index_without_linux_amd64_names_its_platforms(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    pushed = push_image(
        registry, fresh_repo(), "v1", platforms=[ARM64, ("linux", "s390x", None)]
    )
    puller = puller_for(registry, tmp_path / "cache")

    with pytest.raises(PullError) as caught:
        await puller.pull(
            f"{registry.host}/{pushed.repo}:v1", ALICE[0], SecretStr(ALICE[1])
        )

    assert caught.value.code == "platform_not_supported"
    assert "linux/arm64/v8, linux/s390x" in caught.value.detail


async def test_an_unparsable_reference_is_refused_before_any_call(
    tmp_path: Path,
) -> None:
    puller = ImagePuller(Settings(), BlobCache(tmp_path / "cache"))

    with pytest.raises(PullError) as caught:
        await puller.pull("registry.test/Team/App:v1", None, None)

    assert caught.value.code == "invalid_image_reference"


# Faults played by a fake registry.

SECRET = "fake-Token-" + "9" * 12
API = {"Docker-Distribution-API-Version": "registry/2.0"}
REGISTRY = "registry.test"
STORAGE = "storage.test"


async def public_resolver(host: str, port: int) -> list[IPAddress]:
    return [ipaddress.ip_address("93.184.216.34")]


def gzip_layer(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buffer.getvalue(), mtime=0)


Blob = bytes | Callable[[], AsyncIterator[bytes]]


class FakeRegistry:
    """``registry.test/team/app:v1`` behind Basic auth; blobs may redirect.

    ``served`` overrides what a blob digest answers with: other bytes, or an
    async stream. Redirected blobs come from ``storage.test``, which refuses
    any request that carries an Authorization header.
    """

    def __init__(
        self,
        layers: list[bytes],
        *,
        layer_type: str = OCI_LAYER,
        redirect: bool = False,
        served: dict[str, Blob] | None = None,
    ) -> None:
        self.config = json.dumps(image_config("linux", "amd64", None, [])).encode()
        self.layers = layers
        self.manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": descriptor(OCI_CONFIG, self.config),
                "layers": [descriptor(layer_type, layer) for layer in layers],
            }
        ).encode()
        self.blobs: dict[str, Blob] = {
            sha256_digest(blob): blob for blob in [self.config, *layers]
        }
        self.blobs.update(served or {})
        self.redirect = redirect
        self.requests: list[httpx.Request] = []

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.host == STORAGE:
            if "authorization" in request.headers:
                return httpx.Response(400, text="storage does not take credentials")
            return self.blob(request.url.path.rpartition("/")[2])
        pair = base64.b64encode(f"alice:{SECRET}".encode()).decode()
        if request.headers.get("authorization") != f"Basic {pair}":
            challenge = {**API, "WWW-Authenticate": 'Basic realm="fake"'}
            body = {"errors": [{"code": "UNAUTHORIZED", "message": "auth"}]}
            return httpx.Response(401, headers=challenge, json=body)
        path = request.url.path
        if path == "/v2/":
            return httpx.Response(200, headers=API, json={})
        if path == "/v2/team/app/manifests/v1":
            headers = {
                "Content-Type": OCI_MANIFEST,
                "Docker-Content-Digest": sha256_digest(self.manifest),
            }
            return httpx.Response(200, headers=headers, content=self.manifest)
        digest = path.rpartition("/")[2]
        if self.redirect and digest != sha256_digest(self.config):
            return httpx.Response(
                307, headers={"Location": f"https://{STORAGE}/blobs/{digest}"}
            )
        return self.blob(digest)

    def blob(self, digest: str) -> httpx.Response:
        found = self.blobs.get(digest)
        if found is None:
            return httpx.Response(404, json={"errors": [{"code": "BLOB_UNKNOWN"}]})
        stream = found() if callable(found) else streamed(found)
        return httpx.Response(200, content=stream)


async def streamed(data: bytes) -> AsyncIterator[bytes]:
    """A body as a real transport gives it: streamed, not loaded up front."""
    for start in range(0, len(data), 16384):
        yield data[start : start + 16384]


def fake_puller(fake: FakeRegistry, cache_dir: Path) -> ImagePuller:
    settings = Settings(registry_timeout_s=5.0)
    guard = AddressGuard(resolver=public_resolver)
    return ImagePuller(
        settings, BlobCache(cache_dir), guard=guard, transport=fake.transport()
    )


async def pull_fake(puller: ImagePuller) -> PulledImage:
    return await puller.pull(f"{REGISTRY}/team/app:v1", "alice", SecretStr(SECRET))


async def test_a_corrupt_blob_never_enters_the_cache(tmp_path: Path) -> None:
    good = gzip_layer({"etc/hostname": b"app\n"})
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    fake = FakeRegistry([good], served={sha256_digest(good): bytes(bad)})
    cache_dir = tmp_path / "cache"

    with pytest.raises(PullError) as caught:
        await pull_fake(fake_puller(fake, cache_dir))

    assert caught.value.code == "registry_error"
    assert "does not match" in caught.value.detail
    assert isinstance(caught.value.__cause__, CorruptBlobError)
    assert caught.value.registry_error is not None
    assert caught.value.registry_error.registry == REGISTRY
    assert not BlobCache(cache_dir).has(sha256_digest(good))
    assert not BlobCache(cache_dir).path(sha256_digest(good)).exists()
    assert partials(cache_dir) == []


async def test_a_blob_longer_than_its_size_is_cut_off(tmp_path: Path) -> None:
    good = gzip_layer({"etc/hostname": b"app\n"})

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"\0" * 65536

    fake = FakeRegistry([good], served={sha256_digest(good): endless})
    cache_dir = tmp_path / "cache"

    with pytest.raises(PullError) as caught:
        await pull_fake(fake_puller(fake, cache_dir))

    assert "larger than" in caught.value.detail
    assert partials(cache_dir) == []


async def test_a_cancelled_download_leaves_no_partial_file(tmp_path: Path) -> None:
    layer = gzip_layer({"srv/big": os.urandom(256 * 1024)})
    started, never = asyncio.Event(), asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield layer[: len(layer) // 2]
        started.set()
        await never.wait()
        yield layer[len(layer) // 2 :]

    fake = FakeRegistry([layer], served={sha256_digest(layer): stalled})
    cache_dir = tmp_path / "cache"
    seen: list[int] = []
    puller = fake_puller(fake, cache_dir)
    task = asyncio.create_task(
        puller.pull(
            f"{REGISTRY}/team/app:v1",
            "alice",
            SecretStr(SECRET),
            progress=lambda done, total: seen.append(done),
        )
    )
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.sleep(0.05)
    assert partials(cache_dir), "the download should be under way"

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert partials(cache_dir) == []
    assert not BlobCache(cache_dir).has(sha256_digest(layer))
    assert max(seen) >= len(layer) // 2


async def test_storage_redirects_drop_the_credentials(tmp_path: Path) -> None:
    layers = [gzip_layer({"a": b"one"}), gzip_layer({"b": b"two"})]
    fake = FakeRegistry(layers, redirect=True)

    pulled = await pull_fake(fake_puller(fake, tmp_path / "cache"))

    assert [layer.digest for layer in pulled.layers] == [
        sha256_digest(layer) for layer in layers
    ]
    assert_verified(pulled)
    storage = [r for r in fake.requests if r.url.host == STORAGE]
    assert len(storage) == 2
    assert all("authorization" not in r.headers for r in storage)


async def test_blob_bytes_are_never_content_decoded(tmp_path: Path) -> None:
    layer = gzip_layer({"a": b"one"})

    async def labelled() -> AsyncIterator[bytes]:
        yield layer

    fake = FakeRegistry([layer])
    original = fake.blob

    def blob(digest: str) -> httpx.Response:
        if digest != sha256_digest(layer):
            return original(digest)
        headers = {"Content-Encoding": "gzip"}
        return httpx.Response(200, headers=headers, content=labelled())

    fake.blob = blob  # type: ignore[method-assign]

    pulled = await pull_fake(fake_puller(fake, tmp_path / "cache"))

    assert pulled.layers[0].path.read_bytes() == layer


async def test_a_secret_echoed_by_the_registry_is_redacted(tmp_path: Path) -> None:
    fake = FakeRegistry([gzip_layer({"a": b"one"})])

    async def echo(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/v2/team/app/manifests/"):
            body = {"errors": [{"code": "DENIED", "message": f"no for {SECRET}"}]}
            return httpx.Response(403, json=body)
        return await FakeRegistry.handle(fake, request)

    fake.handle = echo  # type: ignore[method-assign]

    with pytest.raises(PullError) as caught:
        await pull_fake(fake_puller(fake, tmp_path / "cache"))

    error = caught.value
    assert error.code == "credential_rejected"
    assert error.registry_error is not None
    assert error.registry_error.registry_status == 403
    assert error.registry_error.registry_code == "DENIED"
    assert error.registry_error.registry_message == "no for [redacted]"
    assert SECRET not in repr(error) + error.registry_error.model_dump_json()


async def test_a_layer_that_is_not_a_file_system_is_refused(tmp_path: Path) -> None:
    helm = "application/vnd.cncf.helm.chart.content.v1.tar+gzip"
    fake = FakeRegistry([gzip_layer({"Chart.yaml": b"name: x"})], layer_type=helm)

    with pytest.raises(PullError) as caught:
        await pull_fake(fake_puller(fake, tmp_path / "cache"))

    assert caught.value.code == "platform_not_supported"
    assert helm in caught.value.detail


# The cache on its own.


async def chunks_of(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        await asyncio.sleep(0)
        yield data[start : start + size]


async def test_concurrent_writers_of_one_blob_leave_one_correct_copy(
    tmp_path: Path,
) -> None:
    cache = BlobCache(tmp_path)
    data = os.urandom(200_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()

    sizes = await asyncio.gather(
        *(cache.store(digest, chunks_of(data), size=len(data)) for _ in range(4))
    )

    assert sizes == [len(data)] * 4
    assert cache.path(digest).read_bytes() == data
    assert partials(tmp_path) == []


async def test_a_store_with_the_wrong_content_is_refused(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    digest = "sha256:" + hashlib.sha256(b"expected").hexdigest()

    with pytest.raises(CorruptBlobError):
        await cache.store(digest, chunks_of(b"something else"))

    assert not cache.has(digest)
    assert partials(tmp_path) == []


def test_a_cache_path_is_only_ever_a_digest(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)

    with pytest.raises(ValueError, match="not a sha256"):
        cache.path("sha256:../../etc/passwd")
