"""credential names unique among live credentials only, so a deleted credential frees
its name

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 09:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint("uq_credential_tenant_id_project_id_name", "credential", type_="unique")
    op.create_index(
        "uq_credential_live_name",
        "credential",
        ["tenant_id", "project_id", "name"],
        unique=True,
        postgresql_nulls_not_distinct=True,
        postgresql_where=sa.text("status <> 'deleted'"),
    )


def downgrade() -> None:
    # The old constraint covers deleted rows too: give each deleted credential a name of
    # its own first, or a name reused after a delete would block the downgrade.
    op.execute(
        "UPDATE credential SET name = name || '~deleted-' || id::text WHERE status = 'deleted'"
    )
    op.drop_index("uq_credential_live_name", table_name="credential")
    op.create_unique_constraint(
        "uq_credential_tenant_id_project_id_name",
        "credential",
        ["tenant_id", "project_id", "name"],
        postgresql_nulls_not_distinct=True,
    )
