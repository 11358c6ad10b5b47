"""Saving a registry credential, end to end through the gateway."""

import asyncio
import json
import threading
import time

import httpx
import nats
import pytest
from sqlalchemy import create_engine, text

from contracts.subjects import EVENT_STREAM
from tests.support.registry import LocalRegistry
from tests.support.suite import Suite, free_port

PROBLEM = "application/problem+json"


def add(api: httpx.Client, registry: str, username: str, secret: str) -> httpx.Response:
    return api.post(
        "/v1/credentials",
        json={"registry": registry, "username": username, "secret": secret},
    )


@pytest.mark.parametrize("fixture", ["registry_basic", "registry_token"])
def test_an_accepted_credential_is_saved_without_its_secret(
    api: httpx.Client, fixture: str, request: pytest.FixtureRequest
) -> None:
    registry: LocalRegistry = request.getfixturevalue(fixture)
    response = add(api, registry.host, "alice", "alice-pass")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["registry"] == registry.host
    assert body["username"] == "alice"
    assert body["secret_hint"] == "…ss"  # 10 characters: two shown
    assert "secret" not in body and "alice-pass" not in response.text
    assert body["apps"] == []

    # Read your writes: the list and the item show it at once.
    listed = api.get("/v1/credentials").json()["items"]
    assert body["id"] in [item["id"] for item in listed]
    assert api.get(f"/v1/credentials/{body['id']}").json() == body


@pytest.mark.parametrize("fixture", ["registry_basic", "registry_token"])
def test_a_wrong_token_is_rejected_with_the_registrys_message(
    api: httpx.Client, fixture: str, request: pytest.FixtureRequest
) -> None:
    registry: LocalRegistry = request.getfixturevalue(fixture)
    before = api.get("/v1/credentials").json()["items"]
    response = add(api, registry.host, "alice", "not-the-password")
    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["code"] == "credential_rejected"
    assert body["registry_status"] == 401
    assert body["registry_message"]
    assert registry.host in body["detail"] or "username" in body["detail"].lower()
    assert api.get("/v1/credentials").json()["items"] == before


def test_an_unreachable_registry_is_named_within_bounded_time(
    api: httpx.Client,
) -> None:
    host = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    response = add(api, host, "alice", "alice-pass")
    assert time.monotonic() - started < 15
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "registry_unreachable"
    assert host in body["detail"]


@pytest.mark.parametrize(
    "host", ["https://ghcr.io", "ghcr.io/team", "bad host", "a..b", "x:99999", ""]
)
def test_a_malformed_registry_host_is_refused(api: httpx.Client, host: str) -> None:
    response = add(api, host, "alice", "alice-pass")
    assert response.status_code == 422
    assert response.json()["code"] in {"invalid_registry", "invalid_request"}
    assert response.json()["detail"]


def test_another_accounts_credential_does_not_exist(
    suite: Suite, api: httpx.Client, registry_basic: LocalRegistry
) -> None:
    saved = add(api, registry_basic.host, "alice", "alice-pass").json()
    with suite.client(suite.new_account("team-b")) as other:
        response = other.get(f"/v1/credentials/{saved['id']}")
        assert response.status_code == 404
        assert response.json()["code"] == "credential_not_found"
        assert saved["id"] not in other.get("/v1/credentials").text


@pytest.mark.parametrize("header", [None, "Bearer nope", "Basic abc"])
def test_requests_without_a_valid_token_are_unauthorized(
    suite: Suite, header: str | None
) -> None:
    headers = {"Authorization": header} if header else {}
    response = httpx.get(f"{suite.url}/v1/credentials", headers=headers)
    assert response.status_code == 401
    assert response.json()["code"] == "unauthorized"


