"""What registries say on the wire, read defensively: no I/O here."""

import email.utils
import hashlib
import html
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import NoReturn

from services.registry.errors import MalformedResponseError

MANIFEST_MEDIA_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
MANIFEST_ACCEPT = ", ".join(MANIFEST_MEDIA_TYPES)

REPOSITORY = re.compile(
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*",
    re.ASCII,
)
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", re.ASCII)
DIGEST = re.compile(r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}", re.ASCII)

DIGEST_ALGORITHMS = frozenset({"sha256", "sha512"})

DEFAULT_TOKEN_LIFETIME_S = 60.0
_BEARER_TOKEN = re.compile(r"[\x21-\x7e]+", re.ASCII)
_MESSAGE_LIMIT = 300
_TCHAR = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
_SPACE = " \t"


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    """``algorithm:hex`` of ``data``, for sha256 or sha512."""
    if algorithm not in DIGEST_ALGORITHMS:
        raise ValueError(f"unsupported digest algorithm {algorithm[:20]!r}")
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: a scheme and its parameters."""

    scheme: str
    params: Mapping[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")

    @property
    def service(self) -> str | None:
        return self.params.get("service")

    @property
    def scope(self) -> str | None:
        return self.params.get("scope")

    @property
    def error(self) -> str | None:
        return self.params.get("error")


def parse_challenges(values: Iterable[str]) -> list[Challenge]:
    """Parse every challenge in one or more ``WWW-Authenticate`` values (RFC 9110).

    Raise ``MalformedResponseError`` for text the grammar does not allow.
    """
    found: list[Challenge] = []
    for value in values:
        found.extend(_ChallengeReader(value).read())
    return found


def select_challenge(challenges: Iterable[Challenge]) -> Challenge | None:
    """The challenge to answer: Bearer if offered, else Basic, else None."""
    offered = {challenge.scheme: challenge for challenge in reversed(list(challenges))}
    return offered.get("bearer") or offered.get("basic")


class _ChallengeReader:
    def __init__(self, text: str) -> None:
        self._text = text
        self._pos = 0

    def read(self) -> list[Challenge]:
        challenges: list[Challenge] = []
        while True:
            self._skip(_SPACE + ",")
            if self._at_end():
                return challenges
            scheme = self._token()
            if not scheme:
                self._fail("a challenge must start with an authentication scheme")
            challenges.append(Challenge(scheme.lower(), self._params()))

    def _params(self) -> dict[str, str]:
        params: dict[str, str] = {}
        self._skip(_SPACE)
        if self._token68():
            return params
        while not self._at_end():
            start = self._pos
            name = self._token()
            self._skip(_SPACE)
            if not name or self._peek() != "=":
                # Not a parameter: the next challenge starts here.
                self._pos = start
                return params
            self._pos += 1
            self._skip(_SPACE)
            value = self._quoted() if self._peek() == '"' else self._bare()
            params[name.lower()] = value
            self._skip(_SPACE)
            if self._at_end():
                return params
            if self._peek() != ",":
                self._fail(f"expected ',' after parameter {name!r}")
            self._skip(_SPACE + ",")
        return params

    def _token68(self) -> bool:
        start = self._pos
        while self._peek() and (self._peek().isalnum() or self._peek() in "-._~+/"):
            self._pos += 1
        if self._pos > start:
            self._skip("=")
            self._skip(_SPACE)
            if self._at_end() or self._peek() == ",":
                return True
        self._pos = start
        return False

    def _bare(self) -> str:
        start = self._pos
        while self._peek() and self._peek() not in _SPACE + ",":
            self._pos += 1
        return self._text[start : self._pos]

    def _token(self) -> str:
        start = self._pos
        while self._peek() and self._peek() in _TCHAR:
            self._pos += 1
        return self._text[start : self._pos]

    def _quoted(self) -> str:
        self._pos += 1
        chars: list[str] = []
        while not self._at_end():
            ch = self._text[self._pos]
            if ch == '"':
                self._pos += 1
                return "".join(chars)
            if ch == "\\" and self._pos + 1 < len(self._text):
                self._pos += 1
                ch = self._text[self._pos]
            chars.append(ch)
            self._pos += 1
        self._fail("a quoted string is not closed")

    def _skip(self, chars: str) -> None:
        while self._peek() and self._peek() in chars:
            self._pos += 1

    def _peek(self) -> str:
        return self._text[self._pos] if self._pos < len(self._text) else ""

    def _at_end(self) -> bool:
        return self._pos >= len(self._text)

    def _fail(self, why: str) -> NoReturn:
        raise MalformedResponseError(
            f"The registry sent a WWW-Authenticate header that cannot be read: {why}.",
            status=None,
        )


@dataclass(frozen=True)
class RegistryFailure:
    """A registry's error answer in its own words, as far as they could be read."""

    status: int
    code: str | None = None
    message: str | None = None
    is_html: bool = False


