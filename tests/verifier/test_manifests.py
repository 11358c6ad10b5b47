"""Reading indexes, manifests and configs as registries send them."""

import hashlib
import json

import pytest

from services.registry.errors import MalformedResponseError
from services.registry.manifests import (
    OCI_INDEX,
    ImageIndex,
    ImageManifest,
    Platform,
    cpu_warning,
    exposed_ports,
    pin_digest,
    read_config,
    read_manifest,
)

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64
C = "sha256:" + "c" * 64


def entry(digest: str, platform: dict[str, str] | None) -> dict[str, object]:
    found: dict[str, object] = {"mediaType": "x", "digest": digest, "size": 1}
    if platform is not None:
        found["platform"] = platform
    return found


def index(*entries: dict[str, object]) -> ImageIndex:
    body = json.dumps({"schemaVersion": 2, "manifests": list(entries)}).encode()
    document = read_manifest(OCI_INDEX, body)
    assert isinstance(document, ImageIndex)
    return document


def test_attestations_and_platformless_entries_are_not_images() -> None:
    document = index(
        entry(A, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
        entry(B, {"os": "unknown", "architecture": "unknown"}),
        entry(C, None),
        entry(C, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
    )
    assert document.platforms() == ["linux/arm64/v8"]
    assert document.for_app_vms() is None


@pytest.mark.parametrize(
    ("variants", "chosen"),
    [
        (["v3", None], B),
        (["v3", "v2"], B),
        (["v1", "v2"], A),
        (["v9x", "v4"], B),
    ],
)
def test_the_amd64_entry_that_runs_on_most_cpus_is_chosen(
    variants: list[str | None], chosen: str
) -> None:
    platforms = [
        {"os": "linux", "architecture": "amd64", **({"variant": v} if v else {})}
        for v in variants
    ]
    document = index(entry(A, platforms[0]), entry(B, platforms[1]))
    found = document.for_app_vms()
    assert found is not None
    assert found.digest == chosen


@pytest.mark.parametrize(
    ("variant", "warned"), [(None, False), ("v1", False), ("v2", True), ("v3", True)]
)
def test_a_newer_cpu_level_is_warned_about(variant: str | None, warned: bool) -> None:
    warning = cpu_warning(Platform("linux", "amd64", variant))
    assert (warning is not None) is warned
    if warning:
        assert f"needs an x86-64-{variant} CPU" in warning


def test_the_kind_is_read_from_the_body_when_the_content_type_is_generic() -> None:
    manifest = {"schemaVersion": 2, "config": {"digest": A}, "layers": []}
    document = read_manifest("application/json", json.dumps(manifest).encode())
    assert isinstance(document, ImageManifest)
    assert document.config.digest == A


@pytest.mark.parametrize(
    "body",
    [b"[]", b"not json", b'{"schemaVersion": 2}', b'{"manifests": [{"digest": 1}]}'],
)
def test_unusable_manifests_are_refused(body: bytes) -> None:
    with pytest.raises(MalformedResponseError):
        read_manifest(None, body)


def test_a_digest_is_pinned_from_the_bytes() -> None:
    body = b'{"schemaVersion": 2}'
    sha256 = "sha256:" + hashlib.sha256(body).hexdigest()
    sha512 = "sha512:" + hashlib.sha512(body).hexdigest()
    assert pin_digest(body, None, None) == sha256
    assert pin_digest(body, sha256, None) == sha256
    assert pin_digest(body, sha256, sha512) == sha512
    with pytest.raises(MalformedResponseError, match="Docker-Content-Digest"):
        pin_digest(body, A, None)
    with pytest.raises(MalformedResponseError, match="it was asked for"):
        pin_digest(body, None, A)


def test_exposed_ports_keep_tcp_only() -> None:
    ports: dict[str, object] = {"8080/tcp": {}, "53/udp": {}, "9000": {}, "80/TCP": {}}
    assert exposed_ports({**ports, "x/tcp": {}}) == [80, 8080, 9000]
    assert exposed_ports({"70000/tcp": {}, "0": {}}) == []
    assert exposed_ports(["8080/tcp"]) == []


def test_a_config_with_wrong_types_reads_what_it_can() -> None:
    body = json.dumps(
        {
            "os": "linux",
            "architecture": "amd64",
            "config": {"Entrypoint": "sh", "Cmd": ["a", 1], "WorkingDir": "/w"},
        }
    ).encode()
    platform, config = read_config(body)
    assert platform == Platform("linux", "amd64")
    assert (config.entrypoint, config.cmd, config.working_dir) == (None, None, "/w")
