"""Image check faults a loopback registry will not produce, played by a fake.

The fake answers through ``httpx.MockTransport``; the address guard still runs
on every URL, with a resolver that puts every name on a public address.
"""

import base64
import hashlib
import ipaddress
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from contracts.commands import CheckImage
from contracts.replies import ImageCheck
from services.backbone.settings import Settings
from services.registry.guard import AddressGuard, IPAddress
from services.registry.protocol import MANIFEST_MEDIA_TYPES
from services.verifier.images import check_image

SECRET = "s3cr3t-Token-value"
API = {"Docker-Distribution-API-Version": "registry/2.0"}
OCI_INDEX, _, OCI_MANIFEST, _ = MANIFEST_MEDIA_TYPES
UNKNOWN = {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}

Route = Callable[[httpx.Request], httpx.Response | None]


async def resolver(host: str, port: int) -> list[IPAddress]:
    return [ipaddress.ip_address("93.184.216.34")]


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()


CONFIG = encode(
    {
        "os": "linux",
        "architecture": "amd64",
        "config": {"Cmd": ["serve"], "ExposedPorts": {"80/tcp": {}}},
    }
)
MANIFEST = encode(
    {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "x", "digest": digest(CONFIG), "size": len(CONFIG)},
        "layers": [],
    }
)
INDEX = encode(
    {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": digest(MANIFEST),
                "size": len(MANIFEST),
                "platform": {"os": "linux", "architecture": "amd64"},
            }
        ],
    }
)


