"""Initial store schema: enrollment, intake, subject facts, item state, repeat keys, first-seen
dates, discrepancies and the outbox.

Written by hand to match esource/store/schema.py (tests/store check they agree).

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: Union[str, None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "enrollment",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("study_oid", sa.String(), nullable=False),
        sa.Column("subject_key", sa.String(), nullable=False),
        sa.Column("site_oid", sa.String(), nullable=False),
        sa.Column("consent_date", sa.Date(), nullable=False),
        sa.Column("day1", sa.Date(), nullable=False),
        sa.Column("withdrawal_date", sa.Date(), nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_enrollment"),
        sa.UniqueConstraint("study_oid", "subject_key", name="uq_enrollment_study_subject"),
    )

    op.create_table(
        "enrollment_identifier",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("study_oid", sa.String(), nullable=False),
        sa.Column("system", sa.String(), nullable=False),
        sa.Column("value", sa.String(), nullable=False),
        sa.Column("subject_key", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_enrollment_identifier"),
        sa.UniqueConstraint("study_oid", "system", "value", name="uq_enrollment_identifier_study_system_value"),
        sa.ForeignKeyConstraint(
            ["study_oid", "subject_key"],
            ["enrollment.study_oid", "enrollment.subject_key"],
            name="fk_enrollment_identifier_enrollment",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_enrollment_identifier_study_subject", "enrollment_identifier", ["study_oid", "subject_key"])

    op.create_table(
        "intake",
        sa.Column("intake_key", sa.String(), nullable=False),
        _ts("received_at"),
        sa.PrimaryKeyConstraint("intake_key", name="pk_intake"),
    )

    op.create_table(
        "subject_fact",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("study_oid", sa.String(), nullable=False),
        sa.Column("subject_key", sa.String(), nullable=False),
        sa.Column("identity", sa.String(), nullable=False),
        sa.Column("resource_type", sa.String(), nullable=False),
        sa.Column("resource_id", sa.String(), nullable=True),
        sa.Column("version", sa.String(), nullable=False),
        sa.Column("full_url", sa.String(), nullable=True),
        sa.Column("resource", sa.JSON(), nullable=False),
        sa.Column("first_seen", sa.Date(), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_subject_fact"),
        sa.UniqueConstraint("study_oid", "subject_key", "identity", name="uq_subject_fact_study_subject_identity"),
    )

    op.create_table(
        "item_state",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("study_oid", sa.String(), nullable=False),
        sa.Column("subject_key", sa.String(), nullable=False),
        sa.Column("study_event_oid", sa.String(), nullable=False),
        sa.Column("study_event_repeat_key", sa.String(), nullable=False),
        sa.Column("form_oid", sa.String(), nullable=False),
        sa.Column("item_group_oid", sa.String(), nullable=False),
        sa.Column("item_group_repeat_key", sa.String(), nullable=False),
        sa.Column("item_oid", sa.String(), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("source_identity", sa.String(), nullable=False),
        sa.Column("source_version", sa.String(), nullable=False),
        sa.Column("source_type", sa.String(), nullable=False),
        sa.Column("source_id", sa.String(), nullable=True),
        sa.Column("rule", sa.String(), nullable=False),
        sa.Column("frozen", sa.Boolean(), nullable=False),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_item_state"),
        sa.UniqueConstraint(
            "study_oid",
            "subject_key",
            "study_event_oid",
            "study_event_repeat_key",
            "form_oid",
            "item_group_oid",
            "item_group_repeat_key",
            "item_oid",
            name="uq_item_state_item_key",
        ),
    )

    op.create_table(
        "repeat_key",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("study_oid", sa.String(), nullable=False),
        sa.Column("subject_key", sa.String(), nullable=False),
        sa.Column("form_oid", sa.String(), nullable=False),
        sa.Column("identity", sa.String(), nullable=False),
        sa.Column("repeat_key", sa.Integer(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_repeat_key"),
        sa.UniqueConstraint("study_oid", "subject_key", "form_oid", "identity", name="uq_repeat_key_identity"),
        sa.UniqueConstraint("study_oid", "subject_key", "form_oid", "repeat_key", name="uq_repeat_key_key"),
    )

    op.create_table(
        "first_seen",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("study_oid", sa.String(), nullable=False),
        sa.Column("subject_key", sa.String(), nullable=False),
        sa.Column("identity", sa.String(), nullable=False),
        sa.Column("first_seen", sa.Date(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_first_seen"),
        sa.UniqueConstraint("study_oid", "subject_key", "identity", name="uq_first_seen_study_subject_identity"),
    )

    op.create_table(
        "discrepancy",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("natural_key", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("severity", sa.String(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("study_oid", sa.String(), nullable=False),
        sa.Column("subject_key", sa.String(), nullable=False),
        sa.Column("item_oid", sa.String(), nullable=True),
        sa.Column("study_event_oid", sa.String(), nullable=True),
        sa.Column("form_oid", sa.String(), nullable=True),
        sa.Column("item_group_repeat_key", sa.String(), nullable=True),
        sa.Column("source_identity", sa.String(), nullable=True),
        sa.Column("source_type", sa.String(), nullable=True),
        sa.Column("source_id", sa.String(), nullable=True),
        sa.Column("source_version", sa.String(), nullable=True),
        sa.Column("source_full_url", sa.String(), nullable=True),
        sa.Column("source_element", sa.String(), nullable=True),
        sa.Column("held_value", sa.Text(), nullable=True),
        sa.Column("candidates", sa.JSON(), nullable=False),
        sa.Column("rule", sa.String(), nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_discrepancy"),
        sa.UniqueConstraint("natural_key", name="uq_discrepancy_natural_key"),
        sa.CheckConstraint(
            "status IN ('open', 'in_review', 'resolved', 'dismissed')", name="ck_discrepancy_status"
        ),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_discrepancy_study_subject_status", "discrepancy", ["study_oid", "subject_key", "status"])

    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("study_oid", sa.String(), nullable=False),
        sa.Column("subject_key", sa.String(), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("site_oid", sa.String(), nullable=False),
        sa.Column("odm", sa.LargeBinary(), nullable=False),
        sa.Column("item_count", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _ts("created_at"),
        _ts("sent_at", nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
        sa.UniqueConstraint("study_oid", "subject_key", "sequence", name="uq_outbox_study_subject_sequence"),
        sa.CheckConstraint(
            "status IN ('pending', 'sent', 'acked', 'rejected', 'failed')", name="ck_outbox_status"
        ),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_outbox_status_id", "outbox", ["status", "id"])


def downgrade() -> None:
    op.drop_index("ix_outbox_status_id", table_name="outbox")
    op.drop_table("outbox")
    op.drop_index("ix_discrepancy_study_subject_status", table_name="discrepancy")
    op.drop_table("discrepancy")
    op.drop_table("first_seen")
    op.drop_table("repeat_key")
    op.drop_table("item_state")
    op.drop_table("subject_fact")
    op.drop_table("intake")
    op.drop_index("ix_enrollment_identifier_study_subject", table_name="enrollment_identifier")
    op.drop_table("enrollment_identifier")
    op.drop_table("enrollment")
