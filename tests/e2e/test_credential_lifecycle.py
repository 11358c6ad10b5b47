"""Changing, attaching and deleting a credential, and the audit log that follows."""

import asyncio
import hashlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, TypeVar
from uuid import uuid4

import httpx
import nats
import pytest
from pydantic import BaseModel
from sqlalchemy import create_engine, text

from contracts import subjects
from contracts.commands import AttachCredential, DetachCredential, ResolveCredential
from contracts.replies import CredentialReply, ResolvedCredential
from tests.support.registry import LocalRegistry
from tests.support.suite import Suite

PROBLEM = "application/problem+json"
WAIT_S = 10.0

R = TypeVar("R", bound=BaseModel)
T = TypeVar("T")


def new_user(registry: LocalRegistry) -> tuple[str, str]:
    """A user of its own at the registry, so tests never share a password."""
    name, password = f"user-{uuid4().hex[:8]}", f"pass-{uuid4().hex}"
    registry.add_user(name, password)
    return name, password


def add(
    api: httpx.Client, registry: LocalRegistry, username: str, secret: str
) -> dict[str, Any]:
    response = api.post(
        "/v1/credentials",
        json={"registry": registry.host, "username": username, "secret": secret},
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def send(suite: Suite, subject: str, command: BaseModel, reply_type: type[R]) -> R:
    """One NATS request to a service, on a loop of its own."""

    async def exchange() -> bytes:
        nc = await nats.connect(suite.settings.nats_url)
        try:
            message = await nc.request(
                subject, command.model_dump_json().encode(), timeout=WAIT_S
            )
        finally:
            await nc.drain()
        return message.data

    with ThreadPoolExecutor(1) as pool:
        data = pool.submit(asyncio.run, exchange()).result()
    return reply_type.model_validate_json(data)


def account_of(database_url: str, token: str) -> str:
    digest = hashlib.sha256(token.encode()).hexdigest()
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            found = conn.execute(
                text("select id from accounts where token_sha256 = :digest"),
                {"digest": digest},
            )
            return str(found.scalar_one())
    finally:
        engine.dispose()


def resolve(suite: Suite, account_id: str, credential_id: str) -> ResolvedCredential:
    command = ResolveCredential(
        account_id=account_id, actor=account_id, credential_id=credential_id
    )
    return send(suite, subjects.RESOLVE_CREDENTIAL, command, ResolvedCredential)


def poll(fetch: Callable[[], T], done: Callable[[T], bool]) -> T:
    """Fetch until ``done`` holds or the wait runs out; return the last fetch."""
    deadline = time.monotonic() + WAIT_S
    value = fetch()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.1)
        value = fetch()
    return value


def instant(value: str) -> datetime:
    return datetime.fromisoformat(value)


@pytest.fixture(scope="module")
def account_id(database_url: str, token: str) -> str:
    return account_of(database_url, token)


@pytest.fixture
def fresh(suite: Suite) -> Iterator[tuple[str, httpx.Client]]:
    """A new account with nothing in it yet, and a client holding its token."""
    token = suite.new_account(f"fresh-{uuid4().hex[:8]}")
    with suite.client(token) as client:
        yield token, client


# Updating a credential


def test_a_rejected_new_secret_leaves_the_old_one_in_force(
    suite: Suite, api: httpx.Client, registry_token: LocalRegistry, account_id: str
) -> None:
    username, password = new_user(registry_token)
    saved = add(api, registry_token, username, password)

    response = api.patch(
        f"/v1/credentials/{saved['id']}", json={"secret": "not-" + password}
    )
    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["code"] == "credential_rejected"
    assert problem["registry_message"]
    assert password not in response.text

    # The credential as read and as resolved for a pull is still the old one.
    assert api.get(f"/v1/credentials/{saved['id']}").json() == saved
    resolved = resolve(suite, account_id, saved["id"])
    assert resolved.ok and resolved.secret is not None
    assert resolved.secret.get_secret_value() == password


