"""Reconciliation queue: who works on a discrepancy and how it was closed, the rest of its ItemKey when
known (review-before-send holds carry it), and data managers' run-time review-before-send policies.

Plain ADD COLUMN (nullable, no default) on both databases: existing discrepancies keep their status
and simply have no assignee or resolution. The resolution values are checked by the unit of work, not
by a CHECK constraint (adding one to an existing SQLite table would mean rebuilding the table).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: Union[str, None] = "0005"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_NEW_DISCREPANCY_COLUMNS: tuple[tuple[str, sa.types.TypeEngine], ...] = (
    ("item_group_oid", sa.String()),
    ("study_event_repeat_key", sa.String()),
    ("assignee", sa.String()),
    ("resolution", sa.String()),
    ("resolved_by", sa.String()),
    ("resolved_at", sa.DateTime(timezone=True)),
    ("resolution_reason", sa.Text()),
    ("resolution_value", sa.Text()),
)


def upgrade() -> None:
    for name, type_ in _NEW_DISCREPANCY_COLUMNS:
        op.add_column("discrepancy", sa.Column(name, type_, nullable=True))
    op.create_index("ix_discrepancy_study_status_created", "discrepancy", ["study_oid", "status", "created_at"])
    op.create_table(
        "review_policy",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("study_oid", sa.String(), nullable=False),
        sa.Column("form_oid", sa.String(), nullable=False),
        sa.Column("mode", sa.String(), nullable=False),
        sa.Column("changed_by", sa.String(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_review_policy"),
        sa.UniqueConstraint("study_oid", "form_oid", name="uq_review_policy_study_form"),
        sa.CheckConstraint("mode IN ('auto', 'adjudicate')", name="ck_review_policy_mode"),
    )


def downgrade() -> None:
    op.drop_table("review_policy")
    op.drop_index("ix_discrepancy_study_status_created", table_name="discrepancy")
    # a plain ALTER TABLE ... DROP COLUMN: PostgreSQL, and SQLite >= 3.35 (the store's minimum)
    for name, _type in reversed(_NEW_DISCREPANCY_COLUMNS):
        op.drop_column("discrepancy", name)
