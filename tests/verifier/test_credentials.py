"""Secrets checked before any call: Google JSON keys and ECR tokens."""

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import SecretStr

from services.registry.hosts import parse_registry
from services.verifier.credentials import check_json_key, check_secret, ecr_token_expiry
from services.verifier.errors import SecretFormatError

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
GAR = parse_registry("europe-docker.pkg.dev")
ECR = parse_registry("123456789012.dkr.ecr.eu-west-1.amazonaws.com")
PRIVATE_KEY = (
    "-----BEGIN PRIVATE KEY-----\nMIIEvSECRETKEYMATERIAL\n-----END PRIVATE KEY-----\n"
)
KEY = {
    "type": "service_account",
    "project_id": "demo",
    "private_key_id": "abc",
    "private_key": PRIVATE_KEY,
    "client_email": "puller@demo.iam.gserviceaccount.com",
}


def key_text(**changes: object) -> str:
    return json.dumps({**KEY, **changes}, indent=2)


def ecr_token(**fields: object) -> str:
    payload = {"payload": "c2VjcmV0LXBheWxvYWQ=", "datakey": "ZGs=", "version": "2"}
    raw = json.dumps({**payload, "type": "DATA_KEY", **fields}).encode()
    return base64.b64encode(raw).decode()


def test_a_multi_line_service_account_key_passes() -> None:
    check_json_key(key_text())
    assert check_secret(GAR, "_json_key", SecretStr(key_text()), now=NOW) is None


def test_a_base64_key_passes() -> None:
    encoded = base64.b64encode(key_text().encode()).decode()
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    check_secret(GAR, "_json_key_base64", SecretStr(wrapped), now=NOW)


@pytest.mark.parametrize(
    ("secret", "names"),
    [
        ("ya29.not-a-key-SECRETVALUE", "not valid JSON (line 1, column 1)"),
        ('{"type": "service_account", SECRETVALUE', "not valid JSON"),
        ('["SECRETVALUE"]', "a JSON object"),
        ('"SECRETVALUE"', "a JSON object"),
        (key_text(private_key=None), "lacks private_key"),
        (key_text(client_email="", type=None), "lacks type, client_email"),
        (json.dumps({"SECRETVALUE": 1}), "lacks type, client_email, private_key"),
        (key_text(private_key="SECRETVALUE"), "not a PEM private key"),
    ],
)
def test_a_wrong_json_key_is_named_without_quoting_it(secret: str, names: str) -> None:
    with pytest.raises(SecretFormatError) as caught:
        check_secret(GAR, "_json_key", SecretStr(secret), now=NOW)
    assert names in caught.value.detail
    assert "SECRETVALUE" not in caught.value.detail
    assert "SECRETKEYMATERIAL" not in caught.value.detail


def test_a_base64_key_that_is_not_base64() -> None:
    with pytest.raises(SecretFormatError, match="not valid base64"):
        check_secret(GAR, "_json_key_base64", SecretStr("{not base64!}"), now=NOW)


def test_a_base64_key_holding_a_broken_key() -> None:
    encoded = base64.b64encode(key_text(client_email=None).encode()).decode()
    with pytest.raises(SecretFormatError, match="lacks client_email"):
        check_secret(GAR, "_json_key_base64", SecretStr(encoded), now=NOW)


def test_other_usernames_are_not_checked_offline() -> None:
    assert check_secret(GAR, "oauth2accesstoken", SecretStr("ya29.x"), now=NOW) is None


def test_ecr_token_expiry_is_read() -> None:
    expires = NOW + timedelta(hours=11)
    token = SecretStr(ecr_token(expiration=int(expires.timestamp())))
    assert ecr_token_expiry(token) == expires
    assert check_secret(ECR, "AWS", token, now=NOW) == expires


def test_ecr_token_expiry_in_milliseconds_or_iso() -> None:
    expires = NOW + timedelta(hours=1)
    millis = SecretStr(ecr_token(expiration=int(expires.timestamp() * 1000)))
    assert ecr_token_expiry(millis) == expires
    iso = SecretStr(ecr_token(expiration=expires.isoformat()))
    assert ecr_token_expiry(iso) == expires


@pytest.mark.parametrize("secret", ["not-base64!", "bm90IGpzb24=", ecr_token()])
def test_an_unreadable_ecr_token_has_no_expiry(secret: str) -> None:
    assert check_secret(ECR, "AWS", SecretStr(secret), now=NOW) is None


def test_an_expired_ecr_token_is_refused_offline() -> None:
    token = SecretStr(ecr_token(expiration=int((NOW - timedelta(hours=1)).timestamp())))
    with pytest.raises(SecretFormatError) as caught:
        check_secret(ECR, "AWS", token, now=NOW)
    assert "expired at 2025-01-01 11:00 UTC (they last 12 hours)" in str(caught.value)
    assert "aws ecr get-login-password" in str(caught.value)
