"""Credentials handlers on a real JetStream, with a scripted verifier."""

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from uuid import uuid4

import nats
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nats.aio.client import Client as NATS
from nats.js.errors import NoKeysError
from nats.js.kv import KeyValue

from contracts.commands import (
    AddCredential,
    AttachCredential,
    DeleteCredential,
    DetachCredential,
    ResolveCredential,
    UpdateCredential,
    VerifyCredential,
)
from contracts.errors import RegistryError
from contracts.replies import Verification
from services.backbone.eventlog import EventLog
from services.credentials.handlers import CredentialsHandlers
from services.credentials.sealing import DataKeyStore, MasterKeyring

ACCOUNT = "acct_handlers"


class ScriptedVerifier:
    """Accepts one secret per username, as a registry would."""

    def __init__(self) -> None:
        self.valid: dict[str, str] = {}
        self.calls: list[VerifyCredential] = []

    async def __call__(self, command: VerifyCredential) -> Verification:
        self.calls.append(command)
        if self.valid.get(command.username) == command.secret.get_secret_value():
            return Verification(outcome="accepted", registry=command.registry)
        return Verification(
            outcome="rejected",
            registry=command.registry,
            error=RegistryError(
                code="credential_rejected",
                registry=command.registry,
                registry_status=401,
                registry_code="UNAUTHORIZED",
                registry_message="authentication required",
                explanation="Check the username and token.",
            ),
        )


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    client = await nats.connect(nats_url)
    yield client
    await client.drain()


@pytest.fixture
def verifier() -> ScriptedVerifier:
    scripted = ScriptedVerifier()
    scripted.valid["alice"] = "first-secret-0001"
    return scripted


@pytest.fixture
def bucket() -> str:
    """A key bucket of the test's own: each test has its own master key."""
    return f"test_keys_{uuid4().hex}"


@pytest.fixture
async def handlers(
    nc: NATS, verifier: ScriptedVerifier, tmp_path: Path, bucket: str
) -> CredentialsHandlers:
    events = EventLog(nc)
    await events.ensure_stream()
    ring = MasterKeyring.load_or_create(tmp_path / "master.key")
    store = await DataKeyStore.open(nc, ring, bucket=bucket)
    return CredentialsHandlers(events, store, verifier)


def add_command(secret: str = "first-secret-0001") -> AddCredential:
    return AddCredential(
        account_id=ACCOUNT,
        actor=ACCOUNT,
        registry="registry.example",
        username="alice",
        secret=secret,  # type: ignore[arg-type]
    )


async def resolve(handlers: CredentialsHandlers, credential_id: str) -> str | None:
    reply = await handlers.resolve_credential(
        ResolveCredential(
            account_id=ACCOUNT, actor="deployer", credential_id=credential_id
        )
    )
    return reply.secret.get_secret_value() if reply.secret else None


async def test_a_retried_add_records_one_event(handlers: CredentialsHandlers) -> None:
    command = add_command()
    first, second = await asyncio.gather(
        handlers.add_credential(command), handlers.add_credential(command)
    )
    assert first.ok and second.ok
    assert first.credential == second.credential
    loaded = await handlers._events.load("credential", command.credential_id)
    assert [stored.envelope.type for stored in loaded] == ["CredentialAdded"]


async def test_the_master_key_file_is_private(tmp_path: Path) -> None:
    MasterKeyring.load_or_create(tmp_path / "keys" / "master.key")
    assert (tmp_path / "keys" / "master.key").stat().st_mode & 0o777 == 0o600


async def test_an_update_is_verified_and_resolved_at_use(
    handlers: CredentialsHandlers, verifier: ScriptedVerifier
) -> None:
    added = await handlers.add_credential(add_command())
    assert added.credential is not None
    credential_id = added.credential.id
    assert await resolve(handlers, credential_id) == "first-secret-0001"

    # A rejected secret leaves the old one in force and says why.
    refused = await handlers.update_credential(
        UpdateCredential(
            account_id=ACCOUNT,
            actor=ACCOUNT,
            credential_id=credential_id,
            secret="wrong-secret-0002",  # type: ignore[arg-type]
        )
    )
    assert not refused.ok and refused.failure
    assert refused.failure.code == "credential_rejected"
    assert await resolve(handlers, credential_id) == "first-secret-0001"

    # An accepted one replaces it for the next use.
    verifier.valid["alice"] = "second-secret-0003"
    updated = await handlers.update_credential(
        UpdateCredential(
            account_id=ACCOUNT,
            actor=ACCOUNT,
            credential_id=credential_id,
            secret="second-secret-0003",  # type: ignore[arg-type]
        )
    )
    assert updated.ok and updated.credential
    assert updated.credential.secret_hint == "…0003"
    assert await resolve(handlers, credential_id) == "second-secret-0003"


