"""Each registry's login convention, and the address guard, end to end.

Local registries stand in for the real ones with the same usernames and
secrets. Google Artifact Registry and GitLab hand out Bearer tokens, as here;
Amazon ECR takes Basic auth, but htpasswd cannot hold a token of ECR's length,
so its stand-in checks the same username and password at a token server. They
need their own insecure-registry settings, so this module runs a suite of its
own, on its own NATS server and database.
"""

import base64
import json
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.registry import LocalRegistry
from tests.support.suite import Suite, isolated_suite

PROBLEM = "application/problem+json"
ECR_HOST = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
GITLAB_USERS = {
    "gitlab-ci-token": "glcbt-64_" + secrets.token_urlsafe(24),
    "gitlab+deploy-token-4821": "gldt-" + secrets.token_urlsafe(20),
    "maria.lopez": "glpat-" + secrets.token_urlsafe(20),
}


def service_account_key() -> str:
    """A service-account JSON key file as Google Cloud hands it out."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    project = "demo-" + secrets.token_hex(3)
    email = f"puller@{project}.iam.gserviceaccount.com"
    return json.dumps(
        {
            "type": "service_account",
            "project_id": project,
            "private_key_id": secrets.token_hex(20),
            "private_key": pem,
            "client_email": email,
            "client_id": str(secrets.randbelow(10**20)),
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": "https://oauth2.googleapis.com/token",
        },
        indent=2,
    )


def ecr_token(expires_at: datetime) -> str:
    """What 'aws ecr get-login-password' prints: base64 of a JSON envelope."""
    envelope = {
        "payload": base64.b64encode(secrets.token_bytes(96)).decode(),
        "datakey": base64.b64encode(secrets.token_bytes(48)).decode(),
        "version": "2",
        "type": "DATA_KEY",
        "expiration": int(expires_at.timestamp()),
    }
    return base64.b64encode(json.dumps(envelope).encode()).decode()


def private_key_body(key_text: str) -> str:
    """A stretch from the middle of the PEM: it must never be echoed."""
    pem: str = json.loads(key_text)["private_key"]
    return pem.splitlines()[5]


JSON_KEY = service_account_key()
ECR_TOKEN = ecr_token(datetime.now(UTC) + timedelta(hours=12))


@pytest.fixture(scope="module")
def google(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """Like Artifact Registry: Bearer tokens, a JSON key as the password."""
    encoded = base64.b64encode(JSON_KEY.encode()).decode()
    users = {"_json_key": JSON_KEY, "_json_key_base64": encoded}
    path = tmp_path_factory.mktemp("registry-google")
    with LocalRegistry(path, auth="token", users=users) as registry:
        yield registry


@pytest.fixture(scope="module")
def gitlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """Like registry.gitlab.com: Bearer tokens for job, deploy and personal tokens."""
    path = tmp_path_factory.mktemp("registry-gitlab")
    with LocalRegistry(path, auth="token", users=GITLAB_USERS) as registry:
        yield registry


@pytest.fixture(scope="module")
def ecr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """Like Amazon ECR: username AWS and a 12-hour token as the password."""
    path = tmp_path_factory.mktemp("registry-ecr")
    with LocalRegistry(path, auth="token", users={"AWS": ECR_TOKEN}) as registry:
        yield registry


@pytest.fixture(scope="module")
def rules_suite(
    request: pytest.FixtureRequest,
    google: LocalRegistry,
    gitlab: LocalRegistry,
    ecr: LocalRegistry,
) -> Iterator[Suite]:
    with isolated_suite(request, google, gitlab, ecr) as suite:
        yield suite


@pytest.fixture(scope="module")
def client(rules_suite: Suite) -> Iterator[httpx.Client]:
    with rules_suite.client(rules_suite.new_account("rules")) as api:
        yield api


def add(
    client: httpx.Client, registry: str, username: str, secret: str
) -> httpx.Response:
    return client.post(
        "/v1/credentials",
        json={"registry": registry, "username": username, "secret": secret},
    )


def problem_of(response: httpx.Response, code: str) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["code"] == code, body
    return body


def token_requests(registry: LocalRegistry) -> int:
    assert registry.issuer is not None
    return len(registry.issuer.requests)


# Google Artifact Registry: _json_key and _json_key_base64


@pytest.mark.parametrize(
    ("username", "secret"),
    [
        ("_json_key", JSON_KEY),
        ("_json_key_base64", base64.b64encode(JSON_KEY.encode()).decode()),
    ],
)
def test_a_service_account_key_logs_in(
    rules_suite: Suite,
    client: httpx.Client,
    google: LocalRegistry,
    username: str,
    secret: str,
) -> None:
    before = token_requests(google)
    response = add(client, google.host, username, secret)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["username"] == username
    assert body["expires_at"] is None
    assert token_requests(google) > before
    assert client.get(f"/v1/credentials/{body['id']}").json() == body

    # Neither the key nor its base64 form is echoed or logged.
    for needle in (private_key_body(JSON_KEY), secret[200:240]):
        assert needle not in response.text
        assert needle not in rules_suite.log_text()


@pytest.mark.parametrize(
    ("username", "secret"),
    [
        ("_json_key", "ya29.a0AfB_byC-an-oauth-access-token"),
        ("_json_key", json.dumps(["service_account"])),
        ("_json_key", json.dumps({"type": "service_account", "project_id": "p"})),
        ("_json_key_base64", "this is not base64!"),
        ("_json_key_base64", base64.b64encode(b"plain text").decode()),
    ],
)
def test_a_secret_that_is_no_json_key_is_refused_without_a_call(
    client: httpx.Client, google: LocalRegistry, username: str, secret: str
) -> None:
    before = token_requests(google)
    response = add(client, google.host, username, secret)
    problem = problem_of(response, "credential_rejected")
    assert "JSON key" in problem["detail"]
    assert problem["registry_status"] is None
    assert secret not in response.text
    assert token_requests(google) == before


def test_a_json_key_the_registry_does_not_know_is_rejected_by_it(
    client: httpx.Client, google: LocalRegistry
) -> None:
    before = token_requests(google)
    response = add(client, google.host, "_json_key", service_account_key())
    problem = problem_of(response, "credential_rejected")
    assert problem["registry_status"] == 401
    assert problem["registry_message"]
    assert token_requests(google) > before


# GitLab: job, deploy and personal access tokens


@pytest.mark.parametrize("username", sorted(GITLAB_USERS))
def test_gitlab_style_usernames_log_in(
    client: httpx.Client, gitlab: LocalRegistry, username: str
) -> None:
    response = add(client, gitlab.host, username, GITLAB_USERS[username])
    assert response.status_code == 201, response.text
    assert response.json()["username"] == username
    assert GITLAB_USERS[username] not in response.text


def test_a_gitlab_token_of_another_user_is_rejected(
    client: httpx.Client, gitlab: LocalRegistry
) -> None:
    response = add(client, gitlab.host, "maria.lopez", GITLAB_USERS["gitlab-ci-token"])
    problem = problem_of(response, "credential_rejected")
    assert problem["registry_status"] == 401
    assert problem["registry_message"]


# Amazon ECR: username AWS and a token that lasts 12 hours


def test_an_ecr_token_logs_in_as_aws(client: httpx.Client, ecr: LocalRegistry) -> None:
    response = add(client, ecr.host, "AWS", ECR_TOKEN)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["username"] == "AWS"
    assert body["secret_hint"] == "…" + ECR_TOKEN[-4:]
    assert ECR_TOKEN[:40] not in response.text


def test_an_expired_ecr_token_is_refused_as_expired_before_any_call(
    client: httpx.Client,
) -> None:
    expired = ecr_token(datetime.now(UTC) - timedelta(minutes=5))
    started = time.monotonic()
    response = add(client, ECR_HOST, "AWS", expired)
    assert time.monotonic() - started < 5
    problem = problem_of(response, "credential_rejected")
    assert "expired" in problem["detail"]
    assert "aws ecr get-login-password" in problem["detail"]
    assert problem["registry_status"] is None
    assert expired[:40] not in response.text


# The address guard: only public addresses, unless allow_registries lists them


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.2:{port}",
        "0.0.0.0:{port}",
        "[::1]:{port}",
        "[::ffff:127.0.0.2]:{port}",
        "10.20.30.40:{port}",
        "169.254.169.254",
        "169.254.169.254:80",
    ],
)
def test_a_registry_on_a_private_address_is_forbidden(
    client: httpx.Client, google: LocalRegistry, host: str
) -> None:
    registry = host.format(port=google.port)
    before = token_requests(google)
    response = add(client, registry, "_json_key", JSON_KEY)
    problem = problem_of(response, "registry_address_forbidden")
    assert "allow_registries" in problem["detail"]
    assert token_requests(google) == before
    saved = client.get("/v1/credentials").json()["items"]
    assert registry not in [item["registry"] for item in saved]


def test_the_metadata_address_is_named_as_such(client: httpx.Client) -> None:
    response = add(client, "169.254.169.254", "AWS", ECR_TOKEN)
    problem = problem_of(response, "registry_address_forbidden")
    assert "metadata" in problem["detail"]


def test_localhost_passes_the_guard_through_its_allowed_address(
    client: httpx.Client, google: LocalRegistry
) -> None:
    # localhost resolves to 127.0.0.1, which allow_registries lists; the name is
    # not in insecure_registries, so the verifier insists on TLS and says so.
    response = add(client, f"localhost:{google.port}", "_json_key", JSON_KEY)
    problem = problem_of(response, "registry_unreachable")
    assert f"localhost:{google.port}" in problem["detail"]
    assert "insecure_registries" in problem["detail"]


# Usernames as long as the API allows


def test_a_long_robot_username_is_saved_under_its_default_name(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Harbor-style robot account; the name stays within the 255 the API allows.
    username = "robot$" + "platform-team-" * 14 + "+puller"
    registry = LocalRegistry(
        tmp_path_factory.mktemp("registry-harbor"),
        auth="token",
        users={username: "robot-secret-" + secrets.token_hex(8)},
    )
    # A suite of its own: a stuck read model must not spill into other tests.
    with (
        registry,
        isolated_suite(request, registry) as suite,
        suite.client(suite.new_account("robots")) as api,
    ):
        response = add(api, registry.host, username, registry.users[username])
        assert response.status_code == 201, response.text
        assert response.json()["username"] == username
        assert response.json()["name"]

        # The read model keeps up with the writes after it.
        registry.add_user("later", "later-secret")
        assert add(api, registry.host, "later", "later-secret").status_code == 201
