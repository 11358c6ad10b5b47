"""Deploys: private images pulled and booted as amd64 VMs, end to end."""

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import httpx
import pytest

from tests.support.registry import ADMIN, LocalRegistry, PushedImage, push_image
from tests.support.suite import Suite, isolated_suite

pytestmark = pytest.mark.vm

BUSYBOX = Path("/bin/busybox")
DEPLOY_TIMEOUT_S = 240


def static_busybox() -> bytes:
    described = subprocess.run(
        ["ldd", str(BUSYBOX)], capture_output=True, text=True, check=False
    )
    assert "not a dynamic executable" in described.stdout + described.stderr, (
        "the image needs the static busybox (Debian package busybox-static)"
    )
    return BUSYBOX.read_bytes()


def push_site(registry: LocalRegistry, repo: str, tag: str, page: str) -> PushedImage:
    return push_image(
        registry,
        repo,
        tag,
        username=ADMIN[0],
        password=ADMIN[1],
        files={"bin/busybox": static_busybox(), "www/index.html": page.encode()},
        config_extra={
            "Entrypoint": ["/bin/busybox"],
            "Cmd": ["httpd", "-f", "-p", "8080", "-h", "/www"],
            "ExposedPorts": {"8080/tcp": {}},
            "WorkingDir": "/www",
        },
    )


def wait_for_deploy(api: httpx.Client, deploy_id: str) -> dict[str, object]:
    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    while time.monotonic() < deadline:
        deploy: dict[str, object] = api.get(f"/v1/deploys/{deploy_id}").json()
        if deploy["status"] in {"succeeded", "failed"}:
            return deploy
        time.sleep(0.5)
    raise AssertionError(f"deploy {deploy_id} did not finish: {deploy}")


@pytest.fixture(scope="module")
def deploy_suite(
    request: pytest.FixtureRequest, registry_token: LocalRegistry
) -> Iterator[Suite]:
    """A suite of its own whose deployer runs VMs, on its own NATS."""
    with isolated_suite(request, registry_token) as suite:
        yield suite


@pytest.fixture(scope="module")
def api(deploy_suite: Suite) -> Iterator[httpx.Client]:
    with deploy_suite.client(deploy_suite.new_account("deploys")) as client:
        yield client


@pytest.fixture
def site_user(registry_token: LocalRegistry) -> Iterator[tuple[str, str]]:
    user = f"deployer-{uuid4().hex[:8]}"
    password = f"pw-{uuid4().hex}"
    registry_token.add_user(user, password)
    yield user, password


def test_an_app_boots_answers_and_survives_a_revoked_token(
    api: httpx.Client, registry_token: LocalRegistry, site_user: tuple[str, str]
) -> None:
    page = f"hello from {uuid4().hex}"
    pushed = push_site(registry_token, "team/site", "1.0", page)
    user, password = site_user
    credential = api.post(
        "/v1/credentials",
        json={"registry": registry_token.host, "username": user, "secret": password},
    ).json()
    created = api.post(
        "/v1/apps",
        json={
            "name": "site",
            "image": f"{registry_token.host}/team/site:1.0",
            "credential_id": credential["id"],
        },
    )
    assert created.status_code == 201, created.text
    app = created.json()

    # The first deploy needs no redeploy step: the App comes up by itself.
    deploy = wait_for_deploy(api, app["current_deploy"]["id"])
    assert deploy["status"] == "succeeded", deploy
    assert deploy["digest"] == pushed.digest
    stages = deploy["stages"]
    assert isinstance(stages, dict)
    assert {"pull_ms", "unpack_ms", "boot_ms", "bytes_fetched"} <= set(stages)
    running = api.get(f"/v1/apps/{app['id']}").json()
    assert running["status"] == "running"
    assert httpx.get(running["url"] + "/index.html", timeout=10).text == page

    # The registry revokes the token: the next deploy fails with its words.
    registry_token.add_user(user, f"rotated-{uuid4().hex}")
    failed = wait_for_deploy(
        api, api.post(f"/v1/apps/{app['id']}/deploys").json()["id"]
    )
    assert failed["status"] == "failed"
    error = failed["error"]
    assert isinstance(error, dict)
    assert error["code"] == "credential_rejected"
    assert error["stage"] == "pull"
    assert error["registry_status"] == 401
    assert error["registry_message"]
    assert "update the credential" in str(error["explanation"]).lower()
    # The VM of the last good deploy keeps serving meanwhile.
    assert httpx.get(running["url"] + "/index.html", timeout=10).text == page

    # Updating the credential makes the next deploy pull with the new secret.
    new_password = f"new-{uuid4().hex}"
    registry_token.add_user(user, new_password)
    patched = api.patch(
        f"/v1/credentials/{credential['id']}", json={"secret": new_password}
    )
    assert patched.status_code == 200, patched.text
    fixed = wait_for_deploy(api, api.post(f"/v1/apps/{app['id']}/deploys").json()["id"])
    assert fixed["status"] == "succeeded", fixed
    assert fixed["stages"]["bytes_fetched"] == 0  # type: ignore[index]
    url = api.get(f"/v1/apps/{app['id']}").json()["url"]
    assert url != running["url"]
    assert httpx.get(url + "/index.html", timeout=10).text == page
    with pytest.raises(httpx.HTTPError):
        httpx.get(running["url"] + "/index.html", timeout=3)

    # A tag moved to an arm64-only image fails the deploy, not silently.
    push_image(
        registry_token,
        "team/site",
        "1.0",
        username=ADMIN[0],
        password=ADMIN[1],
        platforms=(("linux", "arm64", "v8"),),
    )
    moved = wait_for_deploy(api, api.post(f"/v1/apps/{app['id']}/deploys").json()["id"])
    assert moved["status"] == "failed"
    assert moved["error"]["code"] == "platform_not_supported"  # type: ignore[index]

    # Deleting the App stops its VM.
    assert api.delete(f"/v1/apps/{app['id']}").status_code == 204
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/index.html", timeout=2)
        except httpx.HTTPError:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the deleted App's VM still answers")


