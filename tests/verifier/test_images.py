"""The image check against real distribution registries, in both auth modes."""

import secrets
from typing import Any

import httpx
import pytest

from contracts.commands import CheckImage
from contracts.replies import ImageCheck, ImageConfig
from services.backbone.settings import Settings
from services.registry.client import TokenCache
from services.verifier.images import check_image
from tests.support.registry import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    LocalRegistry,
    PushedImage,
    push_image,
)

AMD64 = ("linux", "amd64", None)
ARM64 = ("linux", "arm64", "v8")
S390X = ("linux", "s390x", None)
RUNTIME = {
    "Entrypoint": ["/srv/app", "--serve"],
    "Cmd": ["--port", "8080"],
    "Env": ["PATH=/usr/bin:/bin", "MODE=production"],
    "WorkingDir": "/srv",
    "ExposedPorts": {"8080/tcp": {}, "9090": {}, "53/udp": {}},
}


@pytest.fixture(params=["basic", "token"])
def registry(request: pytest.FixtureRequest) -> LocalRegistry:
    """Each test runs once per auth mode: htpasswd Basic and Bearer tokens."""
    found: LocalRegistry = request.getfixturevalue(f"registry_{request.param}")
    return found


def settings_for(registry: LocalRegistry) -> Settings:
    return Settings(
        insecure_registries=[registry.host],
        allow_registries=["127.0.0.1"],
        registry_timeout_s=5.0,
    )


def push(registry: LocalRegistry, **options: Any) -> PushedImage:
    """Push under a fresh repository so tests never see each other's tags."""
    repo = f"images/app-{secrets.token_hex(4)}"
    return push_image(registry, repo, "v1", **options)


