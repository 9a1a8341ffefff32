"""workflow runs: one row per workflow id, mirrored by the bookkeeping activity

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "workflow_run",
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
        sa.Column("workflow_id", sa.String(length=255), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=128), nullable=False),
        sa.Column("resource_kind", sa.String(length=64), nullable=False),
        sa.Column("resource_id", sa.String(length=255), nullable=True),
        sa.Column("project_id", sa.Uuid(), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("progress", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("error", sa.String(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workflow_run")),
        sa.UniqueConstraint("workflow_id", name=op.f("uq_workflow_run_workflow_id")),
    )
    op.create_index(op.f("ix_workflow_run_kind"), "workflow_run", ["kind"])
    op.create_index(op.f("ix_workflow_run_project_id"), "workflow_run", ["project_id"])
    op.create_index(op.f("ix_workflow_run_status"), "workflow_run", ["status"])
    op.create_index("ix_workflow_run_resource", "workflow_run", ["resource_kind", "resource_id"])
    op.create_index("ix_workflow_run_started_at", "workflow_run", ["started_at"])


def downgrade() -> None:
    op.drop_index("ix_workflow_run_started_at", table_name="workflow_run")
    op.drop_index("ix_workflow_run_resource", table_name="workflow_run")
    op.drop_index(op.f("ix_workflow_run_status"), table_name="workflow_run")
    op.drop_index(op.f("ix_workflow_run_project_id"), table_name="workflow_run")
    op.drop_index(op.f("ix_workflow_run_kind"), table_name="workflow_run")
    op.drop_table("workflow_run")
