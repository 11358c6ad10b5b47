"""An HTTP client for one registry: ping, log in, read manifests and blobs.

Every request passes the address guard, redirects are followed here (at most
five, without the Authorization header once they leave the origin), a 429 is
retried once when its Retry-After fits, and every httpx error is translated
into our own registry errors.
"""

import asyncio
import base64
import hashlib
import hmac
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Self

import httpx
from pydantic import SecretStr

from services.backbone.settings import Settings
from services.registry.errors import (
    InsecureTransportError,
    InvalidImageError,
    MalformedResponseError,
    RegistryResponseError,
    RegistryUnreachableError,
)
from services.registry.guard import AddressGuard, GuardedTransport
from services.registry.hosts import RegistryHost, format_netloc, is_listed
from services.registry.protocol import (
    DIGEST,
    MANIFEST_ACCEPT,
    REPOSITORY,
    TAG,
    Challenge,
    digest_of,
    parse_challenges,
    parse_error_body,
    parse_retry_after,
    parse_token_response,
    select_challenge,
)

MAX_REDIRECTS = 5
MAX_RETRY_WAIT_S = 5.0
TOKEN_MARGIN_S = 10.0
_ERROR_BODY_LIMIT = 64 * 1024
_TOKEN_BODY_LIMIT = 1024 * 1024
_MANIFEST_LIMIT = 4 * 1024 * 1024
BLOB_LIMIT = 1024 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = "crabglamp/0.1"
_RAW_BYTES = {"Accept-Encoding": "identity"}


class Authorization:
    """An Authorization header value; its repr never shows the credential."""

    __slots__ = ("_value", "scheme")

    def __init__(self, scheme: str, value: str) -> None:
        self.scheme = scheme
        self._value = value

    @classmethod
    def basic(cls, username: str, secret: SecretStr) -> "Authorization":
        pair = f"{username}:{secret.get_secret_value()}".encode()
        return cls("Basic", base64.b64encode(pair).decode("ascii"))

    @classmethod
    def bearer(cls, token: str) -> "Authorization":
        return cls("Bearer", token)

    def header(self) -> str:
        return f"{self.scheme} {self._value}"

    def __repr__(self) -> str:
        return f"Authorization({self.scheme}, '**********')"


TokenKey = tuple[str, str, str, str]


