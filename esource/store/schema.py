"""The store's tables (SQLAlchemy 2 declarative, typed).

This module is the *model* of the schema; the database itself is only ever created and changed by
the Alembic migrations in `esource/store/migrations/` (a test checks that the migrated schema equals
this metadata). Change both together: edit a table here, then add a migration.

Conventions
- Every constraint and index has an explicit name, so migrations can refer to it on both databases.
- Absent repeat keys are stored as '' (not NULL) in `item_state`, because a NULL never equals a NULL
  in a unique constraint: ('SE.X', NULL) would otherwise be allowed twice. The unit of work maps
  None <-> '' at its edge; an empty repeat key is not a valid ODM repeat key anyway.
- Timestamps are timezone-aware UTC (`UTCDateTime`): `timestamptz` on PostgreSQL, naive UTC text on
  SQLite, always returned with tzinfo=UTC. Naive datetimes are refused on the way in.
- JSON columns use `sqlalchemy.JSON` (json on PostgreSQL, JSON text on SQLite).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Dialect,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Text,
    text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

DISCREPANCY_STATUSES: tuple[str, ...] = ("open", "in_review", "resolved", "dismissed")
OPEN_DISCREPANCY_STATUSES: tuple[str, ...] = ("open", "in_review")
OUTBOX_STATUSES: tuple[str, ...] = ("pending", "sent", "acked", "rejected", "failed")
# how a data manager closed a discrepancy (migration 0006; checked by the unit of work, not by a CHECK
# constraint: adding one to an existing SQLite table would mean rebuilding it)
DISCREPANCY_RESOLUTIONS: tuple[str, ...] = ("accepted", "overridden", "dismissed", "remapped", "repushed")
REVIEW_MODES: tuple[str, ...] = ("auto", "adjudicate")

# A safety net for constraints added later without a name; every constraint below is named explicitly.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _in_list(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC timestamp on both databases."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: the store keeps timezone-aware UTC timestamps only")
        value = value.astimezone(dt.timezone.utc)
        if dialect.name == "sqlite":  # SQLite has no time zones: store naive UTC
            value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class EnrollmentRow(Base):
    """A subject enrolled in a study (one row per study + SubjectKey)."""

    __tablename__ = "enrollment"
    __table_args__ = (
        PrimaryKeyConstraint("id", name="pk_enrollment"),
        UniqueConstraint("study_oid", "subject_key", name="uq_enrollment_study_subject"),
    )

    id: Mapped[int] = mapped_column(Integer, autoincrement=True)
    study_oid: Mapped[str] = mapped_column(String)
    subject_key: Mapped[str] = mapped_column(String)
    site_oid: Mapped[str] = mapped_column(String)
    consent_date: Mapped[dt.date] = mapped_column(Date)
    day1: Mapped[dt.date] = mapped_column(Date)
    withdrawal_date: Mapped[dt.date | None] = mapped_column(Date, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class EnrollmentIdentifierRow(Base):
    """An EHR patient identifier (system + value) of an enrolled subject: unique within a study."""

    __tablename__ = "enrollment_identifier"
    __table_args__ = (
        PrimaryKeyConstraint("id", name="pk_enrollment_identifier"),
        UniqueConstraint("study_oid", "system", "value", name="uq_enrollment_identifier_study_system_value"),
        ForeignKeyConstraint(
            ["study_oid", "subject_key"],
            ["enrollment.study_oid", "enrollment.subject_key"],
            name="fk_enrollment_identifier_enrollment",
            ondelete="CASCADE",
        ),
        Index("ix_enrollment_identifier_study_subject", "study_oid", "subject_key"),
    )

    id: Mapped[int] = mapped_column(Integer, autoincrement=True)
    study_oid: Mapped[str] = mapped_column(String)
    system: Mapped[str] = mapped_column(String)
    value: Mapped[str] = mapped_column(String)
    subject_key: Mapped[str] = mapped_column(String)


class IntakeRow(Base):
    """An intake key already processed: a redelivered message with the same key changes nothing."""

    __tablename__ = "intake"
    __table_args__ = (PrimaryKeyConstraint("intake_key", name="pk_intake"),)

    intake_key: Mapped[str] = mapped_column(String)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class SubjectFactRow(Base):
    """The newest version of one source resource kept for a subject (what the map re-runs over)."""

    __tablename__ = "subject_fact"
    __table_args__ = (
        PrimaryKeyConstraint("id", name="pk_subject_fact"),
        UniqueConstraint("study_oid", "subject_key", "identity", name="uq_subject_fact_study_subject_identity"),
        # incremental runs read a subject's facts near the visits they re-select (0007)
        Index("ix_subject_fact_study_subject_date", "study_oid", "subject_key", "clinical_date", "clinical_basis"),
    )

    id: Mapped[int] = mapped_column(Integer, autoincrement=True)
    study_oid: Mapped[str] = mapped_column(String)
    subject_key: Mapped[str] = mapped_column(String)
    identity: Mapped[str] = mapped_column(String)
    resource_type: Mapped[str] = mapped_column(String)
    resource_id: Mapped[str | None] = mapped_column(String, nullable=True)
    version: Mapped[str] = mapped_column(String)
    full_url: Mapped[str | None] = mapped_column(String, nullable=True)
    resource: Mapped[dict[str, Any]] = mapped_column(JSON)
    first_seen: Mapped[dt.date] = mapped_column(Date)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    clinical_date: Mapped[dt.date | None] = mapped_column(Date, nullable=True)  # 0007
    clinical_basis: Mapped[str | None] = mapped_column(String, nullable=True)  # 0007


class ItemStateRow(Base):
    """The last value sent for one ItemData cell (the state the diff runs against)."""

    __tablename__ = "item_state"
    __table_args__ = (
        PrimaryKeyConstraint("id", name="pk_item_state"),
        UniqueConstraint(
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
        # the items sent from a changed source, for incremental runs (0007)
        Index("ix_item_state_study_subject_source", "study_oid", "subject_key", "source_identity"),
        # partial (0008): only the few frozen rows, so that a planner without statistics (a fresh
        # PostgreSQL table before its first ANALYZE) cannot take it for a lookup of the subject's items
        Index("ix_item_state_frozen", "study_oid", "subject_key", sqlite_where=text("frozen IS 1"),
              postgresql_where=text("frozen IS TRUE")),
        Index("ix_item_state_bucket", "study_oid", "subject_key", "study_event_oid", "study_event_repeat_key",
              "form_oid", "item_group_repeat_key"),
    )

    id: Mapped[int] = mapped_column(Integer, autoincrement=True)
    study_oid: Mapped[str] = mapped_column(String)
    subject_key: Mapped[str] = mapped_column(String)
    study_event_oid: Mapped[str] = mapped_column(String)
    study_event_repeat_key: Mapped[str] = mapped_column(String)  # '' when absent
    form_oid: Mapped[str] = mapped_column(String)
    item_group_oid: Mapped[str] = mapped_column(String)
    item_group_repeat_key: Mapped[str] = mapped_column(String)  # '' when absent
    item_oid: Mapped[str] = mapped_column(String)
    value: Mapped[str] = mapped_column(Text)
    source_identity: Mapped[str] = mapped_column(String)
    source_version: Mapped[str] = mapped_column(String)
    source_type: Mapped[str] = mapped_column(String)
    source_id: Mapped[str | None] = mapped_column(String, nullable=True)
    rule: Mapped[str] = mapped_column(String)
    frozen: Mapped[bool] = mapped_column(Boolean)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class RepeatKeyRow(Base):
    """A log repeat key (1, 2, 3 ...) allocated to a source record: never changed, never reused."""

    __tablename__ = "repeat_key"
    __table_args__ = (
        PrimaryKeyConstraint("id", name="pk_repeat_key"),
        UniqueConstraint("study_oid", "subject_key", "form_oid", "identity", name="uq_repeat_key_identity"),
        UniqueConstraint("study_oid", "subject_key", "form_oid", "repeat_key", name="uq_repeat_key_key"),
    )

    id: Mapped[int] = mapped_column(Integer, autoincrement=True)
    study_oid: Mapped[str] = mapped_column(String)
    subject_key: Mapped[str] = mapped_column(String)
    form_oid: Mapped[str] = mapped_column(String)
    identity: Mapped[str] = mapped_column(String)
    repeat_key: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class FirstSeenRow(Base):
    """The date esource first saw a source record (for undated records)."""

    __tablename__ = "first_seen"
    __table_args__ = (
        PrimaryKeyConstraint("id", name="pk_first_seen"),
        UniqueConstraint("study_oid", "subject_key", "identity", name="uq_first_seen_study_subject_identity"),
    )

    id: Mapped[int] = mapped_column(Integer, autoincrement=True)
    study_oid: Mapped[str] = mapped_column(String)
    subject_key: Mapped[str] = mapped_column(String)
    identity: Mapped[str] = mapped_column(String)
    first_seen: Mapped[dt.date] = mapped_column(Date)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class DiscrepancyRow(Base):
    """A discrepancy, found again by its natural key (`Discrepancy.key`, JSON-encoded) on every re-run."""

    __tablename__ = "discrepancy"
    __table_args__ = (
        PrimaryKeyConstraint("id", name="pk_discrepancy"),
        UniqueConstraint("natural_key", name="uq_discrepancy_natural_key"),
        CheckConstraint(_in_list("status", DISCREPANCY_STATUSES), name="ck_discrepancy_status"),
        Index("ix_discrepancy_study_subject_status", "study_oid", "subject_key", "status"),
        Index("ix_discrepancy_study_status_created", "study_oid", "status", "created_at"),  # the queue (0006)
        {"sqlite_autoincrement": True},  # ids are never reused, even after a delete
    )

    id: Mapped[int] = mapped_column(Integer, autoincrement=True)
    natural_key: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String)
    severity: Mapped[str] = mapped_column(String)
    status: Mapped[str] = mapped_column(String)
    message: Mapped[str] = mapped_column(Text)
    study_oid: Mapped[str] = mapped_column(String)
    subject_key: Mapped[str] = mapped_column(String)
    item_oid: Mapped[str | None] = mapped_column(String, nullable=True)
    study_event_oid: Mapped[str | None] = mapped_column(String, nullable=True)
    form_oid: Mapped[str | None] = mapped_column(String, nullable=True)
    item_group_repeat_key: Mapped[str | None] = mapped_column(String, nullable=True)
    source_identity: Mapped[str | None] = mapped_column(String, nullable=True)
    source_type: Mapped[str | None] = mapped_column(String, nullable=True)
    source_id: Mapped[str | None] = mapped_column(String, nullable=True)
    source_version: Mapped[str | None] = mapped_column(String, nullable=True)
    source_full_url: Mapped[str | None] = mapped_column(String, nullable=True)
    source_element: Mapped[str | None] = mapped_column(String, nullable=True)
    held_value: Mapped[str | None] = mapped_column(Text, nullable=True)
    candidates: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    rule: Mapped[str | None] = mapped_column(String, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    # reconciliation queue (migration 0006): the rest of the ItemKey when known, who works on it, and how
    # it was closed (cleared again when changed facts re-open it; the audit trail keeps the history)
    item_group_oid: Mapped[str | None] = mapped_column(String, nullable=True)
    study_event_repeat_key: Mapped[str | None] = mapped_column(String, nullable=True)
    assignee: Mapped[str | None] = mapped_column(String, nullable=True)
    resolution: Mapped[str | None] = mapped_column(String, nullable=True)
    resolved_by: Mapped[str | None] = mapped_column(String, nullable=True)
    resolved_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    resolution_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    resolution_value: Mapped[str | None] = mapped_column(Text, nullable=True)  # what accept/override sent


class ReviewPolicyRow(Base):
    """A data manager's run-time override of a form's review-before-send policy (migration 0006); the
    study map's `review:` setting applies to forms without a row."""

    __tablename__ = "review_policy"
    __table_args__ = (
        PrimaryKeyConstraint("id", name="pk_review_policy"),
        UniqueConstraint("study_oid", "form_oid", name="uq_review_policy_study_form"),
        CheckConstraint(_in_list("mode", REVIEW_MODES), name="ck_review_policy_mode"),
    )

    id: Mapped[int] = mapped_column(Integer, autoincrement=True)
    study_oid: Mapped[str] = mapped_column(String)
    form_oid: Mapped[str] = mapped_column(String)
    mode: Mapped[str] = mapped_column(String)
    changed_by: Mapped[str] = mapped_column(String)
    reason: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class OutboxRow(Base):
    """An ODM transaction for one subject, written in the same database transaction as the state."""

    __tablename__ = "outbox"
    __table_args__ = (
        PrimaryKeyConstraint("id", name="pk_outbox"),
        UniqueConstraint("study_oid", "subject_key", "sequence", name="uq_outbox_study_subject_sequence"),
        CheckConstraint(_in_list("status", OUTBOX_STATUSES), name="ck_outbox_status"),
        Index("ix_outbox_status_id", "status", "id"),
        {"sqlite_autoincrement": True},  # ids are never reused, even after a delete
    )

    id: Mapped[int] = mapped_column(Integer, autoincrement=True)
    study_oid: Mapped[str] = mapped_column(String)
    subject_key: Mapped[str] = mapped_column(String)
    sequence: Mapped[int] = mapped_column(Integer)
    site_oid: Mapped[str] = mapped_column(String)
    odm: Mapped[bytes] = mapped_column(LargeBinary)
    item_count: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String)
    attempts: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # {item path: the value esource last sent} for every ItemData the transaction Updates (migration
    # 0003; NULL on older rows): the dispatcher's conflict check compares the EDC's value with it
    previous_values: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)


