"""EDC side: the values an outbox row's Updates replace (for the dispatcher's conflict check), and
the EDC key map (esource repeat keys <-> an EDC's integer keys, per connector).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: Union[str, None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # nullable, no default: rows queued before this migration have no previous values (no conflict check)
    op.add_column("outbox", sa.Column("previous_values", sa.JSON(), nullable=True))
    op.create_table(
        "edc_key_map",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("connector", sa.String(), nullable=False),
        sa.Column("study_oid", sa.String(), nullable=False),
        sa.Column("subject_key", sa.String(), nullable=False),
        sa.Column("scope", sa.String(), nullable=False),
        sa.Column("esource_key", sa.String(), nullable=False),
        sa.Column("edc_key", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_edc_key_map"),
        sa.UniqueConstraint("connector", "study_oid", "subject_key", "scope", "esource_key",
                            name="uq_edc_key_map_esource_key"),
        sa.UniqueConstraint("connector", "study_oid", "subject_key", "scope", "edc_key",
                            name="uq_edc_key_map_edc_key"),
    )


def downgrade() -> None:
    op.drop_table("edc_key_map")
    # a plain ALTER TABLE ... DROP COLUMN: PostgreSQL, and SQLite >= 3.35 (the store's minimum)
    op.drop_column("outbox", "previous_values")
