"""The shared servers answer like the real thing."""

import base64
import json
from typing import Any

import httpx
import nats
import pytest
import sqlalchemy

from tests.support.registry import (
    ACCEPT_ALL,
    ADMIN,
    ALICE,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    NOBODY,
    OCI_INDEX,
    OCI_MANIFEST,
    LocalRegistry,
    RegistryAuth,
    parse_challenge,
    push_image,
)


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=="))
    return decoded


def _challenge(registry: LocalRegistry, path: str = "/v2/") -> dict[str, str]:
    response = httpx.get(f"{registry.url}{path}")
    assert response.status_code == 401
    scheme, params = parse_challenge(response.headers["WWW-Authenticate"])
    assert scheme == "bearer"
    return params


async def test_nats_jetstream_answers(nats_url: str) -> None:
    client = await nats.connect(nats_url)
    try:
        info = await client.jetstream().account_info()
        assert info.limits.max_streams == -1
    finally:
        await client.close()


def test_postgres_answers(database_url: str) -> None:
    engine = sqlalchemy.create_engine(database_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("select 1")).scalar() == 1
    finally:
        engine.dispose()


def test_basic_registry_requires_credentials(registry_basic: LocalRegistry) -> None:
    anonymous = httpx.get(f"{registry_basic.url}/v2/")
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Basic ")
    assert httpx.get(f"{registry_basic.url}/v2/", auth=ALICE).status_code == 200
    wrong = httpx.get(f"{registry_basic.url}/v2/", auth=(ALICE[0], "wrong"))
    assert wrong.status_code == 401


def test_basic_registry_rereads_htpasswd(registry_basic: LocalRegistry) -> None:
    v2 = f"{registry_basic.url}/v2/"
    registry_basic.add_user("carol", "carol-pass")
    assert httpx.get(v2, auth=("carol", "carol-pass")).status_code == 200
    registry_basic.revoke("carol")
    assert httpx.get(v2, auth=("carol", "carol-pass")).status_code == 401


def test_token_wrong_password_fails_at_token_endpoint(
    registry_token: LocalRegistry,
) -> None:
    params = _challenge(registry_token)
    query = {"service": params["service"], "scope": "repository:any/app:pull"}
    wrong = httpx.get(params["realm"], params=query, auth=(ALICE[0], "wrong"))
    assert wrong.status_code == 401
    assert wrong.json()["errors"][0]["code"] == "UNAUTHORIZED"
    good = httpx.get(params["realm"], params=query, auth=ALICE)
    assert good.status_code == 200
    body = good.json()
    assert body["token"] == body["access_token"]
    assert _claims(body["token"])["access"] == [
        {"type": "repository", "name": "any/app", "actions": ["pull"]}
    ]


def test_token_user_without_access_is_refused_by_registry(
    registry_token: LocalRegistry,
) -> None:
    pushed = push_image(registry_token, "team/private", "v1")
    path = f"/v2/team/private/manifests/{pushed.digest}"
    params = _challenge(registry_token, path)
    token = httpx.get(
        params["realm"],
        params={"service": params["service"], "scope": params["scope"]},
        auth=NOBODY,
    )
    assert token.status_code == 200
    assert _claims(token.json()["token"])["access"][0]["actions"] == []
    response = httpx.get(
        f"{registry_token.url}{path}",
        headers={
            "Authorization": f"Bearer {token.json()['token']}",
            "Accept": ACCEPT_ALL,
        },
    )
    assert response.status_code == 401
    assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"


def test_token_revoked_user_is_refused(registry_token: LocalRegistry) -> None:
    registry_token.add_user("dave", "dave-pass", repos={"dave/*": ["pull"]})
    params = _challenge(registry_token)
    query = {"service": params["service"], "scope": "repository:dave/app:pull,push"}
    granted = httpx.get(params["realm"], params=query, auth=("dave", "dave-pass"))
    assert _claims(granted.json()["token"])["access"][0]["actions"] == ["pull"]
    registry_token.revoke("dave")
    refused = httpx.get(params["realm"], params=query, auth=("dave", "dave-pass"))
    assert refused.status_code == 401


@pytest.mark.parametrize("mode", ["basic", "token"])
@pytest.mark.parametrize(
    ("media", "multi", "expected_type"),
    [
        ("oci", False, OCI_MANIFEST),
        ("docker", False, DOCKER_MANIFEST),
        ("oci", True, OCI_INDEX),
        ("docker", True, DOCKER_LIST),
    ],
)
def test_pushed_digest_is_served_with_all_accept_types(
    request: pytest.FixtureRequest,
    mode: str,
    media: str,
    multi: bool,
    expected_type: str,
) -> None:
    registry: LocalRegistry = request.getfixturevalue(f"registry_{mode}")
    repo = f"pushed/{media}-{'multi' if multi else 'single'}"
    platforms: list[tuple[str, str, str | None]] = [("linux", "amd64", None)]
    if multi:
        platforms.append(("linux", "arm64", "v8"))
    pushed = push_image(
        registry,
        repo,
        "v1",
        media="oci" if media == "oci" else "docker",
        platforms=platforms,
        attestation=multi and media == "oci",
        config_extra={"Cmd": ["/app/serve"], "ExposedPorts": None},
    )
    with httpx.Client(auth=RegistryAuth(*ALICE, push=False)) as client:
        response = client.get(
            f"{registry.url}/v2/{repo}/manifests/v1", headers={"Accept": ACCEPT_ALL}
        )
        assert response.status_code == 200, response.text
        assert response.headers["Docker-Content-Digest"] == pushed.digest
        assert response.headers["Content-Type"] == expected_type
        body = response.json()
        if multi:
            platforms_seen = [
                f"{m['platform']['os']}/{m['platform']['architecture']}"
                for m in body["manifests"]
            ]
            assert platforms_seen[:2] == ["linux/amd64", "linux/arm64"]
            assert len(platforms_seen) == (4 if media == "oci" else 2)
        config_digest = pushed.config_digests["linux/amd64"]
        config = client.get(f"{registry.url}/v2/{repo}/blobs/{config_digest}")
        assert config.json()["config"]["Cmd"] == ["/app/serve"]
        assert "ExposedPorts" not in config.json()["config"]


def test_token_is_requested_per_challenge(registry_token: LocalRegistry) -> None:
    pushed = push_image(registry_token, "cache/app", "v1", username=ADMIN[0])
    before = len(registry_token.issuer.requests) if registry_token.issuer else 0
    with httpx.Client(auth=RegistryAuth(*ALICE, push=False)) as client:
        for _ in range(3):
            response = client.head(
                f"{registry_token.url}/v2/cache/app/manifests/v1",
                headers={"Accept": ACCEPT_ALL},
            )
            assert response.headers["Docker-Content-Digest"] == pushed.digest
    assert registry_token.issuer is not None
    assert registry_token.issuer.requests[before:] == [
        ("alice", "repository:cache/app:pull")
    ]
