"""Verify a credential: prove the registry accepts it, or explain why not."""

import base64
import math
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx

from contracts.commands import VerifyCredential
from contracts.errors import ErrorCode, RegistryError
from contracts.replies import Verification
from services.backbone.settings import Settings
from services.verifier.client import RegistryClient, TokenCache
from services.verifier.credentials import check_secret
from services.verifier.errors import (
    InvalidImageError,
    InvalidRegistryError,
    RegistryResponseError,
    VerifierError,
)
from services.verifier.guard import AddressGuard
from services.verifier.hosts import RegistryHost, RegistryKind, parse_registry
from services.verifier.protocol import DIGEST, REPOSITORY, TAG, clean_text

_REDACTED = "[redacted]"
_MIN_REDACTED = 4
_EXPLANATION_LIMIT = 1000


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
        refusal = _error(exc, exc.code, registry, _failure_advice(registry, exc))
    except VerifierError as exc:
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
        auth = await client.authenticate(cmd.username, cmd.secret)
        await client.check_login(auth)
    except RegistryResponseError as exc:
        if exc.status in (401, 403):
            return _error(
                exc, "credential_rejected", registry, _login_advice(registry, exc)
            )
        raise
    if image is None:
        return None

    # A token is granted even without access: only reading the manifest proves it.
    try:
        auth = await client.authenticate(cmd.username, cmd.secret, image.scope)
        await client.head_manifest(image.repository, image.reference, auth)
    except RegistryResponseError as exc:
        if exc.status in (401, 403):
            return _error(
                exc, "credential_rejected", registry, _read_advice(registry, image)
            )
        if exc.status == 404 and registry.kind is RegistryKind.GHCR:
            return _error(exc, "credential_rejected", registry, _ghcr_not_found(image))
        if exc.status == 404:
            return None
        raise
    return None


def parse_image(text: str, registry: RegistryHost) -> ImageRepository:
    """Read ``[host/]repository[:tag|@digest]`` for a check on ``registry``."""
    rest = text.strip()
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        try:
            named = parse_registry(first)
        except InvalidRegistryError as exc:
            raise InvalidImageError(
                f"The image's registry part is invalid: {exc.detail}"
            ) from exc
        if named.name != registry.name:
            raise InvalidImageError(
                f"The image is on {named.name}, but the credential is for "
                f"{registry.name}; name an image on {registry.name}."
            )
        rest = remainder
    repository, reference = _split_reference(rest)
    if registry.kind is RegistryKind.DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    if not REPOSITORY.fullmatch(repository) or len(repository) > 255:
        raise InvalidImageError(
            f"'{repository[:80]}' is not a repository name: use lower-case "
            "letters, digits and separators, as in 'team/app'."
        )
    return ImageRepository(repository, reference)


def _split_reference(text: str) -> tuple[str, str]:
    if "@" in text:
        repository, _, digest = text.partition("@")
        if not DIGEST.fullmatch(digest):
            raise InvalidImageError(
                f"'{digest[:80]}' is not a digest: write sha256: and 64 hex digits."
            )
        return repository.partition(":")[0], digest
    repository, colon, tag = text.rpartition(":")
    if not colon or "/" in tag:
        return text, "latest"
    if not TAG.fullmatch(tag):
        raise InvalidImageError(
            f"'{tag[:80]}' is not a tag: up to 128 letters, digits, '_', '.' or "
            "'-', not starting with '.' or '-'."
        )
    return repository, tag


def _login_advice(registry: RegistryHost, exc: RegistryResponseError) -> str:
    message = (exc.registry_message or "").lower()
    if registry.kind is RegistryKind.ECR and exc.status == 403 and "expired" in message:
        return (
            "The ECR token has expired (they last 12 hours): run 'aws ecr "
            "get-login-password' again and update the credential."
        )
    if registry.advice:
        return f"Check the username and token for {registry.name}: {registry.advice}"
    return (
        f"{registry.name} refused the login: wrong username or token. Check both "
        "and update the credential."
    )


def _failure_advice(registry: RegistryHost, exc: RegistryResponseError) -> str:
    if exc.status == 429:
        wait = exc.retry_after_s
        when = f"in {math.ceil(wait)} s" if wait is not None else "later"
        return f"{registry.name} is limiting requests (429); try again {when}."
    if exc.status is not None and exc.status >= 500:
        return f"{exc.detail} The registry is failing; try again later."
    return exc.detail


def _read_advice(registry: RegistryHost, image: ImageRepository) -> str:
    sentence = (
        f"The registry accepted the login but refused to let it read "
        f"{image.repository}: give this login pull access to it, or check the "
        "image name."
    )
    if registry.kind is RegistryKind.DOCKER_HUB:
        sentence += (
            " Docker Hub answers this way for repositories that do not exist, too."
        )
    return sentence


def _ghcr_not_found(image: ImageRepository) -> str:
    return (
        f"ghcr.io answers 'not found' for {image.repository}:{image.reference}: "
        "the image does not exist or this login may not read it. Check the name, "
        "and that the classic token has read:packages and access to the package."
    )


def _error(
    exc: RegistryResponseError,
    code: ErrorCode,
    registry: RegistryHost,
    explanation: str,
) -> RegistryError:
    return RegistryError(
        code=code,
        registry=registry.name,
        registry_status=exc.status,
        registry_code=exc.registry_code or _upper(exc.challenge_error),
        registry_message=_message(exc),
        explanation=explanation,
    )


def _message(exc: RegistryResponseError) -> str | None:
    """The registry's text, with the challenge's error when the body lacks it."""
    message, extra = exc.registry_message, exc.challenge_error
    if not extra or (message and extra in message):
        return message
    return f"{message} ({extra})" if message else extra


def _upper(value: str | None) -> str | None:
    return value.upper() if value else None


def _rejected(
    cmd: VerifyCredential, registry: str, code: ErrorCode, detail: str
) -> Verification:
    error = RegistryError(code=code, registry=registry, explanation=detail)
    return _redacted(
        cmd, Verification(outcome="rejected", registry=registry, error=error)
    )


def _redacted(cmd: VerifyCredential, verification: Verification) -> Verification:
    """Remove the secret wherever a registry or the user might have echoed it."""
    secret = cmd.secret.get_secret_value()
    pair = f"{cmd.username}:{secret}".encode()
    needles = [
        secret,
        base64.b64encode(pair).decode("ascii"),
        base64.b64encode(secret.encode()).decode("ascii"),
    ]

    def scrub(text: str, limit: int = 300) -> str:
        for needle in needles:
            if len(needle) >= _MIN_REDACTED:
                text = text.replace(needle, _REDACTED)
        return clean_text(text, limit)

    error = verification.error
    if error is not None:
        error = error.model_copy(
            update={
                "registry": scrub(error.registry),
                "registry_code": error.registry_code and scrub(error.registry_code),
                "registry_message": error.registry_message
                and scrub(error.registry_message),
                "explanation": scrub(error.explanation, _EXPLANATION_LIMIT),
            }
        )
    return verification.model_copy(
        update={"registry": scrub(verification.registry), "error": error}
    )
