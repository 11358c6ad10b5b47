"""Reads of the read model, always scoped to one account."""

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts.events import AppRef
from services.gateway.readmodel import (
    accounts,
    apps,
    audit_events,
    credential_apps,
    credentials,
    deploys,
)
from services.gateway.schemas import AppOut, AuditEvent, CredentialOut, DeployOut


async def account_by_token(engine: AsyncEngine, token_sha256: str) -> str | None:
    async with engine.connect() as conn:
        row = await conn.execute(
            select(accounts.c.id).where(accounts.c.token_sha256 == token_sha256)
        )
        return row.scalar_one_or_none()


async def list_credentials(
    engine: AsyncEngine, account_id: str, credential_id: str | None = None
) -> list[CredentialOut]:
    query = (
        select(credentials)
        .where(credentials.c.account_id == account_id)
        .order_by(credentials.c.created_at, credentials.c.id)
    )
    if credential_id is not None:
        query = query.where(credentials.c.id == credential_id)
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).mappings().all()
        ids = [row["id"] for row in rows]
        apps: dict[str, list[AppRef]] = {credential: [] for credential in ids}
        if ids:
            links = await conn.execute(
                select(credential_apps)
                .where(credential_apps.c.credential_id.in_(ids))
                .order_by(credential_apps.c.app_name)
            )
            for link in links.mappings():
                apps[link["credential_id"]].append(
                    AppRef(id=link["app_id"], name=link["app_name"])
                )
    return [_credential(row, apps[row["id"]]) for row in rows]


def _credential(row: Any, apps: list[AppRef]) -> CredentialOut:
    return CredentialOut(
        id=row["id"],
        name=row["name"],
        registry=row["registry"],
        username=row["username"],
        secret_hint=row["secret_hint"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        verified_at=row["verified_at"],
        expires_at=row["expires_at"],
        apps=apps,
    )


async def audit_page(
    engine: AsyncEngine,
    account_id: str,
    after: int,
    limit: int,
    type_: str | None,
    subject: str | None,
) -> list[AuditEvent]:
    query = (
        select(audit_events)
        .where(audit_events.c.account_id == account_id)
        .where(audit_events.c.position > after)
        .order_by(audit_events.c.position)
        .limit(limit)
    )
    if type_:
        query = query.where(audit_events.c.type == type_)
    if subject:
        query = query.where(audit_events.c.subject == subject)
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).mappings().all()
    return [
        AuditEvent(
            position=row["position"],
            type=row["type"],
            subject=row["subject"],
            occurred_at=row["occurred_at"],
            actor=row["actor"],
            data=row["data"],
        )
        for row in rows
    ]


async def list_apps(
    engine: AsyncEngine, account_id: str, app_id: str | None = None
) -> list[AppOut]:
    query = (
        select(apps)
        .where(apps.c.account_id == account_id)
        .order_by(apps.c.created_at, apps.c.id)
    )
    if app_id is not None:
        query = query.where(apps.c.id == app_id)
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).mappings().all()
        current_ids = [
            row["current_deploy_id"] for row in rows if row["current_deploy_id"]
        ]
        current: dict[str, DeployOut] = {}
        if current_ids:
            found = await conn.execute(
                select(deploys).where(deploys.c.id.in_(current_ids))
            )
            current = {row["id"]: _deploy(row) for row in found.mappings()}
    return [
        AppOut(
            id=row["id"],
            name=row["name"],
            image=row["image"],
            digest=row["digest"],
            credential_id=row["credential_id"],
            status=row["status"],
            url=row["url"],
            port=row["port"],
            warnings=row["warnings"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            current_deploy=current.get(row["current_deploy_id"] or ""),
        )
        for row in rows
    ]


async def list_deploys(
    engine: AsyncEngine,
    account_id: str,
    *,
    app_id: str | None = None,
    deploy_id: str | None = None,
) -> list[DeployOut]:
    query = (
        select(deploys)
        .where(deploys.c.account_id == account_id)
        .order_by(deploys.c.requested_at.desc(), deploys.c.id.desc())
    )
    if app_id is not None:
        query = query.where(deploys.c.app_id == app_id)
    if deploy_id is not None:
        query = query.where(deploys.c.id == deploy_id)
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).mappings().all()
    return [_deploy(row) for row in rows]


def _deploy(row: Any) -> DeployOut:
    return DeployOut(
        id=row["id"],
        app_id=row["app_id"],
        reason=row["reason"],
        status=row["status"],
        digest=row["digest"],
        credential_id=row["credential_id"],
        requested_at=row["requested_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        stages=row["stages"],
        error=row["error"],
    )
