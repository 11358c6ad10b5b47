"""How a registry's refusal becomes a ``RegistryError`` a user can act on.

Shared by the credential check, the image check and the deployer's pull. Every
reply passes through ``Redactor`` on its way out, since a registry may echo what
it was sent.
"""

import base64
import math

from pydantic import SecretStr

from contracts.errors import ErrorCode, RegistryError
from services.registry.errors import RegistryResponseError
from services.registry.hosts import RegistryHost, RegistryKind
from services.registry.protocol import clean_text

REDACTED = "[redacted]"
_MIN_REDACTED = 4
_EXPLANATION_LIMIT = 1000


def registry_error(
    exc: RegistryResponseError,
    code: ErrorCode,
    registry: RegistryHost,
    explanation: str,
) -> RegistryError:
    """The registry's status, code and words, with our explanation."""
    return RegistryError(
        code=code,
        registry=registry.name,
        registry_status=exc.status,
        registry_code=exc.registry_code or _upper(exc.challenge_error),
        registry_message=_message(exc),
        explanation=explanation,
    )


def login_advice(registry: RegistryHost, exc: RegistryResponseError) -> str:
    """Why a login was refused and what to change."""
    message = (exc.registry_message or "").lower()
    if registry.kind is RegistryKind.ECR and exc.status == 403 and "expired" in message:
        return (
            "The ECR token has expired (they last 12 hours): run 'aws ecr "
            "get-login-password' again and update the credential."
        )
    if registry.advice:
        return (
            f"Check the username and token for {registry.name}: {registry.advice} "
            "Then update the credential."
        )
    return (
        f"{registry.name} refused the login: wrong username or token. Check both "
        "and update the credential."
    )


def read_advice(registry: RegistryHost, repository: str, remedy: str) -> str:
    """A login that works but may not pull ``repository``."""
    sentence = (
        f"The registry accepted the login but refused to let it read "
        f"{repository}: give this login pull access to it, or {remedy}."
    )
    if registry.kind is RegistryKind.DOCKER_HUB:
        sentence += (
            " Docker Hub answers this way for repositories that do not exist, too."
        )
    return sentence


def ghcr_not_found(image: str) -> str:
    """GHCR's 404: the image is missing, or hidden from this token."""
    return (
        f"ghcr.io answers 'not found' for {image}: the image does not exist or "
        "this login may not read it. Check the repository and tag, and that the "
        "classic token has read:packages and access to the package."
    )


def failure_advice(registry: RegistryHost, exc: RegistryResponseError) -> str:
    """What to do about an answer that is neither a yes nor a refusal."""
    if exc.status == 429:
        wait = exc.retry_after_s
        when = f"in {math.ceil(wait)} s" if wait is not None else "later"
        return f"{registry.name} is limiting requests (429); try again {when}."
    if exc.status is not None and exc.status >= 500:
        return f"{exc.detail} The registry is failing; try again later."
    return exc.detail


class Redactor:
    """Removes a secret, and its Basic encodings, from text we send back."""

    def __init__(self, username: str | None, secret: SecretStr | None) -> None:
        raw = secret.get_secret_value() if secret is not None else ""
        pair = f"{username or ''}:{raw}".encode()
        candidates = [
            raw,
            base64.b64encode(pair).decode("ascii"),
            base64.b64encode(raw.encode()).decode("ascii"),
        ]
        self._needles = [n for n in candidates if raw and len(n) >= _MIN_REDACTED]

    def text(self, text: str, limit: int = 300) -> str:
        for needle in self._needles:
            text = text.replace(needle, REDACTED)
        return clean_text(text, limit)

    def error(self, error: RegistryError) -> RegistryError:
        return error.model_copy(
            update={
                "registry": self.text(error.registry),
                "registry_code": error.registry_code and self.text(error.registry_code),
                "registry_message": error.registry_message
                and self.text(error.registry_message),
                "explanation": self.text(error.explanation, _EXPLANATION_LIMIT),
            }
        )


def _message(exc: RegistryResponseError) -> str | None:
    """The registry's text, with the challenge's error when the body lacks it."""
    message, extra = exc.registry_message, exc.challenge_error
    if not extra or (message and extra in message):
        return message
    return f"{message} ({extra})" if message else extra


def _upper(value: str | None) -> str | None:
    return value.upper() if value else None
