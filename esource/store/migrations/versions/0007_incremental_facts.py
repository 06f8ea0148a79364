"""Incremental mapping reads only what it needs: each subject fact's clinical date (the day its
readings are placed on, under the map rules `clinical_basis` names) with an index, and indexes on
the source, the frozen flag and the item group (bucket) of each item state. A subject's cost per
message no longer grows with its history.

Plain ADD COLUMN (nullable): facts stored before have no clinical date and are read by every run,
exactly as before, until a newer version of them arrives.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: Union[str, None] = "0006"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.add_column("subject_fact", sa.Column("clinical_date", sa.Date(), nullable=True))
    op.add_column("subject_fact", sa.Column("clinical_basis", sa.String(), nullable=True))
    op.create_index("ix_subject_fact_study_subject_date", "subject_fact",
                    ["study_oid", "subject_key", "clinical_date", "clinical_basis"])
    op.create_index("ix_item_state_study_subject_source", "item_state", ["study_oid", "subject_key", "source_identity"])
    op.create_index("ix_item_state_study_subject_frozen", "item_state", ["study_oid", "subject_key", "frozen"])
    op.create_index("ix_item_state_bucket", "item_state", ["study_oid", "subject_key", "study_event_oid",
                                                           "study_event_repeat_key", "form_oid", "item_group_repeat_key"])


def downgrade() -> None:
    op.drop_index("ix_item_state_bucket", table_name="item_state")
    op.drop_index("ix_item_state_study_subject_frozen", table_name="item_state")
    op.drop_index("ix_item_state_study_subject_source", table_name="item_state")
    op.drop_index("ix_subject_fact_study_subject_date", table_name="subject_fact")
    op.drop_column("subject_fact", "clinical_basis")
    op.drop_column("subject_fact", "clinical_date")
