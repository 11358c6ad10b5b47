"""Image references as users type them, read by the distribution grammar.

``parse_reference("team/app")`` gives ``docker.io/library/...``-style canonical
references; a reference that cannot be read raises ``InvalidReferenceError``
with a sentence naming the part that is wrong. Pure: no I/O.
"""

import ipaddress
import re
from typing import Final, Literal, Self, get_args

from pydantic import BaseModel, ConfigDict, model_validator

ReferencePart = Literal["reference", "registry", "port", "repository", "tag", "digest"]
REFERENCE_PARTS: Final = frozenset(get_args(ReferencePart))

DOCKER_HUB: Final = "docker.io"
DOCKER_HUB_ALIASES: Final = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io"}
)
LIBRARY: Final = "library/"
DEFAULT_TAG: Final = "latest"
MAX_NAME: Final = 255
MAX_TAG: Final = 128
DIGEST_HEX_LENGTHS: Final = {"sha256": 64, "sha512": 128}

_MAX_INPUT = 1000
_QUOTE_LIMIT = 80
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*", re.ASCII)
_PATH_CHARS = re.compile(r"[a-zA-Z0-9._/-]", re.ASCII)
_SEPARATOR_RUN = re.compile(r"[._-]+", re.ASCII)
_GOOD_SEPARATOR = re.compile(r"[._]|__|-+", re.ASCII)
_TAG = re.compile(r"\w[\w.-]{0,127}", re.ASCII)
_TAG_CHARS = re.compile(r"[\w.-]+", re.ASCII)
_HOST_LABEL = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?", re.ASCII)
_HOST_CHARS = re.compile(r"[a-zA-Z0-9.-]", re.ASCII)
_ALGORITHM = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*", re.ASCII)
_HEX = re.compile(r"[a-fA-F0-9]+", re.ASCII)
_IMAGE_ID = re.compile(r"[a-f0-9]{64}", re.ASCII)
_DIGITS = re.compile(r"[0-9]+", re.ASCII)


class InvalidReferenceError(ValueError):
    """An image reference that cannot be read; ``detail`` says which part and why."""

    def __init__(self, part: ReferencePart, detail: str) -> None:
        super().__init__(detail)
        self.part: ReferencePart = part
        self.detail = detail