class EdcKeyMapRow(Base):
    """An EDC's own key (Rave log line, REDCap repeat instance) for one of esource's repeat keys,
    per connector, study, subject and scope: allocated 1, 2, 3 ... once, never changed, never reused."""

    __tablename__ = "edc_key_map"
    __table_args__ = (
        PrimaryKeyConstraint("id", name="pk_edc_key_map"),
        UniqueConstraint("connector", "study_oid", "subject_key", "scope", "esource_key",
                         name="uq_edc_key_map_esource_key"),
        UniqueConstraint("connector", "study_oid", "subject_key", "scope", "edc_key", name="uq_edc_key_map_edc_key"),
    )

    id: Mapped[int] = mapped_column(Integer, autoincrement=True)
    connector: Mapped[str] = mapped_column(String)
    study_oid: Mapped[str] = mapped_column(String)
    subject_key: Mapped[str] = mapped_column(String)
    scope: Mapped[str] = mapped_column(String)
    esource_key: Mapped[str] = mapped_column(String)
    edc_key: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


DEAD_LETTER_STATUSES: tuple[str, ...] = ("open", "reprocessed", "discarded")


class DeadLetterRow(Base):
    """An input that could not be processed (not FHIR, too large, ambiguous patient match ...): the
    reason, and the payload kept inside the hospital so nothing is lost and it can be reprocessed."""

    __tablename__ = "dead_letter"
    __table_args__ = (
        PrimaryKeyConstraint("id", name="pk_dead_letter"),
        CheckConstraint(_in_list("status", DEAD_LETTER_STATUSES), name="ck_dead_letter_status"),
        Index("ix_dead_letter_channel_id", "channel", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, autoincrement=True)
    channel: Mapped[str] = mapped_column(String)
    intake_key: Mapped[str] = mapped_column(String)
    origin: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    payload_size: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


AUDIT_GENESIS_HASH = "0" * 64  # the predecessor hash of the first audit entry (esource.audit.chain)


class AuditLogRow(Base):
    """One entry of the append-only, hash-chained audit trail (migration 0004). `id` is assigned by the
    store under the chain lock (audit_head.last_id + 1): ids are contiguous, so a gap is a deleted row.
    `hash` = SHA-256 of the canonical form of every other column (see esource.audit.chain)."""

    __tablename__ = "audit_log"
    __table_args__ = (
        PrimaryKeyConstraint("id", name="pk_audit_log"),
        Index("ix_audit_log_study_subject_id", "study_oid", "subject_key", "id"),
        Index("ix_audit_log_study_item", "study_oid", "subject_key", "item_oid", "form_oid"),
        Index("ix_audit_log_study_action_id", "study_oid", "action", "id"),
        Index("ix_audit_log_study_at", "study_oid", "at"),
        Index("ix_audit_log_actor_at", "actor", "at"),
    )

    id: Mapped[int] = mapped_column(Integer, autoincrement=False)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String)
    action: Mapped[str] = mapped_column(String)
    study_oid: Mapped[str | None] = mapped_column(String, nullable=True)
    subject_key: Mapped[str | None] = mapped_column(String, nullable=True)
    site_oid: Mapped[str | None] = mapped_column(String, nullable=True)
    # the item key (NULL when the entry is not about one ItemData; an absent repeat key is NULL too)
    study_event_oid: Mapped[str | None] = mapped_column(String, nullable=True)
    study_event_repeat_key: Mapped[str | None] = mapped_column(String, nullable=True)
    form_oid: Mapped[str | None] = mapped_column(String, nullable=True)
    item_group_oid: Mapped[str | None] = mapped_column(String, nullable=True)
    item_group_repeat_key: Mapped[str | None] = mapped_column(String, nullable=True)
    item_oid: Mapped[str | None] = mapped_column(String, nullable=True)
    old_value: Mapped[str | None] = mapped_column(Text, nullable=True)
    new_value: Mapped[str | None] = mapped_column(Text, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    source_type: Mapped[str | None] = mapped_column(String, nullable=True)
    source_id: Mapped[str | None] = mapped_column(String, nullable=True)
    source_version: Mapped[str | None] = mapped_column(String, nullable=True)
    source_identity: Mapped[str | None] = mapped_column(String, nullable=True)
    rule: Mapped[str | None] = mapped_column(String, nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHeadRow(Base):
    """The newest audit entry's id and hash (one row, id = 1): what appenders lock (SELECT ... FOR
    UPDATE on PostgreSQL) to chain their entries one after the other, and what `verify` checks the
    tail against (a deleted last entry leaves the head pointing past the table)."""

    __tablename__ = "audit_head"
    __table_args__ = (
        PrimaryKeyConstraint("id", name="pk_audit_head"),
        CheckConstraint("id = 1", name="ck_audit_head_singleton"),
    )

    id: Mapped[int] = mapped_column(Integer, autoincrement=False)
    last_id: Mapped[int] = mapped_column(Integer)
    last_hash: Mapped[str] = mapped_column(String(64))


class ApiUserRow(Base):
    """A person or service account of the role-based API (migration 0005). Roles, sites and studies are
    JSON lists (NULL sites/studies: no restriction); the password only as a scrypt hash."""

    __tablename__ = "api_user"
    __table_args__ = (PrimaryKeyConstraint("username", name="pk_api_user"),)

    username: Mapped[str] = mapped_column(String)
    roles: Mapped[list[str]] = mapped_column(JSON)
    sites: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    studies: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    password_hash: Mapped[str | None] = mapped_column(String, nullable=True)
    active: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class ApiTokenRow(Base):
    """An API bearer token (migration 0005): found by its public id, checked against the SHA-256 of the
    whole token; the token itself is never stored."""

    __tablename__ = "api_token"
    __table_args__ = (
        PrimaryKeyConstraint("token_id", name="pk_api_token"),
        ForeignKeyConstraint(["username"], ["api_user.username"], name="fk_api_token_api_user", ondelete="CASCADE"),
        Index("ix_api_token_username", "username"),
    )

    token_id: Mapped[str] = mapped_column(String)
    token_hash: Mapped[str] = mapped_column(String(64))
    username: Mapped[str] = mapped_column(String)
    label: Mapped[str | None] = mapped_column(String, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class OutboxVisitRow(Base):
    """The StudyEventOIDs inside one outbox transaction (migration 0005), so the transfers API can filter
    by visit in SQL. Derived from the stored ODM; rows are added lazily for outbox rows not yet indexed
    ('' marks a transaction without a StudyEventData)."""

    __tablename__ = "outbox_visit"
    __table_args__ = (
        PrimaryKeyConstraint("outbox_id", "study_event_oid", name="pk_outbox_visit"),
        ForeignKeyConstraint(["outbox_id"], ["outbox.id"], name="fk_outbox_visit_outbox", ondelete="CASCADE"),
        Index("ix_outbox_visit_study_event_oid", "study_event_oid", "outbox_id"),
    )

    outbox_id: Mapped[int] = mapped_column(Integer, autoincrement=False)
    study_event_oid: Mapped[str] = mapped_column(String)