def parse_error_body(status: int, content_type: str, body: bytes) -> RegistryFailure:
    """Read an error body: distribution JSON, OAuth-style JSON, HTML or text."""
    text = body.decode("utf-8", errors="replace").strip()
    if not text:
        return RegistryFailure(status)
    if text.startswith(("{", "[")):
        found = _json_failure(text)
        if found is not None:
            return RegistryFailure(status, found[0], found[1])
    if "html" in content_type.lower() or looks_like_html(text):
        title = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
        message = clean_text(html.unescape(title.group(1))) if title else None
        return RegistryFailure(status, None, message or "an HTML page", is_html=True)
    return RegistryFailure(status, None, clean_text(text))


def looks_like_html(text: str) -> bool:
    head = text[:512].lstrip().lower()
    return head.startswith(("<!doctype html", "<html", "<head", "<body"))


def _json_failure(text: str) -> tuple[str | None, str | None] | None:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    errors = data.get("errors")
    if isinstance(errors, list):
        entries = [entry for entry in errors if isinstance(entry, dict)]
        if entries:
            code = _string(entries[0].get("code"))
            messages = [_string(entry.get("message")) for entry in entries]
            joined = "; ".join(message for message in messages if message)
            return code, clean_text(joined) or None
    message = next(
        (
            _string(data.get(key))
            for key in ("details", "error_description", "message", "detail")
            if _string(data.get(key))
        ),
        None,
    )
    code = _string(data.get("error")) or _string(data.get("code"))
    if message is None and code is None:
        return None
    return code, clean_text(message) if message else None


def _string(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def clean_text(text: str, limit: int = _MESSAGE_LIMIT) -> str:
    """One line without control characters or tags, at most ``limit`` long."""
    text = re.sub(r"<[^>]{0,200}>", " ", text) if "<" in text else text
    printable = "".join(ch if ch.isprintable() else " " for ch in text)
    line = " ".join(printable.split())
    if len(line) > limit:
        line = line[: limit - 1].rstrip() + "…"
    return line


def parse_retry_after(value: str | None, *, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (seconds or HTTP date)."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


@dataclass(frozen=True)
class TokenGrant:
    """A bearer token and how many seconds from now it stays valid."""

    token: str = field(repr=False)
    lifetime_s: float


def parse_token_response(body: bytes, *, now: datetime) -> TokenGrant:
    """Read a token service's answer: ``token`` or ``access_token``, and expiry."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        raise MalformedResponseError(
            "The token service answered 200 without a JSON object.", status=200
        )
    token = _string(data.get("token")) or _string(data.get("access_token"))
    if token is None:
        raise MalformedResponseError(
            "The token service answered 200 without a token.", status=200
        )
    if not _BEARER_TOKEN.fullmatch(token):
        raise MalformedResponseError(
            "The token service answered a token that cannot be sent in a header.",
            status=200,
        )
    expires_in = data.get("expires_in")
    lifetime = DEFAULT_TOKEN_LIFETIME_S
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
        lifetime = max(float(expires_in), DEFAULT_TOKEN_LIFETIME_S)
    issued_at = _timestamp(data.get("issued_at"))
    if issued_at is not None:
        left = (issued_at + timedelta(seconds=lifetime) - now).total_seconds()
        lifetime = min(lifetime, left)
    return TokenGrant(token=token, lifetime_s=lifetime)


def _timestamp(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