def test_renaming_re_verifies_the_secret_in_force(
    api: httpx.Client, registry_token: LocalRegistry
) -> None:
    username, password = new_user(registry_token)
    saved = add(api, registry_token, username, password)
    rejected = api.patch(f"/v1/credentials/{saved['id']}", json={"secret": "nope"})
    assert rejected.status_code == 422

    response = api.patch(f"/v1/credentials/{saved['id']}", json={"name": "renamed"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["name"] == "renamed"
    assert body["secret_hint"] == saved["secret_hint"]
    assert instant(body["verified_at"]) > instant(saved["verified_at"])


def test_a_rotated_secret_replaces_the_old_one(
    suite: Suite, api: httpx.Client, registry_token: LocalRegistry, account_id: str
) -> None:
    username, old = new_user(registry_token)
    saved = add(api, registry_token, username, old)
    new = f"rotated-{uuid4().hex}"
    registry_token.add_user(username, new)

    response = api.patch(f"/v1/credentials/{saved['id']}", json={"secret": new})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["secret_hint"] == "…" + new[-4:]
    assert instant(body["updated_at"]) > instant(saved["updated_at"])
    assert body["created_at"] == saved["created_at"]
    assert new not in response.text
    assert api.get(f"/v1/credentials/{saved['id']}").json() == body

    resolved = resolve(suite, account_id, saved["id"])
    assert resolved.secret is not None
    assert resolved.secret.get_secret_value() == new


def test_a_new_username_is_verified_together_with_the_secret(
    suite: Suite, api: httpx.Client, registry_token: LocalRegistry, account_id: str
) -> None:
    first, first_password = new_user(registry_token)
    second, second_password = new_user(registry_token)
    saved = add(api, registry_token, first, first_password)

    # The second user's name with the first user's password is not a login.
    refused = api.patch(f"/v1/credentials/{saved['id']}", json={"username": second})
    assert refused.status_code == 422
    assert refused.json()["code"] == "credential_rejected"
    assert api.get(f"/v1/credentials/{saved['id']}").json()["username"] == first

    change = {"username": second, "secret": second_password}
    response = api.patch(f"/v1/credentials/{saved['id']}", json=change)
    assert response.status_code == 200, response.text
    assert response.json()["username"] == second
    resolved = resolve(suite, account_id, saved["id"])
    assert resolved.username == second
    assert resolved.secret is not None
    assert resolved.secret.get_secret_value() == second_password


def test_a_secret_revoked_at_the_registry_fails_re_verification(
    api: httpx.Client, registry_token: LocalRegistry
) -> None:
    username, password = new_user(registry_token)
    saved = add(api, registry_token, username, password)
    registry_token.add_user(username, f"rotated-{uuid4().hex}")

    response = api.patch(f"/v1/credentials/{saved['id']}", json={"name": "renamed"})
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "credential_rejected"
    assert api.get(f"/v1/credentials/{saved['id']}").json()["name"] == saved["name"]


def test_updating_an_unknown_credential_is_not_found(api: httpx.Client) -> None:
    response = api.patch("/v1/credentials/cred_missing", json={"name": "x"})
    assert response.status_code == 404
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["code"] == "credential_not_found"


def test_updating_another_accounts_credential_is_not_found(
    api: httpx.Client,
    registry_token: LocalRegistry,
    fresh: tuple[str, httpx.Client],
) -> None:
    username, password = new_user(registry_token)
    saved = add(api, registry_token, username, password)
    _, other = fresh

    response = other.patch(f"/v1/credentials/{saved['id']}", json={"name": "mine"})
    assert response.status_code == 404
    assert response.json()["code"] == "credential_not_found"
    assert api.get(f"/v1/credentials/{saved['id']}").json() == saved


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"colour": "red"}, "colour"),
        ({"username": "team:bot"}, "username"),
        ({"secret": "   "}, "secret"),
        ({"name": " padded"}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"username": 7}, "username"),
    ],
)
def test_an_invalid_change_names_the_field(
    api: httpx.Client, registry_token: LocalRegistry, change: dict[str, Any], field: str
) -> None:
    username, password = new_user(registry_token)
    saved = add(api, registry_token, username, password)

    response = api.patch(f"/v1/credentials/{saved['id']}", json=change)
    assert response.status_code == 422
    problem = response.json()
    assert problem["code"] == "invalid_request"
    assert field in problem["detail"]
    assert [error["field"] for error in problem["errors"]] == [field]
    assert api.get(f"/v1/credentials/{saved['id']}").json() == saved


