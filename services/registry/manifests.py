"""Indexes, manifests and image configs as registries send them: no I/O here.

A registry's JSON may be anything: what cannot be used raises
``MalformedResponseError`` saying what was wrong.
"""

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from contracts.replies import ImageConfig
from services.registry.errors import MalformedResponseError
from services.registry.protocol import DIGEST, MANIFEST_MEDIA_TYPES, digest_of

OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST = MANIFEST_MEDIA_TYPES
INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
IMAGE_MEDIA_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
SCHEMA1_MEDIA_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)
TARGET = "linux/amd64"

_BASELINE_VARIANTS = frozenset({"", "v1"})
_LEVEL = re.compile(r"v([0-9]{1,2})", re.ASCII)
_UNKNOWN_LEVEL = 100
_MAX_LAYERS = 1000


@dataclass(frozen=True)
class Platform:
    """Where an image runs: ``os/architecture[/variant]``."""

    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return "/".join(
            part for part in (self.os, self.architecture, self.variant) if part
        )

    @property
    def is_attestation(self) -> bool:
        """``unknown/unknown`` marks provenance and SBOM entries, not images."""
        return self.os == "unknown" and self.architecture == "unknown"

    @property
    def runs_on_app_vms(self) -> bool:
        return f"{self.os}/{self.architecture}" == TARGET

    @property
    def cpu_level(self) -> int:
        """1 for any amd64 CPU, N for x86-64-vN only; unknown variants sort last."""
        variant = self.variant or ""
        if variant in _BASELINE_VARIANTS:
            return 1
        level = _LEVEL.fullmatch(variant)
        return int(level.group(1)) if level else _UNKNOWN_LEVEL


@dataclass(frozen=True)
class Descriptor:
    """A pointer to a manifest or blob by digest."""

    digest: str
    media_type: str | None = None
    platform: Platform | None = None
    size: int | None = None


@dataclass(frozen=True)
class ImageIndex:
    """An OCI index or Docker manifest list: one manifest per platform."""

    manifests: tuple[Descriptor, ...]

    def images(self) -> list[Descriptor]:
        """Entries that are images: attestations and platform-less ones left out."""
        return [
            entry
            for entry in self.manifests
            if entry.platform is not None and not entry.platform.is_attestation
        ]

    def platforms(self) -> list[str]:
        """The platforms the index has images for, each once, in its order."""
        return list(dict.fromkeys(str(entry.platform) for entry in self.images()))

    def for_app_vms(self) -> Descriptor | None:
        """The linux/amd64 entry that runs on the most CPUs, if there is one."""
        candidates = [
            entry
            for entry in self.images()
            if entry.platform is not None and entry.platform.runs_on_app_vms
        ]
        return min(candidates, key=_cpu_level, default=None)


@dataclass(frozen=True)
class ImageManifest:
    """One platform's manifest: its config blob tells the platform and runtime."""

    config: Descriptor
    layers: tuple[Descriptor, ...] = ()


def read_manifest(media_type: str | None, body: bytes) -> ImageIndex | ImageManifest:
    """Read an index or an image manifest, by Content-Type or else by its fields."""
    if media_type in SCHEMA1_MEDIA_TYPES:
        raise _schema1()
    data = _json_object(body, "manifest")
    if data.get("schemaVersion") == 1:
        raise _schema1()
    declared = data.get("mediaType")
    kind = media_type if media_type in MANIFEST_MEDIA_TYPES else declared
    if kind in INDEX_MEDIA_TYPES or (kind is None and "manifests" in data):
        return _index(data)
    if kind in IMAGE_MEDIA_TYPES or (kind is None and "config" in data):
        return ImageManifest(
            config=_descriptor(data.get("config"), "config"),
            layers=_layers(data.get("layers")),
        )
    raise MalformedResponseError(
        f"The registry sent a manifest of type {_shown(media_type)} that is neither "
        "an image index nor an image manifest.",
        status=200,
    )


def pin_digest(body: bytes, header: str | None, requested: str | None) -> str:
    """The digest of a manifest, checked against the header and what was asked."""
    if header is not None:
        if not DIGEST.fullmatch(header):
            raise MalformedResponseError(
                "The registry sent a Docker-Content-Digest that is not a digest.",
                status=200,
            )
        if digest_of(body, _algorithm(header)) != header:
            raise MalformedResponseError(
                f"The manifest the registry sent does not match its "
                f"Docker-Content-Digest {header}.",
                status=200,
            )
    if requested is not None:
        if digest_of(body, _algorithm(requested)) != requested:
            raise MalformedResponseError(
                f"The registry sent a manifest that does not match the digest "
                f"{requested} it was asked for.",
                status=200,
            )
        return requested
    return header or digest_of(body)


