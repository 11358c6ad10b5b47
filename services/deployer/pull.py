"""Pull an image for linux/amd64 into a content-addressed blob cache.

Every blob is checked against its digest while it streams in, and enters the
cache only whole and correct, so a redeploy, or a second App that shares base
layers, fetches only the blobs it does not have yet.
"""

import asyncio
import hashlib
import os
import tempfile
import time
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
from pydantic import SecretStr

from contracts.errors import ErrorCode, RegistryError
from contracts.references import ImageReference, InvalidReferenceError, parse_reference
from contracts.replies import ImageConfig
from services.backbone.settings import Settings
from services.registry.client import Authorization, Manifest, RegistryClient, TokenCache
from services.registry.errors import (
    InvalidRegistryError,
    MalformedResponseError,
    RegistryAccessError,
    RegistryResponseError,
    RegistryUnreachableError,
)
from services.registry.guard import AddressGuard
from services.registry.hosts import RegistryHost, RegistryKind, parse_registry
from services.registry.manifests import (
    Descriptor,
    ImageIndex,
    ImageManifest,
    pin_digest,
    platform_manifest,
    read_config,
    read_manifest,
)
from services.registry.protocol import DIGEST
from services.registry.refusals import (
    Redactor,
    failure_advice,
    ghcr_not_found,
    registry_error,
)

GZIP, ZSTD, UNCOMPRESSED = "gzip", "zstd", "none"
LAYER_COMPRESSION = {
    "application/vnd.oci.image.layer.v1.tar": UNCOMPRESSED,
    "application/vnd.oci.image.layer.v1.tar+gzip": GZIP,
    "application/vnd.oci.image.layer.v1.tar+zstd": ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar": UNCOMPRESSED,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": ZSTD,
    "application/vnd.docker.image.rootfs.diff.tar": UNCOMPRESSED,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": GZIP,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": GZIP,
}

UPDATE_CREDENTIAL = "update the credential under Registry credentials, then redeploy"
_REFUSED = (401, 403)
_CONFIG_LIMIT = 8 * 1024 * 1024
_PARTIAL = ".partial-"
_STALE_PARTIAL_S = 3600.0
_BLOB_ATTEMPTS = 2

Progress = Callable[[int, int], None]


class PullError(Exception):
    """Root of the pull's errors: what a failed deploy reports, never a secret."""

    def __init__(
        self,
        code: ErrorCode,
        detail: str,
        registry_error: RegistryError | None = None,
    ) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.registry_error = registry_error


class CorruptBlobError(PullError):
    """Bytes received for a blob do not match its digest or its size."""

    def __init__(self, detail: str) -> None:
        super().__init__("registry_error", detail)


@dataclass(frozen=True)
class Layer:
    """One layer of the pulled image, verified and stored at ``path``."""

    digest: str
    media_type: str
    size: int
    path: Path

    @property
    def compression(self) -> str:
        """``gzip``, ``zstd`` or ``none``."""
        return LAYER_COMPRESSION[self.media_type]


@dataclass(frozen=True)
class PulledImage:
    """A pulled image: pinned, runnable on linux/amd64, every blob in the cache.

    ``bytes_total`` counts the config and the distinct layers; ``bytes_fetched``
    is the part of it downloaded by this pull. Manifests are always read again,
    since tags move, and are not counted.
    """

    reference: str
    digest: str
    platform_digest: str
    config: ImageConfig
    layers: list[Layer]
    bytes_fetched: int
    bytes_total: int


