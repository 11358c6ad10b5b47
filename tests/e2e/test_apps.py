"""Creating App VMs from private images, checked before they exist."""

import asyncio
from dataclasses import dataclass

import httpx
import pytest

from tests.support.registry import ADMIN, LocalRegistry, PushedImage, push_image
from tests.support.suite import Suite


@dataclass(frozen=True)
class Images:
    multi: PushedImage
    no_amd64: PushedImage
    amd64_only: PushedImage
    arm64_only: PushedImage
    attested: PushedImage


@pytest.fixture(scope="module")
def images(registry_token: LocalRegistry) -> Images:
    user, password = ADMIN

    def push(repo: str, **kwargs: object) -> PushedImage:
        return push_image(
            registry_token, repo, "1.0", username=user, password=password, **kwargs
        )  # type: ignore[arg-type]

    return Images(
        multi=push(
            "team/multi",
            platforms=(("linux", "amd64", None), ("linux", "arm64", "v8")),
        ),
        no_amd64=push(
            "team/no-amd64",
            platforms=(("linux", "arm64", "v8"), ("linux", "s390x", None)),
        ),
        amd64_only=push(
            "team/amd64-only",
            media="docker",
            config_extra={"ExposedPorts": {"9090/tcp": {}}},
        ),
        arm64_only=push("team/arm64-only", platforms=(("linux", "arm64", "v8"),)),
        attested=push("team/attested", attestation=True),
    )


