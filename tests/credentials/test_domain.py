"""The Credential aggregate: given past events, when a command, then events."""

from datetime import UTC, datetime

import pytest

from contracts.events import (
    AppRef,
    CredentialAdded,
    CredentialAttached,
    CredentialDeleted,
    CredentialDeleteRefused,
    CredentialDetached,
    Event,
    SealedSecret,
)
from services.credentials.domain import (
    Credential,
    CredentialExistsError,
    CredentialNotFoundError,
    secret_hint,
)

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
SEALED = SealedSecret(key_version=1, nonce="bm9uY2U=", ciphertext="Y2lwaGVy")
WEB = AppRef(id="app_web", name="web")


def added(account: str = "acct_a") -> CredentialAdded:
    return CredentialAdded(
        credential_id="cred_1",
        account_id=account,
        name="ghcr",
        registry="ghcr.io",
        username="octocat",
        secret_hint="…9f2c",
        sealed_secret=SEALED,
        verified_at=NOW,
    )


def given(*events: Event) -> Credential:
    credential = Credential("cred_1")
    for position, event in enumerate(events, start=1):
        credential.apply(event, position, NOW, f"cmd_{position}")
    return credential


def test_adding_twice_is_refused() -> None:
    with pytest.raises(CredentialExistsError):
        given(added()).add(
            account_id="acct_a",
            name="n",
            registry="ghcr.io",
            username="u",
            hint="…",
            sealed=SEALED,
            verified_at=NOW,
            expires_at=None,
        )


def test_a_credential_in_use_refuses_deletion_and_names_its_apps() -> None:
    events = given(added(), CredentialAttached(credential_id="cred_1", app=WEB)).delete(
        "acct_a"
    )
    assert events == [CredentialDeleteRefused(credential_id="cred_1", apps=[WEB])]


def test_a_detached_credential_can_be_deleted() -> None:
    credential = given(
        added(),
        CredentialAttached(credential_id="cred_1", app=WEB),
        CredentialDetached(credential_id="cred_1", app_id="app_web"),
    )
    assert credential.delete("acct_a") == [CredentialDeleted(credential_id="cred_1")]


def test_attaching_to_a_deleted_credential_is_not_found() -> None:
    with pytest.raises(CredentialNotFoundError):
        given(added(), CredentialDeleted(credential_id="cred_1")).attach("acct_a", WEB)


def test_another_account_cannot_see_or_use_it() -> None:
    credential = given(added("acct_a"))
    with pytest.raises(CredentialNotFoundError):
        credential.attach("acct_b", WEB)
    with pytest.raises(CredentialNotFoundError):
        credential.delete("acct_b")
    assert credential.detach("acct_b", "app_web") == []


def test_attaching_the_same_app_again_records_nothing() -> None:
    credential = given(added(), CredentialAttached(credential_id="cred_1", app=WEB))
    assert credential.attach("acct_a", WEB) == []


def test_replay_tracks_version_and_commands() -> None:
    credential = given(added(), CredentialAttached(credential_id="cred_1", app=WEB))
    assert credential.version == 2
    assert credential.commands == {"cmd_1", "cmd_2"}


@pytest.mark.parametrize(
    ("secret", "hint"),
    [("short", "…"), ("ten-chars!", "…s!"), ("a" * 12 + "9f2c", "…9f2c")],
)
def test_the_hint_never_shows_much_of_a_short_secret(secret: str, hint: str) -> None:
    assert secret_hint(secret) == hint