class BlobCache:
    """Blobs by digest under ``root/<algorithm>/<hex>``, only ever whole.

    A write streams into a private temporary file next to its final place,
    hashing as it goes, and is renamed into place only when complete and
    matching its digest. Writers of the same blob, in this process or others,
    each rename a correct copy, so whichever lands last is still correct.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._discard_stale_partials()

    def path(self, digest: str) -> Path:
        """Where the blob ``digest`` lives; raise ``ValueError`` for a non-digest."""
        if not DIGEST.fullmatch(digest):
            raise ValueError(f"{digest[:80]!r} is not a sha256 or sha512 digest")
        algorithm, _, encoded = digest.partition(":")
        return self.root / algorithm / encoded

    def has(self, digest: str) -> bool:
        """Whether the blob is in the cache (it is then complete and verified)."""
        return self.path(digest).is_file()

    @asynccontextmanager
    async def claim(self, digest: str) -> AsyncIterator[None]:
        """Hold ``digest`` so that one pull in this process downloads it at a time."""
        lock = self._locks.get(digest)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[digest] = lock
        async with lock:
            yield

    async def store(
        self, digest: str, chunks: AsyncIterable[bytes], *, size: int | None = None
    ) -> int:
        """Stream a blob in, verify it, and put it in place; return its size."""
        final = self.path(digest)
        hasher = hashlib.new(digest.partition(":")[0])
        written = 0
        temp = self._temporary(final)
        try:
            with temp.open("wb") as out:
                async for chunk in chunks:
                    written += len(chunk)
                    if size is not None and written > size:
                        raise CorruptBlobError(
                            f"The blob {digest} is larger than the {size} bytes "
                            "its manifest gives."
                        )
                    hasher.update(chunk)
                    out.write(chunk)
                out.flush()
                await asyncio.to_thread(os.fsync, out.fileno())
            self._commit(temp, final, digest, hasher.hexdigest(), written, size)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return written

    def store_bytes(self, digest: str, data: bytes) -> None:
        """Verify a small blob already in memory and put it in place."""
        final = self.path(digest)
        hasher = hashlib.new(digest.partition(":")[0], data)
        temp = self._temporary(final)
        try:
            with temp.open("wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            self._commit(temp, final, digest, hasher.hexdigest(), len(data), None)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def _temporary(self, final: Path) -> Path:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=_PARTIAL, dir=final.parent)
        os.close(fd)
        return Path(name)

    def _commit(
        self,
        temp: Path,
        final: Path,
        digest: str,
        hexdigest: str,
        written: int,
        size: int | None,
    ) -> None:
        if size is not None and written != size:
            raise CorruptBlobError(
                f"The blob {digest} ended after {written} of its {size} bytes."
            )
        if hexdigest != digest.partition(":")[2]:
            raise CorruptBlobError(
                f"The content received for the blob {digest} does not match that "
                "digest."
            )
        temp.chmod(0o444)
        os.replace(temp, final)

    def _discard_stale_partials(self) -> None:
        """Remove what writers killed mid-download left behind long ago."""
        cutoff = time.time() - _STALE_PARTIAL_S
        for partial in self.root.glob(f"*/{_PARTIAL}*"):
            with suppress(OSError):
                if partial.stat().st_mtime < cutoff:
                    partial.unlink()


class ImagePuller:
    """Pulls images for App VMs with a credential's current secret."""

    def __init__(
        self,
        settings: Settings,
        cache: BlobCache,
        *,
        guard: AddressGuard | None = None,
        tokens: TokenCache | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        concurrency: int = 4,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.settings = settings
        self.cache = cache
        self.concurrency = concurrency
        self._guard = guard or AddressGuard.from_settings(settings)
        self._tokens = tokens if tokens is not None else TokenCache()
        self._transport = transport

    async def pull(
        self,
        image: str,
        username: str | None,
        secret: SecretStr | None,
        *,
        progress: Progress | None = None,
    ) -> PulledImage:
        """Pull ``image`` for linux/amd64, or raise ``PullError`` saying why not.

        ``progress(done, total)`` hears the blob bytes present so far, cached
        ones included, as they arrive.
        """
        redactor = Redactor(username, secret)
        try:
            reference = parse_reference(image)
        except InvalidReferenceError as exc:
            raise _redacted(
                PullError("invalid_image_reference", exc.detail), redactor
            ) from exc
        if (username is None) != (secret is None):
            raise PullError(
                "invalid_request",
                "Give both a username and a secret, or neither for an anonymous pull.",
            )
        try:
            registry = parse_registry(
                reference.registry, insecure=self.settings.insecure_registries
            )
        except InvalidRegistryError as exc:
            error = PullError(
                "invalid_image_reference",
                f"The image's registry cannot be used: {exc.detail}",
            )
            raise _redacted(error, redactor) from exc
        try:
            async with RegistryClient(
                registry,
                self.settings,
                guard=self._guard,
                transport=self._transport,
                tokens=self._tokens,
                budget_per_request=True,
            ) as client:
                login = _Login(username, secret)
                return await _Pull(self, client, reference, login, progress).run()
        except PullError as exc:
            raise _redacted(_with_registry(exc, registry), redactor) from exc
        except RegistryResponseError as exc:
            advice = failure_advice(registry, exc)
            found = registry_error(exc, exc.code, registry, advice)
            error = PullError("registry_error", advice, found)
            raise _redacted(error, redactor) from exc
        except RegistryAccessError as exc:
            error = _with_registry(PullError(exc.code, exc.detail), registry)
            raise _redacted(error, redactor) from exc


@dataclass(frozen=True)
class _Login:
    username: str | None
    secret: SecretStr | None


class _Pull:
    """One pull of one image from one registry."""

    def __init__(
        self,
        puller: ImagePuller,
        client: RegistryClient,
        reference: ImageReference,
        login: _Login,
        progress: Progress | None,
    ) -> None:
        self.cache = puller.cache
        self.concurrency = puller.concurrency
        self.client = client
        self.registry = client.registry
        self.reference = reference
        self.login = login
        self.progress = progress
        self.done = 0
        self.total = 0
        self._logged_in = False

    async def run(self) -> PulledImage:
        reference = self.reference
        # Fail on a refused login before anything else is asked.
        await self._authorize()

        # Pinned from the bytes received, so the digest is what gets deployed.
        top = await self._manifest(reference.manifest_reference, listed=False)
        digest = pin_digest(top.body, top.digest, reference.digest)
        document = read_manifest(top.media_type, top.body)
        if isinstance(document, ImageIndex):
            entry = document.for_app_vms()
            if entry is None:
                raise self._unsupported(document.platforms())
            manifest = await self._platform_manifest(entry)
            platform_digest, claimed = entry.digest, entry.platform
        else:
            manifest, platform_digest, claimed = document, digest, None

        # Tags move: the config, not the tag's history, says what runs here.
        config_size, config_body, fetched = await self._config(manifest.config)
        platform, config = read_config(config_body)
        if platform is None and claimed is None:
            raise MalformedResponseError(
                "The image config does not name its platform (os and architecture).",
                status=200,
            )
        if platform is not None and not platform.runs_on_app_vms:
            raise self._unsupported([str(platform)])
        layers = [self._layer(descriptor) for descriptor in manifest.layers]
        distinct = list({layer.digest: layer for layer in layers}.values())

        # Layers in parallel, bounded, each verified on its way into the cache.
        missing = [layer for layer in distinct if not self.cache.has(layer.digest)]
        self.total = config_size + sum(layer.size for layer in distinct)
        self.done = self.total - sum(layer.size for layer in missing)
        self._report()
        fetched += await self._fetch_all(missing)
        return PulledImage(
            reference=str(reference),
            digest=digest,
            platform_digest=platform_digest,
            config=config,
            layers=layers,
            bytes_fetched=fetched,
            bytes_total=self.total,
        )

    def _layer(self, descriptor: Descriptor) -> Layer:
        """A layer to fetch, refused now if it could never be unpacked."""
        media_type, size = descriptor.media_type, descriptor.size
        if media_type is None or size is None:
            raise MalformedResponseError(
                f"The layer {descriptor.digest} has no media type or no size in "
                "its manifest.",
                status=200,
            )
        compression = LAYER_COMPRESSION.get(media_type)
        if compression is None:
            raise self._error(
                "platform_not_supported",
                f"{self.reference.familiar} has a layer of type {media_type[:100]!r}, "
                "which is not a container file system layer: App VMs run OCI or "
                "Docker container images.",
            )
        path = self.cache.path(descriptor.digest)
        return Layer(descriptor.digest, media_type, size, path)

    async def _config(self, descriptor: Descriptor) -> tuple[int, bytes, int]:
        """The config blob's size and bytes, and how many of them were fetched."""
        digest = descriptor.digest
        if descriptor.size is not None and descriptor.size > _CONFIG_LIMIT:
            raise MalformedResponseError(
                f"The image config {digest} is larger than "
                f"{_CONFIG_LIMIT // 1024 // 1024} MiB.",
                status=200,
            )
        async with self.cache.claim(digest):
            if self.cache.has(digest):
                body = self.cache.path(digest).read_bytes()
                return len(body), body, 0
            repository = self.reference.repository
            auth = await self._authorize()
            try:
                body = await self.client.get_blob(
                    repository, digest, auth, _CONFIG_LIMIT
                )
            except RegistryResponseError as exc:
                refusal = await self._refusal(exc, f"the config blob {digest}")
                if refusal is None:
                    raise
                raise refusal from exc
            self.cache.store_bytes(digest, body)
        return len(body), body, len(body)

    async def _fetch_all(self, layers: list[Layer]) -> int:
        """Fetch every layer not cached yet; stop them all at the first failure."""
        slots = asyncio.Semaphore(self.concurrency)
        tasks = [asyncio.create_task(self._fetch(layer, slots)) for layer in layers]
        try:
            fetched = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return sum(fetched)

    async def _fetch(self, layer: Layer, slots: asyncio.Semaphore) -> int:
        async with self.cache.claim(layer.digest):
            if self.cache.has(layer.digest):
                # Another pull in this process brought it in meanwhile.
                self.done += layer.size
                self._report()
                return 0
            async with slots:
                return await self._download(layer)

    async def _download(self, layer: Layer) -> int:
        """One layer into the cache; a broken connection is tried once more."""
        for attempt in range(_BLOB_ATTEMPTS):
            received = 0

            async def counted(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
                nonlocal received
                async for chunk in chunks:
                    received += len(chunk)
                    self.done += len(chunk)
                    self._report()
                    yield chunk

            auth = await self._authorize()
            try:
                async with self.client.open_blob(
                    self.reference.repository, layer.digest, auth
                ) as stream:
                    if stream.size is not None and stream.size != layer.size:
                        raise CorruptBlobError(
                            f"The registry announced {stream.size} bytes for the "
                            f"layer {layer.digest}, whose manifest gives "
                            f"{layer.size}."
                        )
                    return await self.cache.store(
                        layer.digest, counted(stream.chunks()), size=layer.size
                    )
            except RegistryResponseError as exc:
                refusal = await self._refusal(exc, f"the layer {layer.digest}")
                if refusal is None:
                    raise
                raise refusal from exc
            except RegistryUnreachableError:
                self.done -= received
                if attempt + 1 == _BLOB_ATTEMPTS:
                    raise
        raise AssertionError("every attempt returns or raises")

    async def _authorize(self) -> Authorization | None:
        """A pull login for this repository, asked of the registry now.

        Each pull logs in afresh once, then reuses that token for its blobs: a
        token cached from an earlier deploy would hide that the registry has
        since revoked the secret.
        """
        scope = f"repository:{self.reference.repository}:pull"
        username, secret = self.login.username, self.login.secret
        try:
            if username is None or secret is None:
                return await self.client.authenticate_anonymously(scope)
            auth = await self.client.authenticate(
                username, secret, scope, fresh=not self._logged_in
            )
            self._logged_in = True
            return auth
        except RegistryResponseError as exc:
            if exc.status not in _REFUSED:
                raise
            advice = self._login_advice(exc)
            raise self._refused(exc, "credential_rejected", advice) from exc

    async def _manifest(self, ref: str, *, listed: bool) -> Manifest:
        auth = await self._authorize()
        try:
            return await self.client.get_manifest(self.reference.repository, ref, auth)
        except RegistryResponseError as exc:
            if exc.status == 404 and not listed:
                raise self._refused(
                    exc, "image_not_found", self._not_found_advice()
                ) from exc
            refusal = await self._refusal(exc, f"the manifest {ref}")
            if refusal is None:
                raise
            raise refusal from exc

    async def _platform_manifest(self, entry: Descriptor) -> ImageManifest:
        """The image manifest an index entry points at, checked against its digest."""
        child = await self._manifest(entry.digest, listed=True)
        return platform_manifest(child.media_type, child.body, child.digest, entry)

    async def _refusal(self, exc: RegistryResponseError, what: str) -> PullError | None:
        """Our error for a refused read, or None when the registry's own fits."""
        if exc.status in _REFUSED:
            return self._refused(
                exc, "credential_rejected", await self._read_advice(exc)
            )
        if exc.status == 404:
            return self._refused(
                exc,
                "registry_error",
                f"{self.registry.name} lists {what} for {self.reference.familiar} "
                "but does not serve it: push the image again, then redeploy.",
            )
        return None

    async def _read_advice(self, exc: RegistryResponseError) -> str:
        """Tell a refused login from a login that may not read this repository."""
        if self.login.username is None:
            return self._anonymous_advice()
        challenge = self.client.challenge
        if challenge is None or challenge.scheme == "basic":
            auth = await self._authorize()
            if auth is not None:
                try:
                    await self.client.check_login(auth)
                except RegistryResponseError as login_exc:
                    if login_exc.status not in _REFUSED:
                        raise
                    return self._login_advice(login_exc)
        return (
            f"{self.registry.name} accepted the credential's login but refused to "
            f"let it read {self.reference.repository}: give that login pull "
            f"access, or {UPDATE_CREDENTIAL}."
        )

    def _login_advice(self, exc: RegistryResponseError) -> str:
        if self.login.username is None:
            return self._anonymous_advice()
        registry = self.registry
        message = (exc.registry_message or "").lower()
        if (
            registry.kind is RegistryKind.ECR
            and exc.status == 403
            and "expired" in message
        ):
            return (
                "The ECR token has expired (they last 12 hours): run 'aws ecr "
                f"get-login-password' again and use its output to {UPDATE_CREDENTIAL}."
            )
        hint = f" {registry.advice}" if registry.advice else ""
        return (
            f"{registry.name} refused the login with the App's credential.{hint} "
            f"Check its username and secret: {UPDATE_CREDENTIAL}."
        )

    def _anonymous_advice(self) -> str:
        return (
            f"{self.registry.name} needs a login to read "
            f"{self.reference.repository}: attach a credential that may pull it, "
            "then redeploy."
        )

    def _not_found_advice(self) -> str:
        shown = self.reference.familiar
        if self.registry.kind is RegistryKind.GHCR:
            return ghcr_not_found(shown)
        part = "digest" if self.reference.digest else "tag"
        return (
            f"{self.registry.name} has no image {shown}: check the repository and "
            f"{part}, then redeploy."
        )

    def _unsupported(self, platforms: list[str]) -> PullError:
        has = ", ".join(platforms) if platforms else "no platform at all"
        return self._error(
            "platform_not_supported",
            f"{self.reference.familiar} has no linux/amd64 image; it is built for "
            f"{has}. App VMs run linux/amd64: push a linux/amd64 variant (for "
            "example with 'docker buildx build --platform linux/amd64'), then "
            "redeploy.",
        )

    def _error(self, code: ErrorCode, explanation: str) -> PullError:
        error = RegistryError(
            code=code, registry=self.registry.name, explanation=explanation
        )
        return PullError(code, explanation, error)

    def _refused(
        self, exc: RegistryResponseError, code: ErrorCode, explanation: str
    ) -> PullError:
        error = registry_error(exc, code, self.registry, explanation)
        return PullError(code, explanation, error)

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.done, self.total)


def _with_registry(error: PullError, registry: RegistryHost) -> PullError:
    """The error with a registry error attached, when it has none yet."""
    if error.registry_error is not None:
        return error
    attached = RegistryError(
        code=error.code, registry=registry.name, explanation=error.detail
    )
    return PullError(error.code, error.detail, attached)


def _redacted(error: PullError, redactor: Redactor) -> PullError:
    """The same error with the secret, if a registry echoed it, taken out."""
    found = error.registry_error
    return PullError(
        error.code,
        redactor.text(error.detail, 1000),
        redactor.error(found) if found is not None else None,
    )