class FakeRegistry:
    """A registry behind Basic auth serving one repository, ``team/app``.

    ``routes`` run first and may answer any request in place of the registry.
    """

    def __init__(self, *routes: Route, host: str = "registry.test") -> None:
        self.host = host
        self.routes = routes
        self.requests: list[httpx.Request] = []
        self.manifests = {
            "v1": (OCI_INDEX, INDEX),
            "single": (OCI_MANIFEST, MANIFEST),
            digest(INDEX): (OCI_INDEX, INDEX),
            digest(MANIFEST): (OCI_MANIFEST, MANIFEST),
        }
        self.blobs = {digest(CONFIG): CONFIG}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        for route in self.routes:
            answer = route(request)
            if answer is not None:
                return answer
        pair = base64.b64encode(f"alice:{SECRET}".encode()).decode()
        if request.headers.get("authorization") != f"Basic {pair}":
            challenge = {**API, "WWW-Authenticate": 'Basic realm="fake"'}
            body = {"errors": [{"code": "UNAUTHORIZED", "message": "auth"}]}
            return httpx.Response(401, headers=challenge, json=body)
        return self.serve(request)

    def serve(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v2/":
            return httpx.Response(200, headers=API, json={})
        _, kind, ref = path.removeprefix("/v2/").rsplit("/", 2)
        if kind == "manifests" and ref in self.manifests:
            media_type, body = self.manifests[ref]
            headers = {
                "Content-Type": media_type,
                "Docker-Content-Digest": digest(body),
            }
            return httpx.Response(200, headers=headers, content=body)
        if kind == "blobs" and ref in self.blobs:
            return httpx.Response(200, content=self.blobs[ref])
        return httpx.Response(404, json=UNKNOWN)

    async def check(
        self, image: str = "registry.test/team/app:v1", *, anonymous: bool = False
    ) -> ImageCheck:
        cmd = CheckImage(
            image=image,
            username=None if anonymous else "alice",
            secret=None if anonymous else SECRET,
        )
        return await check_image(
            cmd,
            Settings(registry_timeout_s=5),
            guard=AddressGuard(resolver=resolver),
            transport=httpx.MockTransport(self),
        )


async def test_the_fake_serves_an_accepted_image() -> None:
    fake = FakeRegistry()
    result = await fake.check()
    assert result.outcome == "accepted"
    assert result.digest == digest(INDEX)
    assert result.platform_digest == digest(MANIFEST)
    assert result.config is not None
    assert (result.config.cmd, result.config.exposed_ports) == (["serve"], [80])


async def test_every_manifest_request_accepts_all_four_media_types() -> None:
    fake = FakeRegistry()
    await fake.check()
    manifest_requests = [r for r in fake.requests if "/manifests/" in r.url.path]
    assert len(manifest_requests) == 2
    for request in manifest_requests:
        accepted = [part.strip() for part in request.headers["accept"].split(",")]
        assert accepted == list(MANIFEST_MEDIA_TYPES)


def storage_redirect(request: httpx.Request) -> httpx.Response | None:
    """Blobs live on a storage host the registry redirects to."""
    if request.url.host == "storage.test":
        key = request.url.path.removeprefix("/")
        blob = CONFIG if key == digest(CONFIG) else b"missing"
        return httpx.Response(200, content=blob)
    if "/blobs/" in request.url.path and request.headers.get("authorization"):
        target = f"https://storage.test/{request.url.path.rsplit('/', 1)[1]}?sig=1"
        return httpx.Response(307, headers={"Location": target})
    return None


async def test_a_blob_redirect_to_storage_drops_the_authorization() -> None:
    fake = FakeRegistry(storage_redirect)
    result = await fake.check()
    assert result.outcome == "accepted"
    storage = [r for r in fake.requests if r.url.host == "storage.test"]
    assert len(storage) == 1
    assert "authorization" not in storage[0].headers


def tampered_blob(request: httpx.Request) -> httpx.Response | None:
    if "/blobs/" in request.url.path:
        return httpx.Response(200, content=CONFIG.replace(b"serve", b"evil!"))
    return None


async def test_a_blob_that_does_not_match_its_digest_is_refused() -> None:
    result = await FakeRegistry(tampered_blob).check()
    assert result.outcome == "rejected"
    assert result.error is not None
    assert result.error.code == "registry_error"
    assert "does not match that digest" in result.error.explanation


def oversized_blob(request: httpx.Request) -> httpx.Response | None:
    if "/blobs/" in request.url.path:
        return httpx.Response(200, content=b"{" + b" " * (2 * 1024 * 1024) + b"}")
    return None


async def test_a_config_blob_over_the_size_cap_is_refused() -> None:
    result = await FakeRegistry(oversized_blob).check()
    assert result.error is not None
    assert result.error.code == "registry_error"
    assert "is larger than 1048576 bytes" in result.error.explanation


def lying_digest_header(request: httpx.Request) -> httpx.Response | None:
    if request.url.path.endswith("/manifests/v1"):
        headers = {"Content-Type": OCI_INDEX, "Docker-Content-Digest": digest(b"x")}
        return httpx.Response(200, headers=headers, content=INDEX)
    return None


async def test_a_manifest_that_does_not_match_its_digest_header_is_refused() -> None:
    result = await FakeRegistry(lying_digest_header).check()
    assert result.error is not None
    assert result.error.code == "registry_error"
    assert "does not match its Docker-Content-Digest" in result.error.explanation


def wrong_content_for_digest(request: httpx.Request) -> httpx.Response | None:
    if request.url.path.endswith(f"/manifests/{digest(INDEX)}"):
        headers = {"Content-Type": OCI_MANIFEST}
        return httpx.Response(200, headers=headers, content=MANIFEST)
    return None


async def test_content_for_another_digest_than_asked_is_refused() -> None:
    fake = FakeRegistry(wrong_content_for_digest)
    result = await fake.check(f"registry.test/team/app@{digest(INDEX)}")
    assert result.error is not None
    assert result.error.code == "registry_error"
    assert f"does not match the digest {digest(INDEX)}" in result.error.explanation


def missing_child(request: httpx.Request) -> httpx.Response | None:
    if request.url.path.endswith(f"/manifests/{digest(MANIFEST)}"):
        return httpx.Response(404, json=UNKNOWN)
    return None


async def test_an_index_naming_a_missing_manifest_is_a_registry_error() -> None:
    result = await FakeRegistry(missing_child).check()
    error = result.error
    assert error is not None
    assert (error.code, error.registry_status) == ("registry_error", 404)
    assert error.explanation.endswith("but does not serve it: push the image again.")


def schema1(request: httpx.Request) -> httpx.Response | None:
    if "/manifests/" in request.url.path:
        body = b'{"schemaVersion": 1, "name": "team/app"}'
        headers = {
            "Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws"
        }
        return httpx.Response(200, headers=headers, content=body)
    return None


async def test_a_schema1_manifest_is_refused_with_advice() -> None:
    result = await FakeRegistry(schema1).check()
    assert result.error is not None
    assert result.error.code == "registry_error"
    assert "schema 1" in result.error.explanation


def denied(request: httpx.Request) -> httpx.Response | None:
    if "/manifests/" in request.url.path:
        body = {"errors": [{"code": "DENIED", "message": "requested access denied"}]}
        return httpx.Response(403, json=body)
    return None


async def test_a_denied_read_keeps_the_registrys_words() -> None:
    result = await FakeRegistry(denied).check()
    error = result.error
    assert error is not None
    assert (error.code, error.registry_status) == ("credential_rejected", 403)
    assert (error.registry_code, error.registry_message) == (
        "DENIED",
        "requested access denied",
    )
    assert error.explanation == (
        "The registry accepted the login but refused to let it read team/app: give "
        "this login pull access to it, or update the credential to one that has it."
    )


def not_found(request: httpx.Request) -> httpx.Response | None:
    if "/manifests/" in request.url.path:
        return httpx.Response(404, json=UNKNOWN)
    return None


async def test_ghcr_not_found_may_mean_no_access() -> None:
    fake = FakeRegistry(not_found, host="ghcr.io")
    result = await fake.check("ghcr.io/octo/app:v1")
    error = result.error
    assert error is not None
    assert error.code == "image_not_found"
    assert "the image does not exist or this login may not read it" in (
        error.explanation
    )
    assert "read:packages" in error.explanation


def docker_hub(request: httpx.Request) -> httpx.Response | None:
    """Docker Hub's anonymous Bearer flow for a public image."""
    if request.url.host == "auth.docker.io":
        assert "authorization" not in request.headers
        return httpx.Response(200, json={"token": "anonymous-token"})
    if request.headers.get("authorization") != "Bearer anonymous-token":
        realm = 'Bearer realm="https://auth.docker.io/token",service="registry"'
        headers = {**API, "WWW-Authenticate": realm}
        return httpx.Response(401, headers=headers, json=UNKNOWN)
    return None


class PublicHub(FakeRegistry):
    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return docker_hub(request) or self.serve(request)


async def test_an_anonymous_pull_from_docker_hub_gets_a_token_for_the_scope() -> None:
    fake = PublicHub(host="registry-1.docker.io")
    result = await fake.check("nginx:v1", anonymous=True)
    assert result.outcome == "accepted"
    assert result.image == "docker.io/library/nginx:v1"
    token_request = next(r for r in fake.requests if r.url.host == "auth.docker.io")
    assert token_request.url.params["scope"] == "repository:library/nginx:pull"
    manifest = next(r for r in fake.requests if "/manifests/" in r.url.path)
    assert str(manifest.url) == (
        "https://registry-1.docker.io/v2/library/nginx/manifests/v1"
    )


def echo(request: httpx.Request) -> httpx.Response | None:
    sent = request.headers.get("authorization", "")
    if "/manifests/" in request.url.path and sent:
        decoded = base64.b64decode(sent.partition(" ")[2]).decode()
        body = {"errors": [{"code": "DENIED", "message": f"{sent} {decoded}"}]}
        return httpx.Response(403, json=body)
    return None


async def test_a_registry_echoing_the_credentials_never_gets_them_into_the_reply() -> (
    None
):
    result = await FakeRegistry(echo).check()
    reply = result.model_dump_json()
    assert SECRET not in reply
    assert base64.b64encode(f"alice:{SECRET}".encode()).decode() not in reply
    assert result.error is not None
    assert "[redacted]" in (result.error.registry_message or "")


@pytest.mark.parametrize(
    "image", ["registry.test/team/app:v1", f"registry.test/team/{SECRET.lower()}"]
)
async def test_the_secret_typed_into_the_image_is_not_echoed(image: str) -> None:
    result = await FakeRegistry().check(image.replace(SECRET.lower(), SECRET))
    assert SECRET not in result.model_dump_json()
