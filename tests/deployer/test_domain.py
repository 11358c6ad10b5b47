"""The App aggregate and App names: given events, when a command, then events."""

import pytest

from contracts.events import (
    AppCreated,
    AppDeleted,
    AppNameClaimed,
    AppNameReleased,
    DeployRequested,
    Event,
)
from services.deployer.domain import (
    App,
    AppExistsError,
    AppName,
    AppNameTakenError,
    AppNotFoundError,
)

CREATED = AppCreated(
    app_id="app_1",
    account_id="acct_a",
    name="web",
    image="ghcr.io/team/web:1",
    digest="sha256:" + "a" * 64,
    credential_id="cred_1",
    port=8080,
)


def given(*events: Event) -> App:
    app = App("app_1")
    for position, event in enumerate(events, start=1):
        app.apply(event, position, f"cmd_{position}")
    return app


def create(app: App) -> list[Event]:
    return app.create(
        account_id="acct_a",
        name="web",
        image=CREATED.image,
        digest=CREATED.digest,
        platform_digest=None,
        credential_id="cred_1",
        port=8080,
        warnings=[],
        deploy_id="dep_1",
    )


def test_creating_records_the_app_and_queues_its_first_deploy() -> None:
    events = create(given())
    assert [type(e).__name__ for e in events] == ["AppCreated", "DeployRequested"]
    deploy = events[1]
    assert isinstance(deploy, DeployRequested)
    assert (deploy.reason, deploy.credential_id) == ("create", "cred_1")


def test_an_app_is_created_once() -> None:
    with pytest.raises(AppExistsError):
        create(given(CREATED))


def test_changing_the_credential_queues_a_redeploy_that_uses_it() -> None:
    events = given(CREATED).change_credential("acct_a", "cred_2", "sha256:b", "dep_2")
    assert events[0].previous_credential_id == "cred_1"  # type: ignore[attr-defined]
    assert events[1] == DeployRequested(
        deploy_id="dep_2",
        app_id="app_1",
        reason="credential_changed",
        credential_id="cred_2",
    )


def test_a_deleted_or_foreign_app_is_not_found() -> None:
    with pytest.raises(AppNotFoundError):
        given(CREATED, AppDeleted(app_id="app_1")).redeploy("acct_a", "dep_9")
    with pytest.raises(AppNotFoundError):
        given(CREATED).delete("acct_b")


def test_a_name_has_one_holder_until_released() -> None:
    holder = AppName("k")
    holder.apply(AppNameClaimed(account_id="a", name="web", app_id="app_1"), 1)
    assert holder.claim("a", "web", "app_1") == []
    with pytest.raises(AppNameTakenError):
        holder.claim("a", "web", "app_2")
    assert holder.release("a", "web", "app_2") == []
    holder.apply(AppNameReleased(account_id="a", name="web", app_id="app_1"), 2)
    assert holder.claim("a", "web", "app_2") == [
        AppNameClaimed(account_id="a", name="web", app_id="app_2")
    ]