def save_credential(
    api: httpx.Client,
    registry: LocalRegistry,
    username: str = "alice",
    secret: str = "alice-pass",
    **extra: str,
) -> str:
    """Save a credential the registry accepts; its id."""
    response = api.post(
        "/v1/credentials",
        json={
            "registry": registry.host,
            "username": username,
            "secret": secret,
            **extra,
        },
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


@pytest.fixture(scope="module")
def credential_id(api: httpx.Client, registry_token: LocalRegistry) -> str:
    return save_credential(api, registry_token)


def create(api: httpx.Client, name: str, image: str, **extra: object) -> httpx.Response:
    return api.post("/v1/apps", json={"name": name, "image": image, **extra})


def ref(registry: LocalRegistry, repo: str, tag: str = "1.0") -> str:
    return f"{registry.host}/{repo}:{tag}"


def test_an_app_is_created_with_its_digest_pinned_and_first_deploy_queued(
    api: httpx.Client, registry_token: LocalRegistry, images: Images, credential_id: str
) -> None:
    response = create(
        api, "web", ref(registry_token, "team/multi"), credential_id=credential_id
    )
    assert response.status_code == 201, response.text
    app = response.json()
    assert app["digest"] == images.multi.digest
    assert app["credential_id"] == credential_id
    assert app["status"] == "deploying"
    assert app["port"] == 8080
    deploy = app["current_deploy"]
    assert deploy["reason"] == "create" and deploy["status"] == "queued"
    assert deploy["credential_id"] == credential_id

    # The App is visible everywhere at once, and the credential knows its App.
    assert api.get(f"/v1/apps/{app['id']}").json()["id"] == app["id"]
    assert app["id"] in [a["id"] for a in api.get("/v1/apps").json()["items"]]
    deploys = api.get(f"/v1/apps/{app['id']}/deploys").json()["items"]
    assert [d["id"] for d in deploys] == [deploy["id"]]
    assert api.get(f"/v1/deploys/{deploy['id']}").json()["app_id"] == app["id"]
    apps = api.get(f"/v1/credentials/{credential_id}").json()["apps"]
    assert {"id": app["id"], "name": "web"} in apps


def test_the_single_exposed_port_is_the_default(
    api: httpx.Client, registry_token: LocalRegistry, images: Images, credential_id: str
) -> None:
    response = create(
        api,
        "port9090",
        ref(registry_token, "team/amd64-only"),
        credential_id=credential_id,
    )
    assert response.status_code == 201, response.text
    assert response.json()["port"] == 9090
    assert response.json()["digest"] == images.amd64_only.digest


def test_an_attestation_entry_is_not_a_platform(
    api: httpx.Client, registry_token: LocalRegistry, images: Images, credential_id: str
) -> None:
    response = create(
        api,
        "attested",
        ref(registry_token, "team/attested"),
        credential_id=credential_id,
    )
    assert response.status_code == 201, response.text


@pytest.mark.parametrize(
    ("image", "part"),
    [
        ("Team/App:1", "lowercase"),
        ("team/app:bad!tag", "tag"),
        ("team/app@sha256:abc", "digest"),
        ("https://ghcr.io/team/app", "https://"),
        ("", "image"),
    ],
)
def test_a_malformed_reference_says_which_part_is_wrong(
    api: httpx.Client, image: str, part: str
) -> None:
    response = create(api, "bad-ref", image)
    assert response.status_code == 422
    body = response.json()
    assert body["code"] in {"invalid_image_reference", "invalid_request"}
    assert part.lower() in body["detail"].lower()


def test_each_image_failure_is_specific(
    api: httpx.Client, registry_token: LocalRegistry, images: Images, credential_id: str
) -> None:
    missing = create(
        api,
        "missing",
        ref(registry_token, "team/multi", "9.9"),
        credential_id=credential_id,
    )
    assert missing.status_code == 422
    assert missing.json()["code"] == "image_not_found"
    assert missing.json()["registry_code"] == "MANIFEST_UNKNOWN"

    no_amd64 = create(
        api,
        "no-amd64",
        ref(registry_token, "team/no-amd64"),
        credential_id=credential_id,
    )
    assert no_amd64.status_code == 422
    assert no_amd64.json()["code"] == "platform_not_supported"
    assert set(no_amd64.json()["platforms"]) == {"linux/arm64/v8", "linux/s390x"}

    arm64 = create(
        api,
        "arm64",
        ref(registry_token, "team/arm64-only"),
        credential_id=credential_id,
    )
    assert arm64.status_code == 422
    assert arm64.json()["code"] == "platform_not_supported"
    assert arm64.json()["platforms"][0].startswith("linux/arm64")

    # None of them became an App.
    names = {a["name"] for a in api.get("/v1/apps").json()["items"]}
    assert not names & {"missing", "no-amd64", "arm64"}
    rejected = api.get("/v1/events", params={"type": "AppCreateRejected"}).json()
    assert {e["data"]["code"] for e in rejected["items"]} >= {
        "image_not_found",
        "platform_not_supported",
    }


def test_a_token_that_cannot_read_the_image_is_rejected(
    api: httpx.Client, registry_token: LocalRegistry, images: Images
) -> None:
    nobody = save_credential(api, registry_token, "nobody", "nobody-pass")
    response = create(
        api,
        "no-access",
        ref(registry_token, "team/multi"),
        credential_id=nobody,
    )
    assert response.status_code == 422
    assert response.json()["code"] == "credential_rejected"
    assert response.json()["registry_message"]


def test_credentials_must_exist_in_the_account_and_match_the_registry(
    suite: Suite,
    api: httpx.Client,
    registry_token: LocalRegistry,
    registry_basic: LocalRegistry,
    images: Images,
) -> None:
    image = ref(registry_token, "team/multi")
    with suite.client(suite.new_account("other-team")) as other:
        theirs = save_credential(other, registry_token)
    foreign = create(api, "foreign", image, credential_id=theirs)
    assert foreign.status_code == 404
    assert foreign.json()["code"] == "credential_not_found"

    basic = save_credential(api, registry_basic)
    mismatch = create(api, "mismatch", image, credential_id=basic)
    assert mismatch.status_code == 422
    assert mismatch.json()["code"] == "credential_registry_mismatch"
    assert registry_basic.host in mismatch.json()["detail"]


def test_an_inline_credential_is_saved_verified_and_attached(
    api: httpx.Client, registry_token: LocalRegistry, images: Images
) -> None:
    response = create(
        api,
        "inline",
        ref(registry_token, "team/multi"),
        credential={"username": "alice", "secret": "alice-pass", "name": "inline-cred"},
    )
    assert response.status_code == 201, response.text
    credential_id = response.json()["credential_id"]
    saved = api.get(f"/v1/credentials/{credential_id}").json()
    assert saved["name"] == "inline-cred"
    assert saved["apps"] == [{"id": response.json()["id"], "name": "inline"}]

    rejected = create(
        api,
        "inline-bad",
        ref(registry_token, "team/multi"),
        credential={"username": "alice", "secret": "wrong"},
    )
    assert rejected.status_code == 422
    assert rejected.json()["code"] == "credential_rejected"


def test_app_names_are_unique_per_account(
    api: httpx.Client, registry_token: LocalRegistry, images: Images, credential_id: str
) -> None:
    image = ref(registry_token, "team/multi")
    assert create(api, "twin", image, credential_id=credential_id).status_code == 201
    again = create(api, "twin", image, credential_id=credential_id)
    assert again.status_code == 409
    assert again.json()["code"] == "app_name_taken"


def test_changing_the_credential_redeploys_and_frees_the_old_one(
    api: httpx.Client, registry_token: LocalRegistry, images: Images
) -> None:
    first = save_credential(api, registry_token, name="first")
    second = save_credential(api, registry_token, name="second")
    app = create(api, "switch", ref(registry_token, "team/multi"), credential_id=first)
    assert app.status_code == 201, app.text
    app_id = app.json()["id"]

    changed = api.patch(f"/v1/apps/{app_id}", json={"credential_id": second})
    assert changed.status_code == 200, changed.text
    assert changed.json()["credential_id"] == second
    assert changed.json()["current_deploy"]["reason"] == "credential_changed"
    assert api.get(f"/v1/credentials/{first}").json()["apps"] == []
    assert api.delete(f"/v1/credentials/{first}").status_code == 204

    in_use = api.delete(f"/v1/credentials/{second}")
    assert in_use.status_code == 409
    assert in_use.json()["apps"] == [{"id": app_id, "name": "switch"}]

    redeploy = api.post(f"/v1/apps/{app_id}/deploys")
    assert redeploy.status_code == 202
    assert redeploy.json()["reason"] == "redeploy"
    deploys = api.get(f"/v1/apps/{app_id}/deploys").json()["items"]
    assert [d["reason"] for d in deploys] == [
        "redeploy",
        "credential_changed",
        "create",
    ]

    # Deleting the App releases its credential and its name.
    assert api.delete(f"/v1/apps/{app_id}").status_code == 204
    assert api.get(f"/v1/apps/{app_id}").status_code == 404
    assert api.delete(f"/v1/credentials/{second}").status_code == 204
    again = create(api, "switch", ref(registry_token, "team/multi"))
    assert again.status_code in {201, 422}
    assert again.json().get("code") != "app_name_taken"


async def test_creating_an_app_races_deleting_its_credential(
    suite: Suite, token: str, registry_token: LocalRegistry, images: Images
) -> None:
    image = ref(registry_token, "team/multi")
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(
        base_url=suite.url, headers=headers, timeout=60
    ) as api:
        for round_ in range(50):
            credential = await api.post(
                "/v1/credentials",
                json={
                    "registry": registry_token.host,
                    "username": "alice",
                    "secret": "alice-pass",
                },
            )
            credential_id = credential.json()["id"]
            created, deleted = await asyncio.gather(
                api.post(
                    "/v1/apps",
                    json={
                        "name": f"race-{round_}",
                        "image": image,
                        "credential_id": credential_id,
                    },
                ),
                api.delete(f"/v1/credentials/{credential_id}"),
            )
            # Exactly one wins, and no App is left on a deleted credential.
            assert (created.status_code == 201) != (deleted.status_code == 204), (
                created.text,
                deleted.text,
            )
            if created.status_code == 201:
                assert deleted.json()["code"] == "credential_in_use"
                still = await api.get(f"/v1/credentials/{credential_id}")
                assert still.status_code == 200
            else:
                assert created.json()["code"] == "credential_not_found"
                apps = (await api.get("/v1/apps")).json()["items"]
                assert f"race-{round_}" not in {a["name"] for a in apps}
