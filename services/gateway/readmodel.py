"""The gateway's read model: PostgreSQL tables built by projections."""

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

projection_checkpoints = Table(
    "projection_checkpoints",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("position", BigInteger, nullable=False),
)

accounts = Table(
    "accounts",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("token_sha256", String(64), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

credentials = Table(
    "credentials",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("account_id", String(64), nullable=False, index=True),
    Column("name", String(200), nullable=False),
    Column("registry", String(300), nullable=False),
    Column("username", String(300), nullable=False),
    Column("secret_hint", String(16), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("verified_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
)

credential_apps = Table(
    "credential_apps",
    metadata,
    Column(
        "credential_id",
        String(64),
        ForeignKey("credentials.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("app_id", String(64), primary_key=True),
    Column("app_name", String(200), nullable=False),
)

audit_events = Table(
    "audit_events",
    metadata,
    Column("position", BigInteger, primary_key=True),
    Column("account_id", String(64), nullable=False),
    Column("type", String(100), nullable=False),
    Column("subject", String(300), nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("actor", String(200), nullable=False),
    Column("data", JSONB, nullable=False),
    Index("audit_events_account_position", "account_id", "position"),
)

apps = Table(
    "apps",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("account_id", String(64), nullable=False, index=True),
    Column("name", String(200), nullable=False),
    Column("image", String(600), nullable=False),
    Column("digest", String(200), nullable=True),
    Column("credential_id", String(64), nullable=True),
    Column("status", String(20), nullable=False),
    Column("url", String(300), nullable=True),
    Column("port", Integer, nullable=False),
    Column("warnings", JSONB, nullable=False),
    Column("current_deploy_id", String(64), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

deploys = Table(
    "deploys",
    metadata,
    Column("id", String(64), primary_key=True),
    Column(
        "app_id", String(64), ForeignKey("apps.id", ondelete="CASCADE"), nullable=False
    ),
    Column("account_id", String(64), nullable=False),
    Column("reason", String(40), nullable=False),
    Column("status", String(20), nullable=False),
    Column("digest", String(200), nullable=True),
    Column("credential_id", String(64), nullable=True),
    Column("requested_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Column("stages", JSONB, nullable=False),
    Column("error", JSONB, nullable=True),
    Index("deploys_app_requested", "app_id", "requested_at"),
)

READ_MODEL_TABLES = (
    accounts,
    credentials,
    credential_apps,
    apps,
    deploys,
    audit_events,
)
