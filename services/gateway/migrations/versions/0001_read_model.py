"""Read model: accounts, credentials, their Apps, the audit log.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "projection_checkpoints",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("position", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "accounts",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "credentials",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("account_id", sa.String(64), nullable=False, index=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("registry", sa.String(300), nullable=False),
        sa.Column("username", sa.String(300), nullable=False),
        sa.Column("secret_hint", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("verified_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "credential_apps",
        sa.Column(
            "credential_id",
            sa.String(64),
            sa.ForeignKey("credentials.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("app_id", sa.String(64), primary_key=True),
        sa.Column("app_name", sa.String(200), nullable=False),
    )
    op.create_table(
        "audit_events",
        sa.Column("position", sa.BigInteger, primary_key=True),
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("type", sa.String(100), nullable=False),
        sa.Column("subject", sa.String(300), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("data", JSONB, nullable=False),
    )
    op.create_index(
        "audit_events_account_position", "audit_events", ["account_id", "position"]
    )


def downgrade() -> None:
    for table in (
        "audit_events",
        "credential_apps",
        "credentials",
        "accounts",
        "projection_checkpoints",
    ):
        op.drop_table(table)
