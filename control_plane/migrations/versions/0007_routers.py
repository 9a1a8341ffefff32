"""routers

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26 12:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "router",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("project_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("description", sa.String(length=2000), nullable=False),
        sa.Column("strategy", sa.String(length=32), nullable=False),
        sa.Column("targets", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("fallbacks", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("retries", sa.Integer(), nullable=False),
        sa.Column("retry_backoff_s", sa.Float(), nullable=False),
        sa.Column("timeout_s", sa.Float(), nullable=False),
        sa.Column("cooldown", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_by", sa.Uuid(), nullable=True),
        sa.ForeignKeyConstraint(
            ["created_by"], ["user_account.id"], name=op.f("fk_router_created_by_user_account")
        ),
        sa.ForeignKeyConstraint(
            ["project_id"], ["project.id"], name=op.f("fk_router_project_id_project")
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenant.id"], name=op.f("fk_router_tenant_id_tenant")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_router")),
    )
    op.create_index(op.f("ix_router_project_id"), "router", ["project_id"], unique=False)
    op.create_index(op.f("ix_router_status"), "router", ["status"], unique=False)
    op.create_index(op.f("ix_router_tenant_id"), "router", ["tenant_id"], unique=False)
    op.create_index(
        "uq_router_live_name",
        "router",
        ["project_id", "name"],
        unique=True,
        postgresql_where=sa.text("status <> 'deleted'"),
    )


def downgrade() -> None:
    op.drop_index(
        "uq_router_live_name",
        table_name="router",
        postgresql_where=sa.text("status <> 'deleted'"),
    )
    op.drop_index(op.f("ix_router_tenant_id"), table_name="router")
    op.drop_index(op.f("ix_router_status"), table_name="router")
    op.drop_index(op.f("ix_router_project_id"), table_name="router")
    op.drop_table("router")