async def test_the_secret_appears_nowhere_but_sealed(
    suite: Suite, api: httpx.Client, registry_token: LocalRegistry, database_url: str
) -> None:
    secret = "tok-" + "7f3a9c2e5b1d" * 3
    registry_token.add_user("carol", secret)
    response = await asyncio.to_thread(add, api, registry_token.host, "carol", secret)
    assert response.status_code == 201, response.text
    rejected = await asyncio.to_thread(
        add, api, registry_token.host, "carol", secret + "-wrong"
    )
    assert rejected.status_code == 422
    audit = await asyncio.to_thread(api.get, "/v1/events", params={"limit": 1000})
    needles = [secret, secret[-12:]]
    for text_ in (response.text, rejected.text, audit.text, suite.log_text()):
        assert not any(needle in text_ for needle in needles)

    # Every raw message in the stream, headers and body.
    nc = await nats.connect(suite.settings.nats_url)
    js = nc.jetstream()
    info = await js.stream_info(EVENT_STREAM)
    raw_log = b""
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        message = await js.get_msg(EVENT_STREAM, seq)
        raw_log += (message.data or b"") + str(message.headers).encode()
    await nc.drain()
    assert secret.encode() not in raw_log
    assert b"sealed_secret" in raw_log

    # Every text column of every table in the read model.
    engine = create_engine(database_url)
    with engine.connect() as conn:
        tables = conn.execute(
            text("select tablename from pg_tables where schemaname = 'public'")
        ).scalars()
        for table in list(tables):
            dump = conn.execute(text(f'select t::text from "{table}" t')).scalars()
            assert not any(secret in row for row in dump), table
    engine.dispose()


def test_rejections_are_in_the_audit_log(
    api: httpx.Client, registry_basic: LocalRegistry
) -> None:
    add(api, registry_basic.host, "alice", "wrong-again")
    events = api.get("/v1/events", params={"type": "CredentialRejected"}).json()
    assert events["items"], events
    last = events["items"][-1]
    assert last["data"]["error"]["code"] == "credential_rejected"
    assert last["data"]["username"] == "alice"


async def test_a_malformed_command_is_answered_without_quoting_it(suite: Suite) -> None:
    secret = "leaky-" + "5e6f7a8b" * 3
    nc = await nats.connect(suite.settings.nats_url)
    try:
        reply = await nc.request(
            "crabglamp.cmd.credentials.add",
            json.dumps({"secret": secret, "registry": 7}).encode(),
            timeout=10,
        )
    finally:
        await nc.drain()
    body = json.loads(reply.data)
    assert body["ok"] is False
    assert body["failure"]["code"] == "invalid_request"
    assert "registry" in body["failure"]["detail"]
    assert secret not in reply.data.decode()
    await asyncio.sleep(0.2)
    assert secret not in suite.log_text()


def test_the_dashboard_offers_credentials_and_app_vms(suite: Suite) -> None:
    page = httpx.get(f"{suite.url}/", timeout=10)
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    for words in (
        "Registry credentials",
        "Add credential",
        "Create App VM",
        "Registry credential",
        "Configuration",
        "Redeploy",
    ):
        assert words in page.text


def test_the_audit_log_streams_live_as_server_sent_events(
    suite: Suite, api: httpx.Client, registry_basic: LocalRegistry
) -> None:
    start = api.get("/v1/events", params={"limit": 1000}).json()["next"]
    headers = {"Authorization": api.headers["Authorization"]}
    url = f"{suite.url}/v1/events/stream"
    with httpx.stream(
        "GET", url, params={"after": start}, headers=headers, timeout=30
    ) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        # Something happens after the stream opened: it arrives live.
        threading.Timer(
            0.5, add, (api, registry_basic.host, "alice", "wrong-live")
        ).start()
        seen: dict[str, str] = {}
        for line in stream.iter_lines():
            if line.startswith(("id:", "event:", "data:")):
                key, _, value = line.partition(":")
                seen[key] = value.strip()
            if seen.get("event") == "CredentialRejected" and "data" in seen:
                break
    assert int(seen["id"]) > start
    assert json.loads(seen["data"])["data"]["username"] == "alice"
    assert "wrong-live" not in seen["data"]