class TokenCache:
    """Bearer tokens per (registry, username, secret, scope) until they expire.

    The secret is part of the key as a keyed hash, so a changed secret is never
    answered with a token the old one earned; the cache never holds the secret.
    """

    def __init__(
        self,
        *,
        margin_s: float = TOKEN_MARGIN_S,
        max_entries: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._margin_s = margin_s
        self._max_entries = max_entries
        self._clock = clock
        self._salt = os.urandom(32)
        self._entries: dict[TokenKey, tuple[str, float]] = {}

    def key(
        self, registry: str, username: str, secret: SecretStr, scope: str
    ) -> TokenKey:
        raw = secret.get_secret_value().encode()
        digest = hmac.new(self._salt, raw, hashlib.sha256).hexdigest()
        return registry, username, digest, scope

    def get(self, key: TokenKey) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._entries[key]
            return None
        return entry[0]

    def put(self, key: TokenKey, token: str, lifetime_s: float) -> None:
        usable_s = lifetime_s - self._margin_s
        if usable_s <= 0:
            return
        self._entries.pop(key, None)
        self._entries[key] = (token, self._clock() + usable_s)
        while len(self._entries) > self._max_entries:
            del self._entries[next(iter(self._entries))]

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class Manifest:
    """A manifest as the registry described it; ``body`` is empty after HEAD."""

    digest: str | None
    media_type: str | None
    size: int | None
    body: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: httpx.Headers
    body: bytes
    url: httpx.URL

    @property
    def content_type(self) -> str:
        return str(self.headers.get("content-type", ""))


class BlobStream:
    """A blob being downloaded: its announced size and its bytes as they come.

    The bytes are the blob's own, never decoded: a storage backend that labels
    a gzip layer with ``Content-Encoding: gzip`` must not have it unpacked here.
    """

    def __init__(self, response: httpx.Response, url: httpx.URL) -> None:
        self._response = response
        self._url = url

    @property
    def size(self) -> int | None:
        """The Content-Length the server announced, if any."""
        length = self._response.headers.get("content-length", "")
        return int(length) if length.isascii() and length.isdigit() else None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body in pieces; a stall longer than the time budget is an error."""
        where = _netloc(self._url)
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.TimeoutException as exc:
            raise RegistryUnreachableError(
                f"{where} stopped sending in the middle of a blob."
            ) from exc
        except httpx.TransportError as exc:
            raise RegistryUnreachableError(
                f"{where} broke off in the middle of a blob ({type(exc).__name__})."
            ) from exc


class RegistryClient:
    """Talk to one registry within a time budget (``registry_timeout_s``).

    The budget covers the client's whole life, as a check needs; with
    ``budget_per_request`` it covers each request up to its answer instead, and
    each read of a streamed blob, as a pull of large layers needs.
    """

    def __init__(
        self,
        registry: RegistryHost,
        settings: Settings,
        *,
        guard: AddressGuard | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        tokens: TokenCache | None = None,
        verify: ssl.SSLContext | bool = True,
        budget_per_request: bool = False,
    ) -> None:
        self.registry = registry
        self._insecure = list(settings.insecure_registries)
        self._guard = guard or AddressGuard.from_settings(settings)
        self._budget_s = settings.registry_timeout_s
        self._deadline = (
            None if budget_per_request else time.monotonic() + self._budget_s
        )
        self._tokens = tokens if tokens is not None else TokenCache()
        self._http = httpx.AsyncClient(
            transport=transport or GuardedTransport(self._guard, verify=verify),
            timeout=httpx.Timeout(self._budget_s),
            follow_redirects=False,
            trust_env=False,
            headers={"User-Agent": _USER_AGENT},
        )
        self._challenge: Challenge | None = None
        self._pinged = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def ping(self) -> Challenge | None:
        """GET /v2/: the challenge to answer, or None if no login is asked."""
        answer = await self._request("GET", self._url("/v2/"), None)
        self._require_registry(answer)
        self._pinged = True
        if answer.status == 200:
            self._challenge = None
            return None
        challenge = select_challenge(
            parse_challenges(answer.headers.get_list("www-authenticate"))
        )
        if challenge is None:
            raise MalformedResponseError(
                f"{self.registry.name} asks for a login at /v2/ but offers neither "
                "Basic nor Bearer authentication.",
                status=answer.status,
            )
        self._challenge = challenge
        return challenge

    async def authenticate(
        self,
        username: str,
        secret: SecretStr,
        scope: str | None = None,
        *,
        fresh: bool = False,
    ) -> Authorization:
        """Credentials for the next calls: Basic, or a Bearer token for ``scope``.

        ``fresh`` skips the token cache: proving a secret must ask the token
        service now, or a secret revoked since the last token would pass.
        """
        if not self._pinged:
            await self.ping()
        challenge = self._challenge
        if challenge is None or challenge.scheme == "basic":
            return Authorization.basic(username, secret)
        key = self._tokens.key(self.registry.name, username, secret, scope or "")
        cached = None if fresh else self._tokens.get(key)
        if cached is not None:
            return Authorization.bearer(cached)
        url = self._realm_url(challenge, scope)
        answer = await self._request(
            "GET", url, Authorization.basic(username, secret), _TOKEN_BODY_LIMIT
        )
        if answer.status != 200:
            raise self._failure(
                answer,
                f"The token service at {_netloc(url)} answered {answer.status}.",
            )
        grant = parse_token_response(answer.body, now=datetime.now(UTC))
        self._tokens.put(key, grant.token, grant.lifetime_s)
        return Authorization.bearer(grant.token)

    async def authenticate_anonymously(self, scope: str) -> Authorization | None:
        """A Bearer token for ``scope`` without credentials, or None to ask bare.

        Registries that want Basic get no header: their refusal is the answer.
        """
        if not self._pinged:
            await self.ping()
        challenge = self._challenge
        if challenge is None or challenge.scheme == "basic":
            return None
        key = self._tokens.key(self.registry.name, "", SecretStr(""), scope)
        cached = self._tokens.get(key)
        if cached is not None:
            return Authorization.bearer(cached)
        url = self._realm_url(challenge, scope)
        answer = await self._request("GET", url, None, _TOKEN_BODY_LIMIT)
        if answer.status != 200:
            raise self._failure(
                answer,
                f"The token service at {_netloc(url)} answered {answer.status}.",
            )
        grant = parse_token_response(answer.body, now=datetime.now(UTC))
        self._tokens.put(key, grant.token, grant.lifetime_s)
        return Authorization.bearer(grant.token)

    @property
    def challenge(self) -> Challenge | None:
        """The challenge /v2/ answered with, once pinged; None if it asked none."""
        return self._challenge

    async def check_login(self, auth: Authorization) -> None:
        """GET /v2/ with ``auth``: raise unless the registry answers 200."""
        answer = await self._request("GET", self._url("/v2/"), auth)
        if answer.status != 200:
            raise self._failure(
                answer, f"{self.registry.name} answered {answer.status} at /v2/."
            )

    async def head_manifest(
        self, repository: str, reference: str, auth: Authorization | None
    ) -> Manifest:
        """HEAD a manifest; on refusal, GET it to read the registry's words."""
        url = self._manifest_url(repository, reference)
        headers = {"Accept": MANIFEST_ACCEPT}
        answer = await self._request("HEAD", url, auth, 0, headers)
        if answer.status == 200:
            return _manifest(answer)
        if answer.status != 429:
            answer = await self._request("GET", url, auth, _MANIFEST_LIMIT, headers)
            if answer.status == 200:
                return _manifest(answer)
        raise self._failure(
            answer,
            f"{self.registry.name} answered {answer.status} for the manifest "
            f"{repository}:{reference}.",
        )

    async def get_manifest(
        self, repository: str, reference: str, auth: Authorization | None
    ) -> Manifest:
        """GET a manifest with all four manifest media types accepted."""
        url = self._manifest_url(repository, reference)
        headers = {"Accept": MANIFEST_ACCEPT}
        answer = await self._request("GET", url, auth, _MANIFEST_LIMIT + 1, headers)
        if answer.status != 200:
            raise self._failure(
                answer,
                f"{self.registry.name} answered {answer.status} for the manifest "
                f"{repository}:{reference}.",
            )
        if len(answer.body) > _MANIFEST_LIMIT:
            raise MalformedResponseError(
                f"The manifest {repository}:{reference} is larger than "
                f"{_MANIFEST_LIMIT // 1024 // 1024} MiB.",
                status=200,
            )
        return _manifest(answer)

    async def get_blob(
        self,
        repository: str,
        digest: str,
        auth: Authorization | None,
        limit: int = BLOB_LIMIT,
    ) -> bytes:
        """GET a small blob, following storage redirects, and check its digest."""
        url = self._blob_url(repository, digest)
        answer = await self._request("GET", url, auth, limit + 1)
        if answer.status != 200:
            raise self._failure(
                answer,
                f"{self.registry.name} answered {answer.status} for the blob "
                f"{digest} of {repository}.",
            )
        if len(answer.body) > limit:
            raise MalformedResponseError(
                f"The blob {digest} of {repository} is larger than {limit} bytes.",
                status=200,
            )
        if digest_of(answer.body, digest.partition(":")[0]) != digest:
            raise MalformedResponseError(
                f"{self.registry.name} sent content for the blob {digest} of "
                f"{repository} that does not match that digest.",
                status=200,
            )
        return answer.body

    @asynccontextmanager
    async def open_blob(
        self, repository: str, digest: str, auth: Authorization | None
    ) -> AsyncIterator[BlobStream]:
        """GET a blob of any size as a stream, following storage redirects.

        Checking the bytes against ``digest`` is the reader's job, as they pass.
        """
        url = self._blob_url(repository, digest)
        for attempt in range(2):
            final, response = await self._open(url, auth)
            if response.status_code == 200:
                break
            with self._translated(final):
                async with asyncio.timeout(max(self._remaining(), 0.0)):
                    try:
                        body = await _read(response, _ERROR_BODY_LIMIT)
                    finally:
                        await response.aclose()
            answer = _Answer(response.status_code, response.headers, body, final)
            wait = parse_retry_after(
                answer.headers.get("retry-after"), now=datetime.now(UTC)
            )
            if attempt or answer.status != 429 or not self._fits(wait):
                raise self._failure(
                    answer,
                    f"{self.registry.name} answered {answer.status} for the blob "
                    f"{digest} of {repository}.",
                )
            await asyncio.sleep(wait or 0.0)
        try:
            yield BlobStream(response, final)
        finally:
            await response.aclose()

    def _fits(self, wait: float | None) -> bool:
        """Whether a Retry-After wait is short enough to sit out."""
        return wait is not None and wait <= min(
            MAX_RETRY_WAIT_S, self._remaining() - 1.0
        )

    def _url(self, path: str) -> httpx.URL:
        return httpx.URL(self.registry.base_url + path)

    def _manifest_url(self, repository: str, reference: str) -> httpx.URL:
        if not REPOSITORY.fullmatch(repository) or len(repository) > 255:
            raise InvalidImageError(f"'{repository[:80]}' is not a repository name.")
        if not (TAG.fullmatch(reference) or DIGEST.fullmatch(reference)):
            raise InvalidImageError(f"'{reference[:80]}' is not a tag or digest.")
        return self._url(f"/v2/{repository}/manifests/{reference}")

    def _blob_url(self, repository: str, digest: str) -> httpx.URL:
        if not REPOSITORY.fullmatch(repository) or len(repository) > 255:
            raise InvalidImageError(f"'{repository[:80]}' is not a repository name.")
        if not DIGEST.fullmatch(digest):
            raise MalformedResponseError(
                f"'{digest[:80]}' is not a digest we can check.",
                status=None,
            )
        return self._url(f"/v2/{repository}/blobs/{digest}")

    def _realm_url(self, challenge: Challenge, scope: str | None) -> httpx.URL:
        realm = challenge.realm
        try:
            url = httpx.URL(realm or "")
        except httpx.InvalidURL as exc:
            raise MalformedResponseError(
                f"{self.registry.name} names a token service that is not a URL.",
                status=401,
            ) from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise MalformedResponseError(
                f"{self.registry.name} names no usable token service (realm).",
                status=401,
            )
        params = {
            name: value
            for name, value in (("service", challenge.service), ("scope", scope))
            if value
        }
        return url.copy_merge_params(params)

    def _require_registry(self, answer: _Answer) -> None:
        """Tell a registry's /v2/ answer from a web page or another service."""
        status, headers = answer.status, answer.headers
        speaks_api = "docker-distribution-api-version" in headers
        is_html = parse_error_body(status, answer.content_type, answer.body).is_html
        if status == 200 and (speaks_api or not is_html):
            return
        if status == 401 and (speaks_api or "www-authenticate" in headers):
            return
        if status == 429 or status >= 500 or speaks_api:
            raise self._failure(
                answer, f"{self.registry.name} answered {status} at /v2/."
            )
        raise RegistryUnreachableError(
            f"{self.registry.netloc} is not a container registry: it answers "
            f"{status} at /v2/ without the registry API."
        )

    def _failure(self, answer: _Answer, detail: str) -> RegistryResponseError:
        failure = parse_error_body(answer.status, answer.content_type, answer.body)
        return RegistryResponseError(
            detail,
            status=answer.status,
            registry_code=failure.code,
            registry_message=failure.message,
            challenge_error=_challenge_error(answer.headers),
            retry_after_s=parse_retry_after(
                answer.headers.get("retry-after"), now=datetime.now(UTC)
            ),
        )

    async def _request(
        self,
        method: str,
        url: httpx.URL,
        auth: Authorization | None,
        limit: int = _ERROR_BODY_LIMIT,
        headers: Mapping[str, str] | None = None,
    ) -> _Answer:
        """Send, following redirects, and retry one 429 whose wait fits."""
        answer = await self._follow(method, url, auth, limit, headers)
        if answer.status != 429:
            return answer
        wait = parse_retry_after(
            answer.headers.get("retry-after"), now=datetime.now(UTC)
        )
        if wait is None or not self._fits(wait):
            return answer
        await asyncio.sleep(wait)
        return await self._follow(method, url, auth, limit, headers)

    async def _follow(
        self,
        method: str,
        url: httpx.URL,
        auth: Authorization | None,
        limit: int,
        headers: Mapping[str, str] | None,
    ) -> _Answer:
        for _ in range(MAX_REDIRECTS + 1):
            answer = await self._send(method, url, auth, limit, headers)
            location = answer.headers.get("location")
            if answer.status not in _REDIRECTS or location is None:
                return answer
            url, auth = _redirect(url, location, answer.status, auth)
            if answer.status == 303 and method != "HEAD":
                method = "GET"
        raise MalformedResponseError(
            f"{self.registry.name} redirected more than {MAX_REDIRECTS} times.",
            status=answer.status,
        )

    async def _send(
        self,
        method: str,
        url: httpx.URL,
        auth: Authorization | None,
        limit: int,
        headers: Mapping[str, str] | None,
    ) -> _Answer:
        self._require_transport(url)
        request = self._http.build_request(method, url, headers=headers)
        if auth is not None:
            request.headers["Authorization"] = auth.header()
        with self._translated(url):
            async with asyncio.timeout(max(self._remaining(), 0.0)):
                await self._guard.check_url(url)
                response = await self._http.send(request, stream=True)
                try:
                    body = await _read(response, limit)
                finally:
                    await response.aclose()
        return _Answer(response.status_code, response.headers, body, url)

    async def _open(
        self, url: httpx.URL, auth: Authorization | None
    ) -> tuple[httpx.URL, httpx.Response]:
        """GET ``url`` following redirects; the final response's body is unread."""
        for _ in range(MAX_REDIRECTS + 1):
            self._require_transport(url)
            request = self._http.build_request("GET", url, headers=_RAW_BYTES)
            if auth is not None:
                request.headers["Authorization"] = auth.header()
            with self._translated(url):
                async with asyncio.timeout(max(self._remaining(), 0.0)):
                    await self._guard.check_url(url)
                    response = await self._http.send(request, stream=True)
            location = response.headers.get("location")
            if response.status_code not in _REDIRECTS or location is None:
                return url, response
            await response.aclose()
            url, auth = _redirect(url, location, response.status_code, auth)
        raise MalformedResponseError(
            f"{self.registry.name} redirected more than {MAX_REDIRECTS} times.",
            status=response.status_code,
        )

    @contextmanager
    def _translated(self, url: httpx.URL) -> Iterator[None]:
        """Turn httpx's and asyncio's failures into ``RegistryUnreachableError``."""
        try:
            yield
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise RegistryUnreachableError(
                f"{_netloc(url)} did not answer within {self._budget_s:g} s."
            ) from exc
        except httpx.ConnectError as exc:
            raise _connect_failure(url, exc) from exc
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise RegistryUnreachableError(
                f"{_netloc(url)} broke off the exchange or does not speak HTTP "
                f"({type(exc).__name__})."
            ) from exc

    def _require_transport(self, url: httpx.URL) -> None:
        """Plain http only to hosts listed in ``insecure_registries``."""
        if url.scheme == "https":
            return
        if is_listed(url.host, url.port, self._insecure, any_port=True):
            return
        raise InsecureTransportError(
            f"{self.registry.name} sends us to {_netloc(url)} over plain http; "
            "list that host in insecure_registries if that is intended."
        )

    def _remaining(self) -> float:
        if self._deadline is None:
            return self._budget_s
        return self._deadline - time.monotonic()


async def _read(response: httpx.Response, limit: int) -> bytes:
    if limit <= 0:
        return b""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


def _manifest(answer: _Answer) -> Manifest:
    length = answer.headers.get("content-length", "")
    return Manifest(
        digest=answer.headers.get("docker-content-digest"),
        media_type=answer.content_type.split(";")[0].strip() or None,
        size=int(length) if length.isascii() and length.isdigit() else None,
        body=answer.body,
    )


def _challenge_error(headers: httpx.Headers) -> str | None:
    try:
        challenges = parse_challenges(headers.get_list("www-authenticate"))
    except MalformedResponseError:
        return None
    return next((c.error for c in challenges if c.error), None)


def _connect_failure(url: httpx.URL, exc: httpx.ConnectError) -> Exception:
    where = _netloc(url)
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return RegistryUnreachableError(
                f"The TLS certificate of {where} is not trusted "
                f"({cause.verify_message})."
            )
        if isinstance(cause, ssl.SSLError):
            return RegistryUnreachableError(
                f"The TLS handshake with {where} failed ({cause.reason}); if the "
                "registry serves plain http, list it in insecure_registries."
            )
        if isinstance(cause, ConnectionRefusedError):
            break
        cause = cause.__cause__ or cause.__context__
    reason = "connection refused" if cause is not None else "connection failed"
    return RegistryUnreachableError(f"Could not connect to {where} ({reason}).")


def _redirect(
    url: httpx.URL, location: str, status: int, auth: Authorization | None
) -> tuple[httpx.URL, Authorization | None]:
    """Where a redirect leads, and the Authorization that may go there."""
    try:
        target = url.join(location)
    except httpx.InvalidURL as exc:
        raise MalformedResponseError(
            f"{_netloc(url)} redirected to something that is not a URL.",
            status=status,
        ) from exc
    if target.scheme not in ("http", "https"):
        raise MalformedResponseError(
            f"{_netloc(url)} redirected to a {target.scheme} URL.", status=status
        )
    return target, auth if _origin(target) == _origin(url) else None


def _netloc(url: httpx.URL) -> str:
    return format_netloc(url.host, url.port)


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port
