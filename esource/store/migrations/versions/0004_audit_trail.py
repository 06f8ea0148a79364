"""Audit trail: the hash-chained, append-only `audit_log` and its one-row `audit_head`.

`audit_log.id` is assigned by the store under the chain lock (head.last_id + 1), not by a sequence,
so the ids of the chain are contiguous and a gap means a deleted row. `audit_head` holds the id and
hash of the newest entry; appenders lock it (SELECT ... FOR UPDATE on PostgreSQL; SQLite write
transactions are serialised by BEGIN IMMEDIATE) only while they append at commit time. The canonical
form the hashes are computed over is documented in `esource.audit.chain`.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GENESIS_HASH = "0" * 64  # the predecessor hash of the first entry (esource.audit.chain.GENESIS_HASH)


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(), nullable=False),
        sa.Column("action", sa.String(), nullable=False),
        sa.Column("study_oid", sa.String(), nullable=True),
        sa.Column("subject_key", sa.String(), nullable=True),
        sa.Column("site_oid", sa.String(), nullable=True),
        sa.Column("study_event_oid", sa.String(), nullable=True),
        sa.Column("study_event_repeat_key", sa.String(), nullable=True),
        sa.Column("form_oid", sa.String(), nullable=True),
        sa.Column("item_group_oid", sa.String(), nullable=True),
        sa.Column("item_group_repeat_key", sa.String(), nullable=True),
        sa.Column("item_oid", sa.String(), nullable=True),
        sa.Column("old_value", sa.Text(), nullable=True),
        sa.Column("new_value", sa.Text(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("source_type", sa.String(), nullable=True),
        sa.Column("source_id", sa.String(), nullable=True),
        sa.Column("source_version", sa.String(), nullable=True),
        sa.Column("source_identity", sa.String(), nullable=True),
        sa.Column("rule", sa.String(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_study_subject_id", "audit_log", ["study_oid", "subject_key", "id"])
    op.create_index("ix_audit_log_study_item", "audit_log", ["study_oid", "subject_key", "item_oid", "form_oid"])
    op.create_index("ix_audit_log_study_action_id", "audit_log", ["study_oid", "action", "id"])
    op.create_index("ix_audit_log_study_at", "audit_log", ["study_oid", "at"])
    op.create_index("ix_audit_log_actor_at", "audit_log", ["actor", "at"])
    head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("last_id", sa.Integer(), nullable=False),
        sa.Column("last_hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_head"),
        sa.CheckConstraint("id = 1", name="ck_audit_head_singleton"),
    )
    op.bulk_insert(head, [{"id": 1, "last_id": 0, "last_hash": GENESIS_HASH}])


def downgrade() -> None:
    op.drop_table("audit_head")
    op.drop_index("ix_audit_log_actor_at", table_name="audit_log")
    op.drop_index("ix_audit_log_study_at", table_name="audit_log")
    op.drop_index("ix_audit_log_study_action_id", table_name="audit_log")
    op.drop_index("ix_audit_log_study_item", table_name="audit_log")
    op.drop_index("ix_audit_log_study_subject_id", table_name="audit_log")
    op.drop_table("audit_log")
