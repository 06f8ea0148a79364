"""Role-based API: users and hashed API tokens, and the visits of each outbox transaction.

`api_user` holds roles/sites/studies as JSON lists and at most a scrypt password hash; `api_token`
only the SHA-256 of each token, found by its public id. `outbox_visit` lists the StudyEventOIDs inside
each outbox transaction so the transfers API filters by visit in SQL; it is derived from the stored
ODM and filled lazily by the API for rows queued before (or without) it, so nothing to backfill here.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: Union[str, None] = "0004"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        "api_user",
        sa.Column("username", sa.String(), nullable=False),
        sa.Column("roles", sa.JSON(), nullable=False),
        sa.Column("sites", sa.JSON(), nullable=True),
        sa.Column("studies", sa.JSON(), nullable=True),
        sa.Column("password_hash", sa.String(), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("username", name="pk_api_user"),
    )
    op.create_table(
        "api_token",
        sa.Column("token_id", sa.String(), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("username", sa.String(), nullable=False),
        sa.Column("label", sa.String(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("token_id", name="pk_api_token"),
        sa.ForeignKeyConstraint(["username"], ["api_user.username"], name="fk_api_token_api_user",
                                ondelete="CASCADE"),
    )
    op.create_index("ix_api_token_username", "api_token", ["username"])
    op.create_table(
        "outbox_visit",
        sa.Column("outbox_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("study_event_oid", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("outbox_id", "study_event_oid", name="pk_outbox_visit"),
        sa.ForeignKeyConstraint(["outbox_id"], ["outbox.id"], name="fk_outbox_visit_outbox", ondelete="CASCADE"),
    )
    op.create_index("ix_outbox_visit_study_event_oid", "outbox_visit", ["study_event_oid", "outbox_id"])


def downgrade() -> None:
    op.drop_index("ix_outbox_visit_study_event_oid", table_name="outbox_visit")
    op.drop_table("outbox_visit")
    op.drop_index("ix_api_token_username", table_name="api_token")
    op.drop_table("api_token")
    op.drop_table("api_user")
