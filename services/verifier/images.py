"""Check an image before an App VM is made of it: readable, pinned, linux/amd64."""

from datetime import UTC, datetime

import httpx

from contracts.commands import CheckImage
from contracts.errors import ErrorCode, RegistryError
from contracts.references import ImageReference, InvalidReferenceError, parse_reference
from contracts.replies import ImageCheck
from services.backbone.settings import Settings
from services.registry.client import Authorization, Manifest, RegistryClient, TokenCache
from services.registry.errors import (
    InvalidRegistryError,
    MalformedResponseError,
    RegistryAccessError,
    RegistryResponseError,
)
from services.registry.guard import AddressGuard
from services.registry.hosts import RegistryKind, parse_registry
from services.registry.manifests import (
    Descriptor,
    ImageIndex,
    ImageManifest,
    cpu_warning,
    pin_digest,
    platform_manifest,
    read_config,
    read_manifest,
)
from services.registry.refusals import (
    Redactor,
    failure_advice,
    ghcr_not_found,
    login_advice,
    read_advice,
    registry_error,
)
from services.verifier.credentials import check_secret

_REFUSED = (401, 403)
_IMAGE_LIMIT = 1100


async def check_image(
    cmd: CheckImage,
    settings: Settings,
    *,
    tokens: TokenCache | None = None,
    guard: AddressGuard | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> ImageCheck:
    """Read the image as a pull would: pin its digest and find linux/amd64."""
    check = await _check(cmd, settings, tokens, guard, transport)
    redactor = Redactor(cmd.username, cmd.secret)
    return check.model_copy(
        update={
            "image": redactor.text(check.image, _IMAGE_LIMIT),
            "error": check.error and redactor.error(check.error),
        }
    )


async def _check(
    cmd: CheckImage,
    settings: Settings,
    tokens: TokenCache | None,
    guard: AddressGuard | None,
    transport: httpx.AsyncBaseTransport | None,
) -> ImageCheck:
    try:
        reference = parse_reference(cmd.image)
    except InvalidReferenceError as exc:
        return _rejected(cmd.image, "", "invalid_image_reference", exc.detail)
    image = str(reference)
    if (cmd.username is None) != (cmd.secret is None):
        return _rejected(
            image,
            reference.registry,
            "invalid_request",
            "Give both a username and a secret, or neither for an anonymous pull.",
        )
    try:
        registry = parse_registry(
            reference.registry, insecure=settings.insecure_registries
        )
    except InvalidRegistryError as exc:
        explanation = f"The image's registry cannot be used: {exc.detail}"
        return _rejected(
            image, reference.registry, "invalid_image_reference", explanation
        )
    try:
        if cmd.username is not None and cmd.secret is not None:
            check_secret(registry, cmd.username, cmd.secret, now=datetime.now(UTC))
        async with RegistryClient(
            registry,
            settings,
            guard=guard or AddressGuard.from_settings(settings),
            transport=transport,
            tokens=tokens,
        ) as client:
            return await _Inspection(client, reference, cmd).run()
    except _RefusedError as refused:
        return ImageCheck(outcome="rejected", image=image, error=refused.error)
    except RegistryResponseError as exc:
        advice = failure_advice(registry, exc)
        error = registry_error(exc, exc.code, registry, advice)
        return ImageCheck(outcome="rejected", image=image, error=error)
    except RegistryAccessError as exc:
        return _rejected(image, registry.name, exc.code, exc.detail)


class _RefusedError(Exception):
    """The registry refused a read; ``error`` explains it to the user."""

    def __init__(self, error: RegistryError) -> None:
        super().__init__(error.code)
        self.error = error


class _Inspection:
    """One image check against one registry, with one login."""

    def __init__(
        self, client: RegistryClient, reference: ImageReference, cmd: CheckImage
    ) -> None:
        self.client = client
        self.registry = client.registry
        self.reference = reference
        self.cmd = cmd
        self.auth: Authorization | None = None

    async def run(self) -> ImageCheck:
        reference = self.reference
        # One login for the whole check, scoped to pull from this repository.
        await self._login()

        # Pinned from the bytes received, so the digest is what was checked.
        top = await self._manifest(reference.manifest_reference, listed=False)
        digest = pin_digest(top.body, top.digest, reference.digest)
        document = read_manifest(top.media_type, top.body)
        found = ImageCheck(
            outcome="accepted",
            image=str(reference),
            digest=digest,
            media_type=top.media_type,
        )

        # An index names its platforms; attestations are not images.
        if isinstance(document, ImageIndex):
            platforms = document.platforms()
            entry = document.for_app_vms()
            if entry is None:
                return self._unsupported(found, platforms)
            manifest = await self._platform_manifest(entry)
            platform_digest, platform = entry.digest, entry.platform
        else:
            manifest, platform_digest, platform = document, digest, None
            platforms = []

        # A single-platform manifest names its platform only in its config blob.
        config_platform, config = read_config(await self._blob(manifest.config.digest))
        if platform is None:
            if config_platform is None:
                raise MalformedResponseError(
                    "The image config does not name its platform (os and "
                    "architecture).",
                    status=200,
                )
            platform, platforms = config_platform, [str(config_platform)]
            if not platform.runs_on_app_vms:
                return self._unsupported(found, platforms)
        warning = cpu_warning(platform)
        return found.model_copy(
            update={
                "platform_digest": platform_digest,
                "platforms": platforms,
                "warnings": [warning] if warning else [],
                "config": config,
            }
        )

    async def _platform_manifest(self, entry: Descriptor) -> ImageManifest:
        """The image manifest an index entry points at, checked against its digest."""
        child = await self._manifest(entry.digest, listed=True)
        return platform_manifest(child.media_type, child.body, child.digest, entry)

    async def _login(self) -> None:
        """A pull token for this repository only (or Basic, or nothing)."""
        scope = f"repository:{self.reference.repository}:pull"
        username, secret = self.cmd.username, self.cmd.secret
        try:
            if username is None or secret is None:
                self.auth = await self.client.authenticate_anonymously(scope)
            else:
                self.auth = await self.client.authenticate(username, secret, scope)
        except RegistryResponseError as exc:
            if exc.status not in _REFUSED:
                raise
            advice = (
                self._anonymous_advice()
                if username is None
                else login_advice(self.registry, exc)
            )
            raise self._refused(exc, "credential_rejected", advice) from exc

    async def _manifest(self, ref: str, *, listed: bool) -> Manifest:
        try:
            return await self.client.get_manifest(
                self.reference.repository, ref, self.auth
            )
        except RegistryResponseError as exc:
            raise await self._refusal(exc, listed, f"the manifest {ref}") from exc

    async def _blob(self, digest: str) -> bytes:
        try:
            return await self.client.get_blob(
                self.reference.repository, digest, self.auth
            )
        except RegistryResponseError as exc:
            raise await self._refusal(exc, True, f"the config blob {digest}") from exc

    async def _refusal(
        self, exc: RegistryResponseError, listed: bool, what: str
    ) -> Exception:
        """The error to raise for a refused read: ours where we can explain it."""
        if exc.status in _REFUSED:
            advice = await self._read_refused_advice(exc)
            return self._refused(exc, "credential_rejected", advice)
        if exc.status == 404 and not listed:
            return self._refused(exc, "image_not_found", self._not_found_advice())
        if exc.status == 404:
            return self._refused(
                exc,
                "registry_error",
                f"{self.registry.name} lists {what} for {self.reference} but does "
                "not serve it: push the image again.",
            )
        return exc

    async def _read_refused_advice(self, exc: RegistryResponseError) -> str:
        """Tell a wrong login from a login that may not read this repository."""
        if self.auth is None:
            return self._anonymous_advice()
        challenge = self.client.challenge
        if challenge is None or challenge.scheme == "basic":
            try:
                await self.client.check_login(self.auth)
            except RegistryResponseError as login_exc:
                if login_exc.status not in _REFUSED:
                    raise
                return login_advice(self.registry, login_exc)
        return read_advice(
            self.registry,
            self.reference.repository,
            "update the credential to one that has it",
        )

    def _anonymous_advice(self) -> str:
        sentence = (
            f"{self.registry.name} needs a login to read "
            f"{self.reference.repository}: add a credential that may pull it."
        )
        if self.registry.kind is RegistryKind.DOCKER_HUB:
            sentence += (
                " Docker Hub answers this way for repositories that do not exist, too."
            )
        return sentence

    def _not_found_advice(self) -> str:
        reference = self.reference
        shown = reference.familiar
        if self.registry.kind is RegistryKind.GHCR:
            return ghcr_not_found(shown)
        part = "digest" if reference.digest else "tag"
        return (
            f"{self.registry.name} has no image {shown}: check the repository and "
            f"{part}."
        )

    def _unsupported(self, found: ImageCheck, platforms: list[str]) -> ImageCheck:
        has = ", ".join(platforms) if platforms else "no platform at all"
        explanation = (
            f"{self.reference.familiar} has no linux/amd64 image; it is built for "
            f"{has}. App VMs run linux/amd64: push a linux/amd64 variant (for "
            "example with 'docker buildx build --platform linux/amd64') and try "
            "again."
        )
        error = RegistryError(
            code="platform_not_supported",
            registry=self.registry.name,
            explanation=explanation,
        )
        return found.model_copy(
            update={"outcome": "rejected", "platforms": platforms, "error": error}
        )

    def _refused(
        self, exc: RegistryResponseError, code: ErrorCode, explanation: str
    ) -> _RefusedError:
        return _RefusedError(registry_error(exc, code, self.registry, explanation))


def _rejected(
    image: str, registry: str, code: ErrorCode, explanation: str
) -> ImageCheck:
    error = RegistryError(code=code, registry=registry, explanation=explanation)
    return ImageCheck(outcome="rejected", image=image, error=error)