def platform_manifest(
    media_type: str | None, body: bytes, header: str | None, entry: Descriptor
) -> ImageManifest:
    """The image manifest an index entry points at, checked against its digest."""
    pin_digest(body, header, entry.digest)
    manifest = read_manifest(media_type, body)
    if not isinstance(manifest, ImageManifest):
        raise MalformedResponseError(
            f"The linux/amd64 entry {entry.digest} of the index is not an "
            "image manifest.",
            status=200,
        )
    return manifest


def read_config(body: bytes) -> tuple[Platform | None, ImageConfig]:
    """The platform an image config names, and what the VM's init needs from it."""
    data = _json_object(body, "image config")
    runtime = data.get("config")
    runtime = runtime if isinstance(runtime, dict) else {}
    config = ImageConfig(
        entrypoint=_strings(runtime.get("Entrypoint")),
        cmd=_strings(runtime.get("Cmd")),
        env=_strings(runtime.get("Env")) or [],
        working_dir=_text(runtime.get("WorkingDir")),
        exposed_ports=exposed_ports(runtime.get("ExposedPorts")),
    )
    return _platform(data), config


def exposed_ports(value: object) -> list[int]:
    """TCP ports from ``{"8080/tcp": {}, "53/udp": {}}``; no protocol means TCP."""
    if not isinstance(value, dict):
        return []
    ports: set[int] = set()
    for key in value:
        if not isinstance(key, str):
            continue
        number, _, protocol = key.partition("/")
        if (protocol or "tcp").lower() != "tcp" or not number.isascii():
            continue
        if number.isdigit() and 1 <= int(number) <= 65535:
            ports.add(int(number))
    return sorted(ports)


def cpu_warning(platform: Platform) -> str | None:
    """A warning when an amd64 image needs a newer CPU than the baseline."""
    if platform.cpu_level == 1:
        return None
    variant = platform.variant
    return (
        f"The linux/amd64 image is built for the {variant} variant only: it needs "
        f"an x86-64-{variant} CPU and will not start on older ones."
    )


def _index(data: Mapping[str, Any]) -> ImageIndex:
    entries = data.get("manifests")
    if not isinstance(entries, list):
        raise MalformedResponseError(
            "The image index the registry sent has no list of manifests.", status=200
        )
    return ImageIndex(
        tuple(_descriptor(entry, "index entry") for entry in entries[:1000])
    )


def _layers(value: object) -> tuple[Descriptor, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise MalformedResponseError(
            "The image manifest the registry sent has layers that are not a list.",
            status=200,
        )
    if len(value) > _MAX_LAYERS:
        raise MalformedResponseError(
            f"The image manifest the registry sent lists {len(value)} layers; "
            f"at most {_MAX_LAYERS} are accepted.",
            status=200,
        )
    return tuple(_descriptor(entry, "layer") for entry in value)


def _descriptor(value: object, what: str) -> Descriptor:
    if not isinstance(value, dict):
        raise MalformedResponseError(
            f"The manifest has a {what} that is not a JSON object.", status=200
        )
    digest = value.get("digest")
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise MalformedResponseError(
            f"The manifest has a {what} without a valid sha256 or sha512 digest.",
            status=200,
        )
    media_type, size = value.get("mediaType"), value.get("size")
    return Descriptor(
        digest=digest,
        media_type=media_type if isinstance(media_type, str) else None,
        platform=_platform(value.get("platform")),
        size=size if _is_size(size) else None,
    )


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _platform(value: object) -> Platform | None:
    if not isinstance(value, dict):
        return None
    os_name, architecture = _text(value.get("os")), _text(value.get("architecture"))
    if os_name is None or architecture is None:
        return None
    return Platform(os_name, architecture, _text(value.get("variant")))


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        raise MalformedResponseError(
            f"The {what} the registry sent is not a JSON object.", status=200
        )
    return data


def _strings(value: object) -> list[str] | None:
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    return None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _algorithm(digest: str) -> str:
    return digest.partition(":")[0]


def _cpu_level(entry: Descriptor) -> int:
    return entry.platform.cpu_level if entry.platform is not None else _UNKNOWN_LEVEL


def _schema1() -> MalformedResponseError:
    return MalformedResponseError(
        "The registry sent an old schema 1 manifest, which has no stable digest; "
        "push the image again with a current Docker or buildx.",
        status=200,
    )


def _shown(media_type: str | None) -> str:
    return repr(media_type[:80]) if media_type else "(none given)"
