"""Registry hosts as a user types them, and what we know about well-known ones."""

import ipaddress
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from services.registry.errors import InvalidRegistryError

DOCKER_HUB_NAME = "docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
_DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

_MAX_HOST = 253
_MAX_LABEL = 63
_MAX_INPUT = 300
_LABEL = re.compile(r"[a-z0-9-]+", re.ASCII)
_DIGITS = re.compile(r"[0-9]+", re.ASCII)
_ECR = re.compile(
    r"[0-9]{12}\.dkr\.ecr(-fips)?\.[a-z0-9-]+\.amazonaws\.com(\.cn)?", re.ASCII
)


class RegistryKind(StrEnum):
    """Registries whose login rules we can explain specifically."""

    DOCKER_HUB = "docker_hub"
    GHCR = "ghcr"
    GITLAB = "gitlab"
    GOOGLE = "google"
    ECR = "ecr"
    GENERIC = "generic"


_ADVICE = {
    RegistryKind.DOCKER_HUB: (
        "Docker Hub needs your Docker ID and a personal access token or password."
    ),
    RegistryKind.GHCR: (
        "GitHub needs a classic personal access token with read:packages; "
        "fine-grained tokens do not work with ghcr.io."
    ),
    RegistryKind.GITLAB: (
        "GitLab needs a personal, project or deploy token with read_registry."
    ),
    RegistryKind.GOOGLE: (
        "Google Artifact Registry needs the username _json_key with a "
        "service-account JSON key as the secret (or _json_key_base64 with the "
        "key in base64), for an account with the Artifact Registry Reader role."
    ),
    RegistryKind.ECR: (
        "Amazon ECR needs the username AWS and the output of "
        "'aws ecr get-login-password' as the secret; that token lasts 12 hours."
    ),
    RegistryKind.GENERIC: "",
}


@dataclass(frozen=True)
class RegistryHost:
    """A registry, normalised: the name we show and the host we call."""

    name: str
    host: str
    port: int | None
    kind: RegistryKind
    secure: bool = True

    @property
    def scheme(self) -> str:
        return "https" if self.secure else "http"

    @property
    def netloc(self) -> str:
        return format_netloc(self.host, self.port)

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.netloc}"

    @property
    def advice(self) -> str:
        """What a login for this registry needs, or "" when we know nothing."""
        return _ADVICE[self.kind]


def format_netloc(host: str, port: int | None) -> str:
    """``host[:port]``, with an IPv6 address in brackets."""
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None else f"{shown}:{port}"


def parse_registry(text: str, *, insecure: Iterable[str] = ()) -> RegistryHost:
    """Parse a registry host as typed; raise ``InvalidRegistryError`` saying why."""
    host, port = split_host_port(text)
    kind = _kind(host) if port in (None, 443) else RegistryKind.GENERIC
    if kind is not RegistryKind.GENERIC:
        port = None
    name, api_host = format_netloc(host, port), host
    if kind is RegistryKind.DOCKER_HUB:
        name, api_host = DOCKER_HUB_NAME, DOCKER_HUB_API_HOST
    entries = list(insecure)
    secure = not (is_listed(host, port, entries) or is_listed(api_host, port, entries))
    return RegistryHost(name=name, host=api_host, port=port, kind=kind, secure=secure)


def is_listed(
    host: str, port: int | None, entries: Iterable[str], *, any_port: bool = False
) -> bool:
    """Whether ``host[:port]`` is named by one of ``entries`` (host or host:port).

    An entry without a port covers every port of its host; ``any_port`` makes an
    entry with a port cover the other ports of its host too.
    """
    for entry in entries:
        try:
            entry_host, entry_port = split_host_port(entry.strip())
        except InvalidRegistryError:
            continue
        if entry_host != host:
            continue
        if any_port or entry_port is None or entry_port == port:
            return True
    return False


def split_host_port(text: str) -> tuple[str, int | None]:
    """Validate ``host[:port]`` and return the lower-case host and the port."""
    _check_characters(text)
    if text.startswith("["):
        return _split_bracketed(text)
    if text.count(":") > 1:
        if _is_ipv6(text):
            raise InvalidRegistryError(
                "Put an IPv6 address in brackets, as in '[::1]:5000'."
            )
        raise InvalidRegistryError(
            "The registry host has more than one ':'; write it as host:port."
        )
    host, colon, port_text = text.partition(":")
    port = _parse_port(port_text) if colon else None
    return _check_hostname(host), port