async def test_delete_races_attach_and_never_strands_an_app(
    handlers: CredentialsHandlers,
) -> None:
    for round_ in range(50):
        added = await handlers.add_credential(add_command())
        assert added.credential is not None
        credential_id = added.credential.id
        attach, delete = await asyncio.gather(
            handlers.attach_credential(
                AttachCredential(
                    account_id=ACCOUNT,
                    actor=ACCOUNT,
                    credential_id=credential_id,
                    app_id=f"app_{round_}",
                    app_name=f"web-{round_}",
                )
            ),
            handlers.delete_credential(
                DeleteCredential(
                    account_id=ACCOUNT, actor=ACCOUNT, credential_id=credential_id
                )
            ),
        )
        state = await handlers.load(credential_id)
        # Exactly one wins: an attached App keeps a live credential.
        assert attach.ok != delete.ok, (attach, delete)
        if attach.ok:
            assert state.live and f"app_{round_}" in state.apps
            assert delete.failure and delete.failure.code == "credential_in_use"
        else:
            assert state.deleted and not state.apps
            assert attach.failure and attach.failure.code == "credential_not_found"


async def test_deleting_shreds_the_secret_left_in_the_log(
    handlers: CredentialsHandlers, nc: NATS, tmp_path: Path, bucket: str
) -> None:
    added = await handlers.add_credential(add_command())
    assert added.credential is not None
    credential_id = added.credential.id
    attached = AttachCredential(
        account_id=ACCOUNT,
        actor=ACCOUNT,
        credential_id=credential_id,
        app_id="app_x",
        app_name="x",
    )
    await handlers.attach_credential(attached)
    refused = await handlers.delete_credential(
        DeleteCredential(account_id=ACCOUNT, actor=ACCOUNT, credential_id=credential_id)
    )
    assert refused.failure and refused.failure.code == "credential_in_use"
    assert refused.failure.apps and refused.failure.apps[0].name == "x"
    await handlers.detach_credential(
        DetachCredential(
            account_id=ACCOUNT,
            actor=ACCOUNT,
            credential_id=credential_id,
            app_id="app_x",
        )
    )
    deleted = await handlers.delete_credential(
        DeleteCredential(account_id=ACCOUNT, actor=ACCOUNT, credential_id=credential_id)
    )
    assert deleted.ok
    loaded = await handlers._events.load("credential", credential_id)
    assert [s.envelope.type for s in loaded] == [
        "CredentialAdded",
        "CredentialAttached",
        "CredentialDeleteRefused",
        "CredentialDetached",
        "CredentialDeleted",
    ]

    # The sealed secret is still in the log, and no key the system holds opens it.
    sealed = loaded[0].envelope.data["sealed_secret"]
    kv = await nc.jetstream().key_value(bucket)
    keys = []
    names = await kv.keys() if await _has_keys(kv) else []
    for name in names:
        entry = await kv.get(name)
        assert entry.value is not None
        record = json.loads(entry.value)
        keys.append(base64.b64decode(record["key"]))  # wrapped data keys
    ring = MasterKeyring.load_or_create(tmp_path / "master.key")
    keys.extend(ring.keys.values())
    assert not any(name.startswith(credential_id) for name in names)
    for key in keys:
        with pytest.raises((InvalidTag, ValueError)):
            AESGCM(key[:32].ljust(32, b"\0")).decrypt(
                base64.b64decode(sealed["nonce"]),
                base64.b64decode(sealed["ciphertext"]),
                credential_id.encode(),
            )
    assert await resolve(handlers, credential_id) is None


async def test_a_rotated_master_key_rewraps_live_keys(
    handlers: CredentialsHandlers, nc: NATS, tmp_path: Path, bucket: str
) -> None:
    added = await handlers.add_credential(add_command())
    assert added.credential is not None
    old_ring = MasterKeyring.load_or_create(tmp_path / "master.key")
    new_ring = old_ring.rotated()
    store = await DataKeyStore.open(nc, old_ring, bucket=bucket)
    assert await store.rewrap_all(new_ring) >= 1

    # Only the new master key is needed now; the log was not touched.
    only_new = MasterKeyring({new_ring.active_version: new_ring.keys[2]})
    reader = CredentialsHandlers(
        handlers._events,
        await DataKeyStore.open(nc, only_new, bucket=bucket),
        ScriptedVerifier(),
    )
    assert await resolve(reader, added.credential.id) == "first-secret-0001"


async def _has_keys(kv: KeyValue) -> bool:
    try:
        await kv.keys()
    except NoKeysError:
        return False
    return True
