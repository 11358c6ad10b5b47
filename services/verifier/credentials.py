"""What a secret must look like for registries with their own conventions.

These checks run before any call, so an obviously wrong secret costs no request
and the user hears exactly what is missing. Messages never quote the secret.
"""

import base64
import binascii
import json
from datetime import UTC, datetime
from typing import Any

from pydantic import SecretStr

from services.registry.hosts import RegistryHost, RegistryKind
from services.verifier.errors import SecretFormatError

JSON_KEY_USERNAME = "_json_key"
JSON_KEY_BASE64_USERNAME = "_json_key_base64"
ECR_USERNAME = "AWS"
_JSON_KEY_FIELDS = ("type", "client_email", "private_key")


def check_secret(
    registry: RegistryHost, username: str, secret: SecretStr, *, now: datetime
) -> datetime | None:
    """Refuse a secret that cannot work; return its expiry when it shows one."""
    if username == JSON_KEY_USERNAME:
        check_json_key(secret.get_secret_value())
    elif username == JSON_KEY_BASE64_USERNAME:
        check_json_key(_decode_base64_key(secret.get_secret_value()))
    if registry.kind is not RegistryKind.ECR or username != ECR_USERNAME:
        return None
    expires_at = ecr_token_expiry(secret)
    if expires_at is not None and expires_at <= now:
        raise SecretFormatError(
            f"The ECR token expired at {expires_at:%Y-%m-%d %H:%M} UTC (they last "
            "12 hours): run 'aws ecr get-login-password' again and update the "
            "credential."
        )
    return expires_at


def check_json_key(text: str) -> None:
    """Require a service-account JSON key with type, client_email, private_key."""
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SecretFormatError(
            "The secret for _json_key must be a service-account JSON key, and it "
            f"is not valid JSON (line {exc.lineno}, column {exc.colno}): paste "
            "the whole key file."
        ) from None
    except RecursionError:
        raise SecretFormatError(
            "The secret for _json_key must be a service-account JSON key, and it "
            "is nested too deeply to be one."
        ) from None
    if not isinstance(data, dict):
        raise SecretFormatError(
            "The secret for _json_key must be a service-account JSON key: a JSON "
            "object, not a list or a single value."
        )
    missing = [
        name
        for name in _JSON_KEY_FIELDS
        if not isinstance(data.get(name), str) or not data[name].strip()
    ]
    if missing:
        raise SecretFormatError(
            f"The service-account JSON key lacks {', '.join(missing)}: paste the "
            "whole key file downloaded from Google Cloud."
        )
    if "PRIVATE KEY" not in data["private_key"]:
        raise SecretFormatError(
            "The service-account JSON key's private_key is not a PEM private key: "
            "paste the whole key file downloaded from Google Cloud."
        )


def _decode_base64_key(text: str) -> str:
    compact = "".join(text.split())
    try:
        raw = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
        return raw.decode("utf-8")
    except (binascii.Error, ValueError):
        raise SecretFormatError(
            "The secret for _json_key_base64 must be a service-account JSON key "
            "in base64, and it is not valid base64 text."
        ) from None


def ecr_token_expiry(secret: SecretStr) -> datetime | None:
    """The expiry inside an ECR token (base64 of JSON), or None if unreadable."""
    compact = "".join(secret.get_secret_value().split())
    try:
        raw = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
        data: Any = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    return _instant(data.get("expiration", data.get("expiresAt")))


def _instant(value: object) -> datetime | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        seconds = value / 1000 if value > 1e11 else value
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None