def _check_characters(text: str) -> None:
    if not text:
        raise InvalidRegistryError(
            "The registry host is empty; give one such as 'ghcr.io' or "
            "'registry.example:5000'."
        )
    if len(text) > _MAX_INPUT:
        raise InvalidRegistryError(
            f"The registry host is {len(text)} characters long; a host name has "
            f"at most {_MAX_HOST} characters."
        )
    if any(ch.isspace() or unicodedata.category(ch).startswith("C") for ch in text):
        raise InvalidRegistryError(
            "The registry host contains a space or a control character; give "
            "only the host, such as 'ghcr.io'."
        )
    if "@" in text:
        raise InvalidRegistryError(
            "The registry host contains a username ('user@'); give only the "
            "host and put the username in the username field."
        )
    scheme, sep, _ = text.partition("://")
    if sep:
        shown = scheme[:16]
        raise InvalidRegistryError(
            f"Give the registry host without '{shown}://': for example "
            "'ghcr.io', not 'https://ghcr.io'."
        )
    if any(ch in text for ch in "/?#"):
        raise InvalidRegistryError(
            "A registry host has no path: give the host, such as 'ghcr.io', and "
            "put the repository, such as 'team/app', in the image reference."
        )


def _split_bracketed(text: str) -> tuple[str, int | None]:
    close = text.find("]")
    if close == -1:
        raise InvalidRegistryError("The IPv6 address is missing its closing ']'.")
    inside, rest = text[1:close], text[close + 1 :]
    if "%" in inside:
        raise InvalidRegistryError(
            "An IPv6 address with a zone ('%...') cannot name a registry."
        )
    try:
        address = ipaddress.IPv6Address(inside)
    except ValueError:
        raise InvalidRegistryError(
            f"'[{inside[:45]}]' is not a valid IPv6 address."
        ) from None
    if rest and not rest.startswith(":"):
        raise InvalidRegistryError(
            "Only a port can follow the IPv6 address, as in '[::1]:5000'."
        )
    port = _parse_port(rest[1:]) if rest else None
    return address.compressed, port


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _parse_port(text: str) -> int:
    if not text:
        raise InvalidRegistryError("The port after ':' is missing.")
    if not _DIGITS.fullmatch(text):
        raise InvalidRegistryError(f"The port '{text[:12]}' is not a number.")
    port = int(text[:6]) if len(text) <= 6 else 65536
    if not 1 <= port <= 65535:
        raise InvalidRegistryError(
            f"The port {text[:12]} is outside the range 1 to 65535."
        )
    return port


def _check_hostname(host: str) -> str:
    if not host:
        raise InvalidRegistryError("The host name is missing before the port.")
    if not host.isascii():
        raise InvalidRegistryError(
            "The host name has characters outside ASCII; write an international "
            "domain name in its 'xn--' form."
        )
    host = host.lower()
    if host.endswith(".") and len(host) > 1:
        host = host[:-1]
    if len(host) > _MAX_HOST:
        raise InvalidRegistryError(
            f"The host name is {len(host)} characters long; the limit is {_MAX_HOST}."
        )
    labels = host.split(".")
    if all(_DIGITS.fullmatch(label) for label in labels):
        return _check_ipv4(host)
    for label in labels:
        _check_label(label)
    if _DIGITS.fullmatch(labels[-1]):
        raise InvalidRegistryError(
            f"The last label '{labels[-1]}' of a host name cannot be all digits."
        )
    return host


def _check_ipv4(host: str) -> str:
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        raise InvalidRegistryError(
            f"'{host[:40]}' is not a valid IPv4 address."
        ) from None


def _check_label(label: str) -> None:
    if not label:
        raise InvalidRegistryError(
            "The host name has an empty label: two dots in a row, or a dot at "
            "the start."
        )
    if len(label) > _MAX_LABEL:
        raise InvalidRegistryError(
            f"The label '{label[:20]}...' is {len(label)} characters long; a "
            f"label has at most {_MAX_LABEL}."
        )
    if not _LABEL.fullmatch(label):
        bad = next(ch for ch in label if not _LABEL.fullmatch(ch))
        raise InvalidRegistryError(
            f"The host name contains {bad!r}; only letters, digits, hyphens and "
            "dots are allowed."
        )
    if label.startswith("-") or label.endswith("-"):
        raise InvalidRegistryError(
            f"The label '{label}' starts or ends with a hyphen, which a host "
            "name does not allow."
        )


def _kind(host: str) -> RegistryKind:
    if host in _DOCKER_HUB_HOSTS:
        return RegistryKind.DOCKER_HUB
    if host == "ghcr.io":
        return RegistryKind.GHCR
    if host == "registry.gitlab.com":
        return RegistryKind.GITLAB
    if host == "gcr.io" or host.endswith((".gcr.io", "-docker.pkg.dev")):
        return RegistryKind.GOOGLE
    if _ECR.fullmatch(host):
        return RegistryKind.ECR
    return RegistryKind.GENERIC
