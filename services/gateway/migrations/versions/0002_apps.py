"""Read model: Apps and their deploys.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "apps",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("account_id", sa.String(64), nullable=False, index=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("image", sa.String(600), nullable=False),
        sa.Column("digest", sa.String(200), nullable=True),
        sa.Column("credential_id", sa.String(64), nullable=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("url", sa.String(300), nullable=True),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("warnings", JSONB, nullable=False),
        sa.Column("current_deploy_id", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "deploys",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column(
            "app_id",
            sa.String(64),
            sa.ForeignKey("apps.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(40), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("digest", sa.String(200), nullable=True),
        sa.Column("credential_id", sa.String(64), nullable=True),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stages", JSONB, nullable=False),
        sa.Column("error", JSONB, nullable=True),
    )
    op.create_index("deploys_app_requested", "deploys", ["app_id", "requested_at"])


def downgrade() -> None:
    op.drop_table("deploys")
    op.drop_table("apps")