class ImageReference(BaseModel):
    """A parsed image reference in canonical form.

    ``tag`` is ``latest`` when neither a tag nor a digest was given; with a
    digest the tag is kept only if it was typed. Built directly, a reference
    must be canonical already.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @model_validator(mode="after")
    def _canonical(self) -> Self:
        if self.tag is None and self.digest is None:
            raise ValueError("An image reference needs a tag or a digest.")
        fields = (self.registry, self.repository, self.tag, self.digest)
        if _parse(self.canonical) != fields:
            raise ValueError(
                f"The reference '{_shown(self.canonical)}' is not in canonical form."
            )
        return self

    @property
    def name(self) -> str:
        """``registry/repository``, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def canonical(self) -> str:
        """``registry/repository[:tag][@digest]``."""
        return self.name + self._suffix()

    @property
    def familiar(self) -> str:
        """The short form a user would type: Docker Hub's host and library/ left out."""
        if self.registry != DOCKER_HUB:
            return self.canonical
        path = self.repository
        if path.startswith(LIBRARY) and "/" not in path[len(LIBRARY) :]:
            path = path[len(LIBRARY) :]
        return path + self._suffix()

    @property
    def manifest_reference(self) -> str:
        """The digest when pinned, else the tag: how the manifest is addressed."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_digest(self, digest: str) -> "ImageReference":
        """The same reference pinned to ``digest`` (its tag kept for reading)."""
        _check_digest(digest)
        return self.model_copy(update={"digest": digest})

    def __str__(self) -> str:
        return self.canonical

    def _suffix(self) -> str:
        tag = f":{self.tag}" if self.tag else ""
        digest = f"@{self.digest}" if self.digest else ""
        return tag + digest


def parse_reference(text: str) -> ImageReference:
    """Read ``[host[:port]/]path[:tag][@digest]`` into its canonical form.

    Raise ``InvalidReferenceError`` naming the wrong part in a sentence.
    """
    registry, repository, tag, digest = _parse(text)
    return ImageReference.model_construct(
        registry=registry, repository=repository, tag=tag, digest=digest
    )


def names_registry(text: str) -> bool:
    """Whether ``text`` starts with a registry host rather than a path component."""
    first, slash, _ = text.partition("/")
    return bool(slash) and _looks_like_host(first)


def same_registry(reference: ImageReference | str, registry_name: str) -> bool:
    """Whether an image lives on the registry named; Docker Hub's names are one.

    Host names compare without case, and port 443 is the same as no port.
    ``registry_name`` that is not a valid host is never the same.
    """
    if isinstance(reference, str):
        try:
            reference = parse_reference(reference)
        except InvalidReferenceError:
            return False
    try:
        wanted = _parse_registry(registry_name.strip().rstrip("/"))
    except InvalidReferenceError:
        return False
    return _without_https_port(reference.registry) == _without_https_port(wanted)


_Fields = tuple[str, str, str | None, str | None]


def _parse(text: str) -> _Fields:
    """(registry, repository, tag, digest) of ``text``, or the reason it fails."""
    _check_whole(text)
    name, at, digest = text.partition("@")
    if at:
        _check_digest(digest)
    if not name:
        raise InvalidReferenceError(
            "repository",
            "The image reference has no repository before '@'; give one such as "
            "'team/app@sha256:…'.",
        )
    if not at and _IMAGE_ID.fullmatch(name):
        raise InvalidReferenceError(
            "repository",
            f"The name '{_shown(name)}' is an image ID, not a repository: give a "
            "name such as 'team/app', and pin a digest with '@sha256:…' if you "
            "want one.",
        )

    # The first component names a host only if it cannot be a path component.
    if names_registry(name):
        first, _, remainder = name.partition("/")
        registry = _parse_registry(first)
    else:
        registry, remainder = DOCKER_HUB, name
    path, colon, tag = remainder.partition(":")
    if colon:
        _check_tag(tag)
    _check_path(path)
    if registry == DOCKER_HUB and "/" not in path:
        path = LIBRARY + path
    if len(registry) + 1 + len(path) > MAX_NAME:
        raise InvalidReferenceError(
            "repository",
            f"The image name (registry and repository path) is "
            f"{len(registry) + 1 + len(path)} characters; at most {MAX_NAME} are "
            "allowed.",
        )
    if not colon and not at:
        tag = DEFAULT_TAG
    return registry, path, tag or None, digest if at else None


def _check_whole(text: str) -> None:
    if not text:
        raise InvalidReferenceError("reference", "The image reference is empty.")
    if any(ch.isspace() or not ch.isprintable() for ch in text):
        raise InvalidReferenceError(
            "reference",
            "The image reference must not contain white space or control characters.",
        )
    scheme, sep, _ = text.partition("://")
    if sep:
        raise InvalidReferenceError(
            "reference",
            f"Leave out '{_shown(scheme, 16)}://'; give the image as host/path:tag.",
        )
    if len(text) > _MAX_INPUT:
        raise InvalidReferenceError(
            "reference",
            f"The image reference is {len(text)} characters; no valid one is "
            f"longer than {_MAX_INPUT}.",
        )


def _looks_like_host(first: str) -> bool:
    return "." in first or ":" in first or first == "localhost" or first[:1] == "["


def _parse_registry(text: str) -> str:
    """Validate ``host[:port]`` and return it lower-cased, Docker Hub as docker.io."""
    if text.startswith("["):
        host, port = _split_bracketed(text)
    else:
        if text.count(":") > 1:
            raise InvalidReferenceError(
                "registry",
                f"The registry host '{_shown(text)}' has more than one ':'; write "
                "host:port, with an IPv6 address in brackets as in '[::1]:5000'.",
            )
        host, colon, port_text = text.partition(":")
        port = _parse_port(port_text) if colon else None
        host = _check_host_name(host)
    if port is None and host in DOCKER_HUB_ALIASES:
        return DOCKER_HUB
    return host if port is None else f"{host}:{port}"


def _split_bracketed(text: str) -> tuple[str, int | None]:
    close = text.find("]")
    if close == -1:
        raise InvalidReferenceError(
            "registry",
            f"The registry address '{_shown(text)}' is missing its closing ']'.",
        )
    inside, rest = text[1:close], text[close + 1 :]
    try:
        if not _HEX.fullmatch(inside.replace(":", "a")):
            raise ValueError(inside)
        address = ipaddress.IPv6Address(inside)
    except ValueError:
        raise InvalidReferenceError(
            "registry",
            f"The registry address '[{_shown(inside, 45)}]' is not a valid IPv6 "
            "address.",
        ) from None
    if rest and not rest.startswith(":"):
        raise InvalidReferenceError(
            "registry",
            "Only a port may follow an IPv6 address in brackets, as in '[::1]:5000'.",
        )
    port = _parse_port(rest[1:]) if rest else None
    return f"[{address.compressed}]", port


def _parse_port(text: str) -> int:
    if not text:
        raise InvalidReferenceError(
            "port", "The registry port is missing after ':'; give one such as 5000."
        )
    port = int(text) if _DIGITS.fullmatch(text) and len(text) <= 5 else 0
    if not 1 <= port <= 65535:
        raise InvalidReferenceError(
            "port", f"The registry port '{_shown(text, 12)}' is not a port number."
        )
    return port


def _check_host_name(host: str) -> str:
    if not host:
        raise InvalidReferenceError(
            "registry", "The registry host is missing before the port."
        )
    bad = next((ch for ch in host if not _HOST_CHARS.fullmatch(ch)), None)
    if bad is not None:
        raise InvalidReferenceError(
            "registry",
            f"The registry host '{_shown(host)}' contains '{bad}'; a host name has "
            "only letters, digits, '-' and '.'.",
        )
    for label in host.split("."):
        if not label:
            raise InvalidReferenceError(
                "registry",
                f"The registry host '{_shown(host)}' has an empty part: a dot at "
                "either end or two in a row.",
            )
        if not _HOST_LABEL.fullmatch(label):
            raise InvalidReferenceError(
                "registry",
                f"The registry host '{_shown(host)}' has a part that starts or ends "
                "with '-'.",
            )
    return host.lower()


def _check_path(path: str) -> None:
    if not path:
        raise InvalidReferenceError(
            "repository",
            "The image reference has no repository path; give one such as 'team/app'.",
        )
    bad = next((ch for ch in path if not _PATH_CHARS.fullmatch(ch)), None)
    if bad is not None:
        raise InvalidReferenceError(
            "repository",
            f"The repository path '{_shown(path)}' contains '{bad}'; use only "
            "lowercase letters, digits, '.', '_', '-' and '/'.",
        )
    if path != path.lower():
        raise InvalidReferenceError(
            "repository", f"The repository path '{_shown(path)}' must be lowercase."
        )
    for component in path.split("/"):
        _check_component(path, component)


def _check_component(path: str, component: str) -> None:
    if _COMPONENT.fullmatch(component):
        return
    if not component:
        raise InvalidReferenceError(
            "repository",
            f"The repository path '{_shown(path)}' has an empty component: a '/' "
            "at either end or two in a row.",
        )
    if not (component[0].isalnum() and component[-1].isalnum()):
        raise InvalidReferenceError(
            "repository",
            f"The path component '{_shown(component)}' must start and end with a "
            "lowercase letter or digit.",
        )
    run = next(
        (
            match.group()
            for match in _SEPARATOR_RUN.finditer(component)
            if not _GOOD_SEPARATOR.fullmatch(match.group())
        ),
        "",
    )
    raise InvalidReferenceError(
        "repository",
        f"The path component '{_shown(component)}' joins words with '{run}'; use "
        "one '.', one or two '_', or dashes.",
    )


def _check_tag(tag: str) -> None:
    if not tag:
        raise InvalidReferenceError(
            "tag",
            "The tag after ':' is empty; give one such as 'latest' or '1.2', or "
            "leave out the ':'.",
        )
    if len(tag) > MAX_TAG and _TAG_CHARS.fullmatch(tag):
        raise InvalidReferenceError(
            "tag", f"The tag is {len(tag)} characters; at most {MAX_TAG} are allowed."
        )
    if not _TAG.fullmatch(tag):
        raise InvalidReferenceError(
            "tag",
            f"The tag '{_shown(tag)}' may only contain letters, digits, '_', '.' "
            "and '-' and must not start with '.' or '-'.",
        )


def _check_digest(digest: str) -> None:
    if not digest:
        raise InvalidReferenceError(
            "digest",
            "The digest after '@' is empty; give one such as 'sha256:' followed "
            "by 64 hexadecimal characters.",
        )
    algorithm, colon, encoded = digest.partition(":")
    if not colon or not _ALGORITHM.fullmatch(algorithm):
        raise InvalidReferenceError(
            "digest",
            f"The digest '{_shown(digest)}' must be written as algorithm:hex, such "
            "as 'sha256:' followed by 64 hexadecimal characters.",
        )
    length = DIGEST_HEX_LENGTHS.get(algorithm)
    if length is None:
        raise InvalidReferenceError(
            "digest",
            f"The digest algorithm '{_shown(algorithm, 20)}' is not supported; use "
            "sha256 (or sha512).",
        )
    if len(encoded) != length or not _HEX.fullmatch(encoded):
        raise InvalidReferenceError(
            "digest",
            f"The digest '{_shown(digest)}' is not a valid {algorithm} digest "
            f"({length} hexadecimal characters).",
        )
    if encoded != encoded.lower():
        raise InvalidReferenceError(
            "digest",
            f"The digest '{_shown(digest)}' must use lowercase hexadecimal characters.",
        )


def _without_https_port(registry: str) -> str:
    return registry.removesuffix(":443")


def _shown(text: str, limit: int = _QUOTE_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
