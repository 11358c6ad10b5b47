"""Verify a credential: prove the registry accepts it, or explain why not."""

from dataclasses import dataclass
from datetime import UTC, datetime

import httpx

from contracts.commands import VerifyCredential
from contracts.errors import ErrorCode, RegistryError
from contracts.references import (
    InvalidReferenceError,
    names_registry,
    parse_reference,
    same_registry,
)
from contracts.replies import Verification
from services.backbone.settings import Settings
from services.registry.client import RegistryClient, TokenCache
from services.registry.errors import (
    InvalidImageError,
    InvalidRegistryError,
    RegistryAccessError,
    RegistryResponseError,
)
from services.registry.guard import AddressGuard
from services.registry.hosts import RegistryHost, RegistryKind, parse_registry
from services.registry.refusals import (
    Redactor,
    failure_advice,
    ghcr_not_found,
    login_advice,
    read_advice,
    registry_error,
)
from services.verifier.credentials import check_secret


@dataclass(frozen=True)
class ImageRepository:
    """The repository and tag or digest named for the access check."""

    repository: str
    reference: str

    @property
    def scope(self) -> str:
        return f"repository:{self.repository}:pull"


async def verify_credential(
    cmd: VerifyCredential,
    settings: Settings,
    *,
    tokens: TokenCache | None = None,
    guard: AddressGuard | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Verification:
    """Log in as ``docker login`` would and, given an image, read its manifest."""
    try:
        registry = parse_registry(cmd.registry, insecure=settings.insecure_registries)
    except InvalidRegistryError as exc:
        return _rejected(cmd, cmd.registry, exc.code, exc.detail)
    try:
        expires_at = check_secret(
            registry, cmd.username, cmd.secret, now=datetime.now(UTC)
        )
        image = parse_image(cmd.image, registry) if cmd.image else None
        guard = guard or AddressGuard.from_settings(settings)
        async with RegistryClient(
            registry, settings, guard=guard, transport=transport, tokens=tokens
        ) as client:
            refusal = await _prove(client, cmd, image)
    except RegistryResponseError as exc:
        refusal = registry_error(exc, exc.code, registry, failure_advice(registry, exc))
    except RegistryAccessError as exc:
        return _rejected(cmd, registry.name, exc.code, exc.detail)
    if refusal is not None:
        return _redacted(
            cmd, Verification(outcome="rejected", registry=registry.name, error=refusal)
        )
    return Verification(
        outcome="accepted", registry=registry.name, expires_at=expires_at
    )


async def _prove(
    client: RegistryClient, cmd: VerifyCredential, image: ImageRepository | None
) -> RegistryError | None:
    """The refusal that stops the proof, or None when the registry accepts."""
    registry = client.registry

    # A login without scope first, as `docker login` does: a wrong secret stops here.
    await client.ping()
    try:
        auth = await client.authenticate(cmd.username, cmd.secret, fresh=True)
        await client.check_login(auth)
    except RegistryResponseError as exc:
        if exc.status in (401, 403):
            return registry_error(
                exc, "credential_rejected", registry, login_advice(registry, exc)
            )
        raise
    if image is None:
        return None

    # A token is granted even without access: only reading the manifest proves it.
    try:
        auth = await client.authenticate(
            cmd.username, cmd.secret, image.scope, fresh=True
        )
        await client.head_manifest(image.repository, image.reference, auth)
    except RegistryResponseError as exc:
        if exc.status in (401, 403):
            advice = read_advice(registry, image.repository, "check the image name")
            return registry_error(exc, "credential_rejected", registry, advice)
        if exc.status == 404 and registry.kind is RegistryKind.GHCR:
            advice = ghcr_not_found(f"{image.repository}:{image.reference}")
            return registry_error(exc, "credential_rejected", registry, advice)
        if exc.status == 404:
            return None
        raise
    return None


def parse_image(text: str, registry: RegistryHost) -> ImageRepository:
    """Read ``[host/]repository[:tag|@digest]`` for a check on ``registry``."""
    named = names_registry(text)
    try:
        reference = parse_reference(text if named else f"{registry.name}/{text}")
    except InvalidReferenceError as exc:
        raise InvalidImageError(exc.detail) from exc
    if named and not same_registry(reference, registry.name):
        raise InvalidImageError(
            f"The image is on {reference.registry}, but the credential is for "
            f"{registry.name}; name an image on {registry.name}."
        )
    return ImageRepository(reference.repository, reference.manifest_reference)


def _rejected(
    cmd: VerifyCredential, registry: str, code: ErrorCode, detail: str
) -> Verification:
    error = RegistryError(code=code, registry=registry, explanation=detail)
    return _redacted(
        cmd, Verification(outcome="rejected", registry=registry, error=error)
    )


def _redacted(cmd: VerifyCredential, verification: Verification) -> Verification:
    """Remove the secret wherever a registry or the user might have echoed it."""
    redactor = Redactor(cmd.username, cmd.secret)
    error = verification.error
    return verification.model_copy(
        update={
            "registry": redactor.text(verification.registry),
            "error": error and redactor.error(error),
        }
    )