# Deleting a credential


def test_a_deleted_credential_is_gone(
    suite: Suite, api: httpx.Client, registry_token: LocalRegistry, account_id: str
) -> None:
    username, password = new_user(registry_token)
    saved = add(api, registry_token, username, password)

    assert api.delete(f"/v1/credentials/{saved['id']}").status_code == 204
    missing = api.get(f"/v1/credentials/{saved['id']}")
    assert missing.status_code == 404
    assert missing.json()["code"] == "credential_not_found"
    assert saved["id"] not in [
        item["id"] for item in api.get("/v1/credentials").json()["items"]
    ]
    again = api.delete(f"/v1/credentials/{saved['id']}")
    assert again.status_code == 404
    assert again.json()["code"] == "credential_not_found"

    # Nothing can pull with it any more.
    resolved = resolve(suite, account_id, saved["id"])
    assert not resolved.ok and resolved.secret is None
    assert resolved.failure is not None
    assert resolved.failure.code == "credential_not_found"


def test_deleting_another_accounts_credential_is_not_found(
    api: httpx.Client,
    registry_token: LocalRegistry,
    fresh: tuple[str, httpx.Client],
) -> None:
    username, password = new_user(registry_token)
    saved = add(api, registry_token, username, password)
    _, other = fresh

    response = other.delete(f"/v1/credentials/{saved['id']}")
    assert response.status_code == 404
    assert response.json()["code"] == "credential_not_found"
    assert api.get(f"/v1/credentials/{saved['id']}").status_code == 200


def test_a_credential_in_use_is_kept_until_its_app_lets_go(
    suite: Suite, api: httpx.Client, registry_token: LocalRegistry, account_id: str
) -> None:
    username, password = new_user(registry_token)
    saved = add(api, registry_token, username, password)
    path = f"/v1/credentials/{saved['id']}"
    attach = AttachCredential(
        account_id=account_id,
        actor=account_id,
        credential_id=saved["id"],
        app_id="app_x",
        app_name="web",
    )
    attached = send(suite, subjects.ATTACH_CREDENTIAL, attach, CredentialReply)
    assert attached.ok, attached.failure
    web = {"id": "app_x", "name": "web"}
    shown = poll(lambda: api.get(path).json(), lambda body: body["apps"] != [])
    assert shown["apps"] == [web]

    response = api.delete(path)
    assert response.status_code == 409
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["code"] == "credential_in_use"
    assert problem["apps"] == [web]
    assert "web" in problem["detail"]
    assert api.get(path).status_code == 200

    # The refusal is on the record, naming the App.
    refusals = poll(
        lambda: api.get(
            "/v1/events",
            params={"type": "CredentialDeleteRefused", "subject": _subject(saved)},
        ).json()["items"],
        lambda items: items != [],
    )
    assert [event["data"]["apps"] for event in refusals] == [[web]]

    detach = DetachCredential(
        account_id=account_id,
        actor=account_id,
        credential_id=saved["id"],
        app_id="app_x",
    )
    detached = send(suite, subjects.DETACH_CREDENTIAL, detach, CredentialReply)
    assert detached.ok, detached.failure
    released = poll(lambda: api.get(path).json(), lambda body: body["apps"] == [])
    assert released["apps"] == []
    assert api.delete(path).status_code == 204


