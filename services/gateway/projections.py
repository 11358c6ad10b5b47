"""Projectors that build the gateway's read model from the event log."""

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Table, cast, delete, update
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.ext.asyncio import AsyncConnection

from contracts.events import (
    AccountCreated,
    AppCreated,
    AppCredentialChanged,
    AppDeleted,
    AppStopped,
    CredentialAdded,
    CredentialAttached,
    CredentialDeleted,
    CredentialDetached,
    CredentialUpdated,
    DeployFailed,
    DeployRequested,
    DeployStarted,
    DeploySucceeded,
    ImagePulled,
    VmBooted,
    parse_event,
)
from contracts.subjects import aggregate_subject
from services.backbone.eventlog import StoredEvent
from services.gateway.readmodel import (
    READ_MODEL_TABLES,
    accounts,
    apps,
    audit_events,
    credential_apps,
    credentials,
    deploys,
)

# Fields that stay in the log but never reach a reader of the audit log.
REDACTED_FIELDS = frozenset({"sealed_secret", "token_sha256"})


def redact(data: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if key not in REDACTED_FIELDS}


class ReadModelProjector:
    """Accounts, credentials with their Apps, and the per-account audit log."""

    name = "read_model"
    tables: Sequence[Table] = READ_MODEL_TABLES

    async def project(self, conn: AsyncConnection, stored: StoredEvent) -> None:
        envelope = stored.envelope
        event = parse_event(envelope.type, envelope.data)
        if event is None:
            return
        at = envelope.occurred_at
        match event:
            case AccountCreated():
                await conn.execute(
                    insert(accounts)
                    .values(
                        id=event.account_id,
                        name=event.name,
                        token_sha256=event.token_sha256,
                        created_at=at,
                    )
                    .on_conflict_do_nothing()
                )
            case CredentialAdded():
                await conn.execute(
                    insert(credentials).values(
                        id=event.credential_id,
                        account_id=event.account_id,
                        name=event.name,
                        registry=event.registry,
                        username=event.username,
                        secret_hint=event.secret_hint,
                        created_at=at,
                        updated_at=at,
                        verified_at=event.verified_at,
                        expires_at=event.expires_at,
                    )
                )
            case CredentialUpdated():
                await conn.execute(
                    update(credentials)
                    .where(credentials.c.id == event.credential_id)
                    .values(
                        name=event.name,
                        username=event.username,
                        secret_hint=event.secret_hint,
                        updated_at=at,
                        verified_at=event.verified_at,
                        expires_at=event.expires_at,
                    )
                )
            case CredentialAttached():
                await conn.execute(
                    insert(credential_apps)
                    .values(
                        credential_id=event.credential_id,
                        app_id=event.app.id,
                        app_name=event.app.name,
                    )
                    .on_conflict_do_nothing()
                )
            case CredentialDetached():
                await conn.execute(
                    delete(credential_apps).where(
                        credential_apps.c.credential_id == event.credential_id,
                        credential_apps.c.app_id == event.app_id,
                    )
                )
            case CredentialDeleted():
                await conn.execute(
                    delete(credentials).where(credentials.c.id == event.credential_id)
                )
            case AppCreated():
                await conn.execute(
                    insert(apps).values(
                        id=event.app_id,
                        account_id=event.account_id,
                        name=event.name,
                        image=event.image,
                        digest=event.digest,
                        credential_id=event.credential_id,
                        status="deploying",
                        port=event.port,
                        warnings=event.warnings,
                        created_at=at,
                        updated_at=at,
                    )
                )
            case AppCredentialChanged():
                await conn.execute(
                    update(apps)
                    .where(apps.c.id == event.app_id)
                    .values(
                        credential_id=event.credential_id,
                        digest=event.digest,
                        updated_at=at,
                    )
                )
            case DeployRequested():
                await conn.execute(
                    insert(deploys).values(
                        id=event.deploy_id,
                        app_id=event.app_id,
                        account_id=envelope.account_id,
                        reason=event.reason,
                        status="queued",
                        credential_id=event.credential_id,
                        requested_at=at,
                        stages={},
                    )
                )
                await conn.execute(
                    update(apps)
                    .where(apps.c.id == event.app_id)
                    .values(
                        current_deploy_id=event.deploy_id,
                        status="deploying",
                        updated_at=at,
                    )
                )
            case AppDeleted():
                await conn.execute(delete(apps).where(apps.c.id == event.app_id))
            case DeployStarted():
                await self._deploy(
                    conn, event.deploy_id, status="pulling", started_at=at
                )
            case ImagePulled():
                await self._deploy(
                    conn,
                    event.deploy_id,
                    status="booting",
                    digest=event.digest,
                    stages={
                        "pull_ms": event.pull_ms,
                        "unpack_ms": event.unpack_ms,
                        "bytes_fetched": event.bytes_fetched,
                        "bytes_total": event.bytes_total,
                    },
                )
            case VmBooted():
                await self._deploy(
                    conn, event.deploy_id, stages={"boot_ms": event.boot_ms}
                )
            case DeploySucceeded():
                await self._deploy(
                    conn,
                    event.deploy_id,
                    status="succeeded",
                    finished_at=at,
                    stages=event.stages,
                )
                await conn.execute(
                    update(apps)
                    .where(apps.c.id == event.app_id)
                    .values(
                        status="running",
                        url=event.url,
                        digest=event.digest,
                        updated_at=at,
                    )
                )
            case DeployFailed():
                await self._deploy(
                    conn,
                    event.deploy_id,
                    status="failed",
                    finished_at=at,
                    stages=event.stages,
                    error=event.error.model_dump(mode="json"),
                )
                # An older VM that still answers keeps the App running.
                await conn.execute(
                    update(apps)
                    .where(apps.c.id == event.app_id, apps.c.url.is_(None))
                    .values(status="failed", updated_at=at)
                )
            case AppStopped():
                await conn.execute(
                    update(apps)
                    .where(apps.c.id == event.app_id)
                    .values(status="stopped", url=None, updated_at=at)
                )
        await self._audit(conn, stored)

    async def _deploy(
        self, conn: AsyncConnection, deploy_id: str, **values: Any
    ) -> None:
        """Move a deploy along; stage timings merge into what is there."""
        stages = values.pop("stages", None)
        if stages:
            values["stages"] = deploys.c.stages.op("||")(cast(stages, JSONB))
        await conn.execute(
            update(deploys).where(deploys.c.id == deploy_id).values(**values)
        )

    async def _audit(self, conn: AsyncConnection, stored: StoredEvent) -> None:
        envelope = stored.envelope
        await conn.execute(
            insert(audit_events).values(
                position=stored.position,
                account_id=envelope.account_id,
                type=envelope.type,
                subject=aggregate_subject(
                    envelope.aggregate_type, envelope.aggregate_id
                ),
                occurred_at=envelope.occurred_at,
                actor=envelope.actor,
                data=redact(envelope.data),
            )
        )