def test_a_broken_image_fails_at_boot_with_the_console(
    deploy_suite: Suite,
    api: httpx.Client,
    registry_token: LocalRegistry,
    site_user: tuple[str, str],
) -> None:
    push_image(
        registry_token,
        "team/broken",
        "1.0",
        username=ADMIN[0],
        password=ADMIN[1],
        files={"www/index.html": b"no server here"},
        config_extra={"Entrypoint": ["/bin/missing-server"], "Cmd": None},
    )
    user, password = site_user
    created = api.post(
        "/v1/apps",
        json={
            "name": "broken",
            "image": f"{registry_token.host}/team/broken:1.0",
            "credential": {"username": user, "secret": password},
        },
    )
    assert created.status_code == 201, created.text
    deploy = wait_for_deploy(api, created.json()["current_deploy"]["id"])
    assert deploy["status"] == "failed"
    assert deploy["error"]["code"] == "boot_failed"  # type: ignore[index]
    assert deploy["error"]["stage"] == "boot"  # type: ignore[index]
    app = api.get(f"/v1/apps/{created.json()['id']}").json()
    assert app["status"] == "failed"

    # Ops read what the VM printed, kept per deploy.
    shown = subprocess.run(
        [sys.executable, "-m", "services.cli", "deploys", "console", deploy["id"]],
        env=deploy_suite.env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert "/bin/missing-server" in shown.stdout


def test_a_deployer_killed_mid_deploy_finishes_after_restart(
    deploy_suite: Suite,
    api: httpx.Client,
    registry_token: LocalRegistry,
    site_user: tuple[str, str],
) -> None:
    page = f"restarted {uuid4().hex}"
    push_site(registry_token, "team/restart", "1.0", page)
    user, password = site_user
    created = api.post(
        "/v1/apps",
        json={
            "name": "restart",
            "image": f"{registry_token.host}/team/restart:1.0",
            "credential": {"username": user, "secret": password},
        },
    )
    assert created.status_code == 201, created.text
    deploy_id = created.json()["current_deploy"]["id"]

    # Kill the deployer as soon as the deploy has started, then start it again.
    deadline = time.monotonic() + 60
    while api.get(f"/v1/deploys/{deploy_id}").json()["status"] == "queued":
        assert time.monotonic() < deadline, "the deploy never started"
        time.sleep(0.05)
    deploy_suite.kill("deployer")
    deploy_suite.start("deployer")

    deploy = wait_for_deploy(api, deploy_id)
    assert deploy["status"] == "succeeded", deploy
    url = api.get(f"/v1/apps/{created.json()['id']}").json()["url"]
    assert httpx.get(url + "/index.html", timeout=10).text == page


def test_stopping_the_deployer_stops_vms_and_starting_it_restores_them(
    deploy_suite: Suite,
    api: httpx.Client,
    registry_token: LocalRegistry,
    site_user: tuple[str, str],
) -> None:
    page = f"restored {uuid4().hex}"
    push_site(registry_token, "team/restore", "1.0", page)
    user, password = site_user
    created = api.post(
        "/v1/apps",
        json={
            "name": "restore",
            "image": f"{registry_token.host}/team/restore:1.0",
            "credential": {"username": user, "secret": password},
        },
    )
    assert created.status_code == 201, created.text
    app_id = created.json()["id"]
    assert wait_for_deploy(api, created.json()["current_deploy"]["id"])["status"] == (
        "succeeded"
    )
    url = api.get(f"/v1/apps/{app_id}").json()["url"]

    # A clean stop takes the VMs down with the deployer.
    deploy_suite.stop("deployer")
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/index.html", timeout=3)

    # On start, the Apps the log says were running come back by themselves.
    deploy_suite.start("deployer")
    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    while time.monotonic() < deadline:
        app = api.get(f"/v1/apps/{app_id}").json()
        current = app["current_deploy"]
        if current["reason"] == "restore" and current["status"] == "succeeded":
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the App was not restored: {app}")
    assert httpx.get(app["url"] + "/index.html", timeout=10).text == page