def test_another_account_cannot_attach_a_credential(
    suite: Suite,
    database_url: str,
    api: httpx.Client,
    registry_token: LocalRegistry,
    fresh: tuple[str, httpx.Client],
) -> None:
    username, password = new_user(registry_token)
    saved = add(api, registry_token, username, password)
    intruder = account_of(database_url, fresh[0])
    attach = AttachCredential(
        account_id=intruder,
        actor=intruder,
        credential_id=saved["id"],
        app_id="app_theirs",
        app_name="theirs",
    )

    reply = send(suite, subjects.ATTACH_CREDENTIAL, attach, CredentialReply)
    assert not reply.ok
    assert reply.failure is not None
    assert reply.failure.code == "credential_not_found"
    assert api.delete(f"/v1/credentials/{saved['id']}").status_code == 204


def _subject(credential: dict[str, Any]) -> str:
    return subjects.aggregate_subject("credential", credential["id"])


# The audit log


def pages(client: httpx.Client, limit: int) -> list[dict[str, Any]]:
    """Every page of the account's audit log, following ``next``."""
    found: list[dict[str, Any]] = []
    after = 0
    while True:
        page = client.get("/v1/events", params={"after": after, "limit": limit})
        assert page.status_code == 200, page.text
        body = page.json()
        if not body["items"]:
            assert body["next"] == after
            return found
        assert len(body["items"]) <= limit
        assert body["next"] == body["items"][-1]["position"]
        found.extend(body["items"])
        after = body["next"]


def keys_in(value: object) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {key for item in value.values() for key in keys_in(item)}
    if isinstance(value, list):
        return {key for item in value for key in keys_in(item)}
    return set()


def test_the_audit_log_pages_oldest_first(
    registry_token: LocalRegistry, fresh: tuple[str, httpx.Client]
) -> None:
    _, client = fresh
    username, password = new_user(registry_token)
    saved = add(client, registry_token, username, password)
    client.patch(f"/v1/credentials/{saved['id']}", json={"secret": "wrong"})
    client.patch(f"/v1/credentials/{saved['id']}", json={"name": "renamed"})
    client.delete(f"/v1/credentials/{saved['id']}")

    events = pages(client, limit=2)
    assert [event["type"] for event in events] == [
        "AccountCreated",
        "CredentialAdded",
        "CredentialRejected",
        "CredentialUpdated",
        "CredentialDeleted",
    ]
    positions = [event["position"] for event in events]
    assert positions == sorted(set(positions))
    moments = [instant(event["occurred_at"]) for event in events]
    assert moments == sorted(moments)
    assert client.get("/v1/events", params={"limit": 1000}).json()["items"] == events


def test_the_audit_log_holds_only_the_accounts_own_events(
    suite: Suite,
    database_url: str,
    registry_token: LocalRegistry,
    fresh: tuple[str, httpx.Client],
) -> None:
    token, client = fresh
    mine = add(client, registry_token, *new_user(registry_token))
    with suite.client(suite.new_account(f"other-{uuid4().hex[:8]}")) as other:
        theirs = add(other, registry_token, *new_user(registry_token))
        assert mine["id"] not in other.get("/v1/events").text

    me = account_of(database_url, token)
    events = pages(client, limit=1000)
    assert theirs["id"] not in str(events)
    assert {event["subject"] for event in events} == {
        subjects.aggregate_subject("account", me),
        _subject(mine),
    }
    assert {event["actor"] for event in events} <= {me, "cli"}


def test_the_audit_log_shows_no_sealed_secret_or_token_digest(
    registry_token: LocalRegistry, fresh: tuple[str, httpx.Client]
) -> None:
    token, client = fresh
    username, password = new_user(registry_token)
    saved = add(client, registry_token, username, password)
    rotated = f"rotated-{uuid4().hex}"
    registry_token.add_user(username, rotated)
    client.patch(f"/v1/credentials/{saved['id']}", json={"secret": rotated})

    response = client.get("/v1/events", params={"limit": 1000})
    events = response.json()["items"]
    assert {"AccountCreated", "CredentialAdded", "CredentialUpdated"} <= {
        event["type"] for event in events
    }
    assert keys_in(events).isdisjoint({"sealed_secret", "token_sha256"})
    digest = hashlib.sha256(token.encode()).hexdigest()
    for needle in (digest, token, password, rotated):
        assert needle not in response.text
