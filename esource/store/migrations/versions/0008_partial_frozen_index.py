"""The frozen-items index becomes partial (only rows with frozen true). As a plain index on
(study, subject, frozen) it matched every lookup of a subject's items on its first two columns, and
PostgreSQL, before the first ANALYZE of a fresh table (the first backlog of a new install), chose it
for the per-bucket lookups of incremental runs: each read all of the subject's items.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: Union[str, None] = "0007"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.drop_index("ix_item_state_study_subject_frozen", table_name="item_state")
    op.create_index("ix_item_state_frozen", "item_state", ["study_oid", "subject_key"],
                    sqlite_where=sa.text("frozen IS 1"), postgresql_where=sa.text("frozen IS TRUE"))


def downgrade() -> None:
    op.drop_index("ix_item_state_frozen", table_name="item_state")
    op.create_index("ix_item_state_study_subject_frozen", "item_state", ["study_oid", "subject_key", "frozen"])