async def check(
    registry: LocalRegistry,
    image: str,
    *,
    user: tuple[str, str] | None = ("alice", "alice-pass"),
    tokens: TokenCache | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> ImageCheck:
    cmd = CheckImage(
        image=image,
        username=user[0] if user else None,
        secret=user[1] if user else None,
    )
    return await check_image(
        cmd, settings_for(registry), tokens=tokens, transport=transport
    )


def issued(registry: LocalRegistry, user: str) -> list[str]:
    assert registry.issuer is not None
    return [scope for name, scope in registry.issuer.requests if name == user]


@pytest.mark.parametrize(
    ("media", "index_type"), [("oci", OCI_INDEX), ("docker", DOCKER_LIST)]
)
async def test_a_multi_platform_image_with_amd64_is_accepted_and_pinned(
    registry: LocalRegistry, media: str, index_type: str
) -> None:
    pushed = push(registry, platforms=(ARM64, AMD64), media=media, config_extra=RUNTIME)
    image = f"{registry.host}/{pushed.repo}:v1"
    result = await check(registry, image)
    assert result.error is None
    assert result.outcome == "accepted"
    assert result.image == image
    assert result.digest == pushed.digest
    assert result.media_type == index_type
    assert result.platform_digest == pushed.platform_digests["linux/amd64"]
    assert result.platforms == ["linux/arm64/v8", "linux/amd64"]
    assert result.warnings == []
    assert result.config is not None
    assert result.config.entrypoint == ["/srv/app", "--serve"]


async def test_an_index_without_amd64_names_the_platforms_it_has(
    registry: LocalRegistry,
) -> None:
    pushed = push(registry, platforms=(ARM64, S390X))
    result = await check(registry, f"{registry.host}/{pushed.repo}:v1")
    assert result.outcome == "rejected"
    assert result.platforms == ["linux/arm64/v8", "linux/s390x"]
    assert result.digest == pushed.digest
    assert result.platform_digest is None
    error = result.error
    assert error is not None
    assert error.code == "platform_not_supported"
    assert error.registry == registry.host
    assert "built for linux/arm64/v8, linux/s390x" in error.explanation
    assert "push a linux/amd64 variant" in error.explanation


@pytest.mark.parametrize(
    ("media", "manifest_type"), [("oci", OCI_MANIFEST), ("docker", DOCKER_MANIFEST)]
)
async def test_a_single_amd64_manifest_is_accepted_with_its_config(
    registry: LocalRegistry, media: str, manifest_type: str
) -> None:
    pushed = push(registry, media=media, config_extra=RUNTIME)
    result = await check(registry, f"{registry.host}/{pushed.repo}:v1")
    assert result.outcome == "accepted"
    assert result.digest == result.platform_digest == pushed.digest
    assert result.media_type == manifest_type
    assert result.platforms == ["linux/amd64"]
    assert result.config == ImageConfig(
        entrypoint=["/srv/app", "--serve"],
        cmd=["--port", "8080"],
        env=["PATH=/usr/bin:/bin", "MODE=production"],
        working_dir="/srv",
        exposed_ports=[8080, 9090],
    )


async def test_a_config_without_runtime_settings_reads_as_empty(
    registry: LocalRegistry,
) -> None:
    absent = dict.fromkeys(RUNTIME)
    pushed = push(registry, config_extra=absent)
    result = await check(registry, f"{registry.host}/{pushed.repo}:v1")
    assert result.outcome == "accepted"
    assert result.config == ImageConfig()


async def test_a_single_arm64_manifest_is_refused_from_its_config(
    registry: LocalRegistry,
) -> None:
    pushed = push(registry, platforms=(ARM64,))
    result = await check(registry, f"{registry.host}/{pushed.repo}:v1")
    assert result.outcome == "rejected"
    assert result.platforms == ["linux/arm64/v8"]
    assert result.digest == pushed.digest
    assert result.error is not None
    assert result.error.code == "platform_not_supported"
    assert "built for linux/arm64/v8" in result.error.explanation


async def test_attestations_are_not_platforms(registry: LocalRegistry) -> None:
    pushed = push(registry, platforms=(AMD64, ARM64), attestation=True)
    result = await check(registry, f"{registry.host}/{pushed.repo}:v1")
    assert result.outcome == "accepted"
    assert result.digest == pushed.digest
    assert result.platforms == ["linux/amd64", "linux/arm64/v8"]
    assert result.platform_digest == pushed.platform_digests["linux/amd64"]


async def test_an_amd64_v3_only_image_is_accepted_with_a_warning(
    registry: LocalRegistry,
) -> None:
    pushed = push(registry, platforms=(("linux", "amd64", "v3"), ARM64))
    result = await check(registry, f"{registry.host}/{pushed.repo}:v1")
    assert result.outcome == "accepted"
    assert result.platform_digest == pushed.platform_digests["linux/amd64/v3"]
    assert result.platforms == ["linux/amd64/v3", "linux/arm64/v8"]
    assert len(result.warnings) == 1
    assert "needs an x86-64-v3 CPU" in result.warnings[0]


async def test_the_baseline_amd64_entry_is_preferred_over_v3(
    registry: LocalRegistry,
) -> None:
    pushed = push(registry, platforms=(("linux", "amd64", "v3"), AMD64))
    result = await check(registry, f"{registry.host}/{pushed.repo}:v1")
    assert result.platform_digest == pushed.platform_digests["linux/amd64"]
    assert result.warnings == []


async def test_a_missing_tag_is_not_found_in_the_registrys_words(
    registry: LocalRegistry,
) -> None:
    pushed = push(registry)
    result = await check(registry, f"{registry.host}/{pushed.repo}:never-pushed")
    assert result.outcome == "rejected"
    error = result.error
    assert error is not None
    assert error.code == "image_not_found"
    assert error.registry_status == 404
    assert error.registry_code == "MANIFEST_UNKNOWN"
    assert error.registry_message == "manifest unknown"
    assert error.explanation == (
        f"{registry.host} has no image {registry.host}/{pushed.repo}:never-pushed: "
        "check the repository and tag."
    )


async def test_a_missing_repository_is_not_found(registry: LocalRegistry) -> None:
    result = await check(registry, f"{registry.host}/images/never-pushed")
    assert result.error is not None
    assert result.error.code == "image_not_found"
    assert result.error.registry_status == 404


async def test_a_wrong_password_is_a_rejected_credential(
    registry: LocalRegistry,
) -> None:
    pushed = push(registry)
    result = await check(
        registry, f"{registry.host}/{pushed.repo}:v1", user=("alice", "wrong-pass")
    )
    assert result.outcome == "rejected"
    error = result.error
    assert error is not None
    assert error.code == "credential_rejected"
    assert error.registry_status == 401
    assert error.registry_code == "UNAUTHORIZED"
    assert error.registry_message == "authentication required"
    assert "wrong username or token" in error.explanation
    assert "update the credential" in error.explanation
    assert "wrong-pass" not in result.model_dump_json()


async def test_a_user_without_access_is_refused_in_the_registrys_words(
    registry_token: LocalRegistry,
) -> None:
    pushed = push(registry_token)
    before = len(issued(registry_token, "nobody"))
    result = await check(
        registry_token,
        f"{registry_token.host}/{pushed.repo}:v1",
        user=("nobody", "nobody-pass"),
    )
    error = result.error
    assert error is not None
    assert error.code == "credential_rejected"
    assert error.registry_status == 401
    assert error.registry_code == "UNAUTHORIZED"
    assert error.registry_message == "authentication required (insufficient_scope)"
    assert error.explanation.startswith(
        f"The registry accepted the login but refused to let it read {pushed.repo}"
    )
    assert "update the credential" in error.explanation
    assert issued(registry_token, "nobody")[before:] == [
        f"repository:{pushed.repo}:pull"
    ]


async def test_a_token_is_asked_for_pull_on_the_repository_only(
    registry_token: LocalRegistry,
) -> None:
    pushed = push(registry_token, platforms=(AMD64, ARM64))
    tokens = TokenCache()
    before = len(issued(registry_token, "alice"))
    image = f"{registry_token.host}/{pushed.repo}:v1"
    for _ in range(2):
        result = await check(registry_token, image, tokens=tokens)
        assert result.outcome == "accepted"
    assert issued(registry_token, "alice")[before:] == [
        f"repository:{pushed.repo}:pull"
    ]


async def test_an_anonymous_check_of_a_private_image_asks_for_a_login(
    registry: LocalRegistry,
) -> None:
    pushed = push(registry)
    result = await check(registry, f"{registry.host}/{pushed.repo}:v1", user=None)
    error = result.error
    assert error is not None
    assert error.code == "credential_rejected"
    assert error.registry_status == 401
    assert error.explanation == (
        f"{registry.host} needs a login to read {pushed.repo}: add a credential "
        "that may pull it."
    )


async def test_a_reference_by_digest_is_checked_at_that_digest(
    registry: LocalRegistry,
) -> None:
    pushed = push(registry, platforms=(AMD64, ARM64))
    push_image(registry, pushed.repo, "v1", platforms=(ARM64,))  # the tag moves
    image = f"{registry.host}/{pushed.repo}@{pushed.digest}"
    result = await check(registry, image)
    assert result.outcome == "accepted"
    assert result.image == image
    assert result.digest == pushed.digest
    assert result.platform_digest == pushed.platform_digests["linux/amd64"]


async def test_a_tag_and_digest_are_checked_at_the_digest(
    registry: LocalRegistry,
) -> None:
    pushed = push(registry)
    image = f"{registry.host}/{pushed.repo}:v1@{pushed.digest}"
    result = await check(registry, image)
    assert (result.outcome, result.digest) == ("accepted", pushed.digest)


async def test_a_wrong_digest_is_not_found(registry: LocalRegistry) -> None:
    pushed = push(registry)
    wrong = "sha256:" + "0" * 64
    result = await check(registry, f"{registry.host}/{pushed.repo}@{wrong}")
    error = result.error
    assert error is not None
    assert error.code == "image_not_found"
    assert error.registry_status == 404
    assert error.registry_code == "MANIFEST_UNKNOWN"
    assert error.explanation.endswith("check the repository and digest.")


@pytest.mark.parametrize(
    ("image", "part"),
    [
        ("{host}/Team/App:v1", "The repository path 'Team/App' must be lowercase."),
        ("{host}/team/app:bad!tag", "The tag 'bad!tag' may only contain letters"),
        ("{host}/team/app:" + "x" * 130, "The tag is 130 characters"),
        ("{host}/team/app@sha256:abc", "'sha256:abc' is not a valid sha256 digest"),
        ("127.0.0.1:99999/team/app", "The registry port '99999' is not a port"),
        ("https://{host}/team/app", "Leave out 'https://'"),
        ("", "The image reference is empty."),
        ("{host}/team app", "must not contain white space"),
        ("999.0.0.1/team/app", "registry cannot be used: '999.0.0.1' is not a"),
        ("a.123/team/app", "The last label '123' of a host name cannot be"),
    ],
)
async def test_an_invalid_reference_is_refused_without_a_request(
    registry: LocalRegistry, image: str, part: str
) -> None:
    requests: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(500)

    transport = httpx.MockTransport(record)
    result = await check(
        registry, image.format(host=registry.host), transport=transport
    )
    assert result.outcome == "rejected"
    assert result.error is not None
    assert result.error.code == "invalid_image_reference"
    assert part in result.error.explanation
    assert requests == []


async def test_a_username_without_a_secret_is_an_invalid_request(
    registry: LocalRegistry,
) -> None:
    cmd = CheckImage(image=f"{registry.host}/team/app", username="alice")
    result = await check_image(cmd, settings_for(registry))
    assert result.error is not None
    assert result.error.code == "invalid_request"


async def test_loopback_is_refused_without_the_allow_list(
    registry: LocalRegistry,
) -> None:
    cmd = CheckImage(
        image=f"{registry.host}/team/app", username="alice", secret="alice-pass"
    )
    settings = Settings(insecure_registries=[registry.host])
    result = await check_image(cmd, settings)
    assert result.error is not None
    assert result.error.code == "registry_address_forbidden"
    assert result.image == f"{registry.host}/team/app:latest"
