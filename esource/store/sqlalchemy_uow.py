"""The database implementation of the `UnitOfWork` port (esource/domain/ports.py), and the `Store`
facade that opens a database, migrates it and hands out units of work.

    store = Store("sqlite:///esource.db")          # migrates to head on open
    with store.uow() as uow:
        subject = uow.find_enrollment("CV01", [("urn:oid:1.2.250.1.213.1.4.8", "...")])
        ...
        uow.commit()                                # nothing is written unless committed
    store.dispose()

Concurrency (why allocation is race-safe)
- SQLite: every read-write unit of work starts with `BEGIN IMMEDIATE` (see `engine.py`), so writers
  run one at a time and "read max, insert max + 1" cannot interleave with another writer.
- PostgreSQL (READ COMMITTED): no table locks. Allocation inserts with `ON CONFLICT DO NOTHING`,
  relying on the unique constraints: if a concurrent transaction took the same identity or the same
  key, the insert waits for it, then does nothing; we re-read (a new statement sees what the other
  committed) and try again with the next key. No exception is raised, so the transaction stays
  usable (no savepoint needed). Bounded retries end in `StoreConflictError`. Under REPEATABLE READ or
  SERIALIZABLE the re-read would not see the other commit: keep the default isolation level.
- Two units of work writing the same subject's outbox sequence at once cannot both win: the second
  gets `StoreConflictError` and must re-run the whole unit of work (the ODM embeds its sequence).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from functools import lru_cache
from typing import Any, Callable, Iterable, Mapping, Sequence, cast

from sqlalchemy import (Engine, Table, and_, bindparam, exists, func, insert, or_, select, text, tuple_, union_all,
                        update)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, CursorResult, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from esource.audit.chain import chain_rows as audit_chain_rows, row_values as audit_row_values
from esource.domain.audit import AuditAction, AuditEntry, AuditEvent
from esource.domain.model import (
    Discrepancy,
    DiscrepancyKind,
    Enrollment,
    ItemKey,
    Severity,
    SourceRef,
    SubjectTransaction,
)
from esource.domain.ports import Clock, SentItem, StoredFact, SystemClock
from esource.errors import EnrollmentError
from esource.services.conflicts import previous_values_of
from esource.store.bulk import executemany
from esource.store.engine import READ_ONLY_OPTION, WalCheckpointer, make_engine, sqlite_file
from esource.store.errors import AmbiguousEnrollmentError, StoreConflictError, StoreError
from esource.reconciliation.model import (
    DiscrepancyFilter,
    DiscrepancyNotFound,
    DiscrepancyRecord,
    DiscrepancyStateError,
)
from esource.store.schema import DISCREPANCY_RESOLUTIONS, REVIEW_MODES, ReviewPolicyRow
from esource.store.schema import (
    DISCREPANCY_STATUSES,
    OPEN_DISCREPANCY_STATUSES,
    OUTBOX_STATUSES,
    AUDIT_GENESIS_HASH,
    DEAD_LETTER_STATUSES,
    AuditHeadRow,
    AuditLogRow,
    DeadLetterRow,
    DiscrepancyRow,
    EdcKeyMapRow,
    EnrollmentIdentifierRow,
    EnrollmentRow,
    FirstSeenRow,
    IntakeRow,
    ItemStateRow,
    OutboxRow,
    RepeatKeyRow,
    SubjectFactRow,
)

__all__ = [
    "DeadLetterEntry",
    "OutboxEntry",
    "SqlAlchemyUnitOfWork",
    "Store",
    "discrepancy_natural_key",
    "make_engine",
]

log = logging.getLogger("esource.store")

# Core tables: all reads and writes go through Core statements (no ORM identity map to go stale
# between an upsert and a later read in the same unit of work).
_enrollment: Table = EnrollmentRow.__table__  # type: ignore[assignment]
_identifier: Table = EnrollmentIdentifierRow.__table__  # type: ignore[assignment]
_intake: Table = IntakeRow.__table__  # type: ignore[assignment]
_fact: Table = SubjectFactRow.__table__  # type: ignore[assignment]
_item: Table = ItemStateRow.__table__  # type: ignore[assignment]
_repeat: Table = RepeatKeyRow.__table__  # type: ignore[assignment]
_first_seen: Table = FirstSeenRow.__table__  # type: ignore[assignment]
_discrepancy: Table = DiscrepancyRow.__table__  # type: ignore[assignment]
_outbox: Table = OutboxRow.__table__  # type: ignore[assignment]
_dead_letter: Table = DeadLetterRow.__table__  # type: ignore[assignment]
_edc_key_map: Table = EdcKeyMapRow.__table__  # type: ignore[assignment]
_review_policy: Table = ReviewPolicyRow.__table__  # type: ignore[assignment]
_audit_log: Table = AuditLogRow.__table__  # type: ignore[assignment]
_audit_head: Table = AuditHeadRow.__table__  # type: ignore[assignment]

# Statements of the per-subject hot path, built once: building one cost about as much as running it.
# Those with a variable number of terms are cached per number of terms.
_STUDY, _SUBJECT = bindparam("study"), bindparam("subject")
_SENT_BASE = select(
    _item.c.id, _item.c.study_event_oid, _item.c.study_event_repeat_key, _item.c.form_oid, _item.c.item_group_oid,
    _item.c.item_group_repeat_key, _item.c.item_oid, _item.c.value, _item.c.source_identity,
    _item.c.source_version, _item.c.source_type, _item.c.source_id, _item.c.rule, _item.c.frozen,
).where(_item.c.study_oid == _STUDY, _item.c.subject_key == _SUBJECT)
_SENT_STMTS: dict[str, Any] = {  # sent_items' parts
    "all": _SENT_BASE.order_by(_item.c.id),
    "identities": _SENT_BASE.where(_item.c.source_identity.in_(bindparam("ids", expanding=True))),
    # the same for a batch's subjects (pairs filtered by the caller)
    "identities_of": select(_item.c.subject_key, *_SENT_BASE.selected_columns).where(
        _item.c.study_oid == _STUDY, _item.c.subject_key.in_(bindparam("subjects", expanding=True)),
        _item.c.source_identity.in_(bindparam("ids", expanding=True))),
    "type_ids": _SENT_BASE.where(
        tuple_(_item.c.source_type, _item.c.source_id).in_(bindparam("tids", expanding=True))),
    "frozen": _SENT_BASE.where(_item.c.frozen.is_(True)),
}
_SENT_COLUMN_NAMES = ", ".join(c.name for c in _SENT_BASE.selected_columns)
# PostgreSQL: the buckets as four arrays, each looked up on its own (LATERAL with OFFSET 0, which the
# planner cannot flatten into one join over all of the subject's items: an index lookup per bucket
# whatever the statistics). One statement text for any number of buckets: the UNION ALL form (below)
# cost PostgreSQL ~20 ms of planning for 50 buckets, more than the rest of a subject's mapping.
# (subject, bucket) pairs as five arrays: one subject's buckets (`sent_items`) or a batch's (`sent_items_in`)
_SENT_BUCKETS_PG = text(
    f"SELECT b.s AS subject_key, t.* FROM unnest(CAST(:s AS VARCHAR[]), CAST(:e AS VARCHAR[]), "
    f"CAST(:r AS VARCHAR[]), CAST(:f AS VARCHAR[]), CAST(:g AS VARCHAR[])) AS b(s, e, r, f, g) CROSS JOIN LATERAL "
    f"(SELECT {_SENT_COLUMN_NAMES} FROM item_state WHERE study_oid = :study AND subject_key = b.s AND "
    f"study_event_oid = b.e AND study_event_repeat_key = b.r AND form_oid = b.f AND item_group_repeat_key = b.g "
    f"OFFSET 0) AS t")
_SENT_FROM_PG = text(
    f"SELECT p.s AS subject_key, t.* FROM unnest(CAST(:s AS VARCHAR[]), CAST(:i AS VARCHAR[])) AS p(s, i) "
    f"CROSS JOIN LATERAL (SELECT {_SENT_COLUMN_NAMES} FROM item_state WHERE study_oid = :study AND "
    f"subject_key = p.s AND source_identity = p.i OFFSET 0) AS t")
_FACT_COLUMNS = (_fact.c.identity, _fact.c.resource_type, _fact.c.resource_id, _fact.c.version, _fact.c.full_url,
                 _fact.c.resource, _fact.c.first_seen, _fact.c.clinical_date, _fact.c.clinical_basis)
_FACT_OF_SUBJECT = (_fact.c.study_oid == _STUDY, _fact.c.subject_key == _SUBJECT)
_FACT_BY_IDENTITY_PG = text(
    "SELECT p.s AS subject_key, t.* FROM unnest(CAST(:s AS VARCHAR[]), CAST(:i AS VARCHAR[])) AS p(s, i) "
    "CROSS JOIN LATERAL (SELECT id, identity, resource_type, resource_id, version, full_url, resource, first_seen, "
    "clinical_date, clinical_basis FROM subject_fact WHERE study_oid = :study AND subject_key = p.s AND "
    "identity = p.i OFFSET 0) AS t")
# `facts(dates=...)` for many subjects, each with its own date ranges (`facts_of`)
# (each range an index lookup of its own, LATERAL ... OFFSET 0; the undated and other-basis facts
# from the subjects' index entries; one EXISTS over all ranges per fact cost ~35 ms a batch)
_FACT_WINDOWS_PG = text(
    "SELECT f.subject_key, f.id, f.identity, f.resource_type, f.resource_id, f.version, f.full_url, f.resource, "
    "f.first_seen, f.clinical_date, f.clinical_basis FROM subject_fact f WHERE f.id IN ("
    "SELECT t.id FROM unnest(CAST(:s AS VARCHAR[]), CAST(:lo AS DATE[]), CAST(:hi AS DATE[])) AS p(s, lo, hi) "
    "CROSS JOIN LATERAL (SELECT id FROM subject_fact WHERE study_oid = :study AND subject_key = p.s AND "
    "clinical_date BETWEEN p.lo AND p.hi OFFSET 0) AS t "
    "UNION ALL SELECT id FROM subject_fact WHERE study_oid = :study AND "
    "subject_key = ANY(CAST(:subjects AS VARCHAR[])) AND (clinical_date IS NULL OR clinical_basis IS NULL OR "
    "clinical_basis <> :basis))")
_FACT_STMTS: dict[str, Any] = {
    "all": select(*_FACT_COLUMNS).where(*_FACT_OF_SUBJECT).order_by(_fact.c.first_seen, _fact.c.id),
    # the kept versions of the incoming records of a batch's subjects (pairs filtered by the caller)
    "by_identity_of": select(_fact.c.subject_key, _fact.c.id, *_FACT_COLUMNS).where(
        _fact.c.study_oid == _STUDY, _fact.c.subject_key.in_(bindparam("subjects", expanding=True)),
        _fact.c.identity.in_(bindparam("identities", expanding=True))),
}
_PREPARED: dict[str, Any] = {
    "subject_known": select(or_(
        exists().where(_item.c.study_oid == _STUDY, _item.c.subject_key == _SUBJECT),
        exists().where(_outbox.c.study_oid == _STUDY, _outbox.c.subject_key == _SUBJECT))),
    "max_sequence": select(func.max(_outbox.c.sequence)).where(_outbox.c.study_oid == _STUDY,
                                                               _outbox.c.subject_key == _SUBJECT),
    # the enrollments of some subjects (`subjects` expanding): find_enrollment(s)' second step
    "enrollments_of": select(_enrollment).where(
        _enrollment.c.study_oid == _STUDY, _enrollment.c.subject_key.in_(bindparam("subjects", expanding=True))),
    "enrollment_identifiers_of": select(_identifier.c.subject_key, _identifier.c.system, _identifier.c.value).where(
        _identifier.c.study_oid == _STUDY, _identifier.c.subject_key.in_(bindparam("subjects", expanding=True))
    ).order_by(_identifier.c.id),
    "max_sequences": select(_outbox.c.subject_key, func.max(_outbox.c.sequence)).where(
        _outbox.c.study_oid == _STUDY, _outbox.c.subject_key.in_(bindparam("subjects", expanding=True))
    ).group_by(_outbox.c.subject_key),
    # answered from the partial index ix_item_state_frozen (its predicate is the frozen term)
    "frozen_of": select(_item.c.subject_key, *_SENT_BASE.selected_columns).where(
        _item.c.study_oid == _STUDY, _item.c.subject_key.in_(bindparam("subjects", expanding=True)),
        _item.c.frozen.is_(True)).order_by(_item.c.id),
}
_OUTBOX_INSERT: dict[str, Any] = {}  # per dialect


@lru_cache(maxsize=None)
def _sent_buckets_statement(n: int) -> Any:
    """The items of `n` buckets: a UNION ALL of one equality lookup per bucket, which both databases
    answer from the bucket index whatever their statistics (a tuple IN, or an OR without ANALYZE,
    made SQLite read every item of the subject)."""
    t = _item
    parts = [_SENT_BASE.where(
        t.c.study_event_oid == bindparam(f"e{i}"), t.c.study_event_repeat_key == bindparam(f"r{i}"),
        t.c.form_oid == bindparam(f"f{i}"), t.c.item_group_repeat_key == bindparam(f"g{i}")) for i in range(n)]
    return parts[0] if n == 1 else union_all(*parts)


@lru_cache(maxsize=None)
def _fact_window_statement(n: int) -> Any:
    """The facts an incremental run reads: undated ones, ones dated under another map basis, and
    ones inside one of `n` date ranges."""
    t = _fact
    conds = [t.c.clinical_date.is_(None), t.c.clinical_basis.is_(None), t.c.clinical_basis != bindparam("basis")]
    conds.extend(t.c.clinical_date.between(bindparam(f"lo{i}"), bindparam(f"hi{i}")) for i in range(n))
    return select(*_FACT_COLUMNS).where(*_FACT_OF_SUBJECT, or_(*conds)).order_by(t.c.first_seen, t.c.id)


def _pair_lookups(session: Session, pg: Any, generic: Any, wanted: Mapping[str, list[str]], name: str
                  ) -> Iterable[tuple[Any, dict[str, Any]]]:
    """(statement, parameters) looking up every (subject, value) pair of `wanted`. PostgreSQL: the
    pairs as two arrays, one index lookup each (LATERAL ... OFFSET 0: whatever the statistics, even
    before a fresh table's first ANALYZE, where `IN` lists made it read every row of the subjects).
    Elsewhere: `subject IN (..) AND value IN (..)` in chunks (`_pair_chunks`); the caller filters."""
    if session.get_bind().dialect.name == "postgresql":
        pairs = [(k, v) for k, vals in wanted.items() for v in dict.fromkeys(vals)]
        for i in range(0, len(pairs), 5000):
            chunk = pairs[i:i + 5000]
            yield pg, {"s": [k for k, _ in chunk], "i": [v for _, v in chunk]}
        return
    for subjects, values in _pair_chunks(wanted):
        yield generic, {"subjects": subjects, name: values}


def _pair_chunks(wanted: Mapping[str, Iterable[str]], limit: int = 500) -> Iterable[tuple[list[str], list[str]]]:
    """(subjects, values) chunks covering every (subject, value) pair of `wanted`, whole subjects
    together until `limit` values: a `subject IN (..) AND value IN (..)` lookup probes the index
    for subjects x values, so a chunk keeps both lists short. Why not a pair IN: SQLite searches
    only the index's first column for `(a, b) IN (VALUES ...)`."""
    subjects: list[str] = []
    values: dict[str, None] = {}
    for subject, vals in wanted.items():
        vals = list(dict.fromkeys(vals))
        for i in range(0, len(vals), limit):
            part = vals[i:i + limit]
            if values and len(values) + len(part) > limit:
                yield subjects, list(values)
                subjects, values = [], {}
            if not subjects or subjects[-1] != subject:
                subjects.append(subject)
            values.update(dict.fromkeys(part))
    if values:
        yield subjects, list(values)


def _sent_of(study_oid: str, subject_key: str, rows: Iterable[Any]) -> dict[ItemKey, SentItem]:
    """Item-state rows (`_SENT_BASE`'s columns) as the diff's SentItems."""
    out: dict[ItemKey, SentItem] = {}
    for _id, event, event_repeat, form, group, group_repeat, item, value, identity, version, stype, sid, rule, \
            is_frozen in rows:
        key = ItemKey(study_oid, subject_key, event, event_repeat or None, form, group, group_repeat or None, item)
        out[key] = SentItem(key, value, identity, version, stype, sid, rule, bool(is_frozen))
    return out


@lru_cache(maxsize=None)
def _identifier_statement(n: int) -> Any:
    """The enrolled (subject, system, value) among `n` (system, value) pairs."""
    t = _identifier
    return select(t.c.subject_key, t.c.system, t.c.value).where(
        t.c.study_oid == _STUDY,
        or_(*(and_(t.c.system == bindparam(f"s{i}"), t.c.value == bindparam(f"v{i}")) for i in range(n))))

_ITEM_KEY_COLUMNS = (
    "study_oid",
    "subject_key",
    "study_event_oid",
    "study_event_repeat_key",
    "form_oid",
    "item_group_oid",
    "item_group_repeat_key",
    "item_oid",
)

_ITEM_STATE_COLUMNS = ("value", "source_identity", "source_version", "source_type", "source_id", "rule", "frozen",
                       "updated_at")
_ITEM_UPSERT: dict[str, Any] = {}  # dialect name -> compiled-once upsert of item_state

#: How many times a repeat key allocation re-reads and retries after losing a race (PostgreSQL).
MAX_ALLOCATION_ATTEMPTS = 50


def discrepancy_natural_key(key: Sequence[str]) -> str:
    """The `discrepancy.natural_key` text of a `Discrepancy.key` tuple: the parts joined as a compact
    JSON array, so no part (an identity may contain '|') can run into the next one."""
    return json.dumps(list(key), ensure_ascii=False, separators=(",", ":"))


# reconciliation queue (migration 0006): what a closed discrepancy's decision rests on, and the columns
# cleared when it is re-opened
_DECISION_FACTS: tuple[str, ...] = ("held_value", "source_identity", "source_version", "source_element")
_NO_RESOLUTION: dict[str, Any] = {"resolution": None, "resolved_by": None, "resolved_at": None,
                                  "resolution_reason": None, "resolution_value": None}
_KEEP: Any = object()  # "leave this column as it is"


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)  # keep every digit
    if isinstance(value, (dt.date, dt.datetime, dt.time)):
        return value.isoformat()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"cannot store {type(value).__name__} in a JSON column")


def _json_ready(value: Any) -> Any:
    """What the JSON column will give back: lists for tuples, str for Decimal and dates."""
    return json.loads(json.dumps(value, default=_json_default))


def _repeat_in(value: str | None) -> str:
    return "" if value is None else value


def _repeat_out(value: str) -> str | None:
    return None if value == "" else value


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One row of the outbox, for the dispatcher and the API."""

    id: int
    study_oid: str
    subject_key: str
    sequence: int
    site_oid: str
    odm: bytes
    item_count: int
    status: str
    attempts: int
    created_at: dt.datetime
    sent_at: dt.datetime | None
    last_error: str | None
    # {item path: value esource last sent} of the ItemData this row Updates (empty on rows queued
    # before migration 0003): what the dispatcher's conflict check compares the EDC's values with
    previous_values: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DeadLetterEntry:
    id: int
    channel: str
    intake_key: str
    origin: str
    reason: str
    payload: bytes
    status: str
    received_at: dt.datetime


class SqlRepeatKeys:
    """`RepeatKeyAllocator` on the unit of work's transaction: first-seen order, stable, never reused
    (rows are never updated or deleted, and a new key is always max + 1)."""

    def __init__(self, uow: SqlAlchemyUnitOfWork) -> None:
        self._uow = uow

    def key_for(self, study_oid: str, subject_key: str, form_oid: str, identity: str) -> int:
        session = self._uow._writable()
        t = _repeat
        same_form = (t.c.study_oid == study_oid, t.c.subject_key == subject_key, t.c.form_oid == form_oid)
        for _ in range(MAX_ALLOCATION_ATTEMPTS):
            key = session.execute(select(t.c.repeat_key).where(*same_form, t.c.identity == identity)).scalar()
            if key is not None:
                return int(key)
            top = session.execute(select(func.max(t.c.repeat_key)).where(*same_form)).scalar()
            candidate = (top or 0) + 1
            inserted = session.execute(
                self._uow._insert(t)
                .values(
                    study_oid=study_oid,
                    subject_key=subject_key,
                    form_oid=form_oid,
                    identity=identity,
                    repeat_key=candidate,
                    created_at=self._uow._now(),
                )
                .on_conflict_do_nothing()  # either unique constraint: a concurrent writer got there first
                .returning(t.c.id)
            )
            if inserted.first() is not None:
                return candidate
        raise StoreConflictError(
            f"study {study_oid}, subject {subject_key}, form {form_oid}: could not allocate a repeat key "
            f"after {MAX_ALLOCATION_ATTEMPTS} attempts (heavy contention, or an isolation level above "
            "READ COMMITTED); roll back and retry"
        )


class SqlFirstSeen:
    """`FirstSeenRegistry` on the unit of work's transaction: the first call's date is kept forever."""

    def __init__(self, uow: SqlAlchemyUnitOfWork) -> None:
        self._uow = uow

    def first_seen(self, study_oid: str, subject_key: str, identity: str, today: dt.date) -> dt.date:
        session = self._uow._writable()
        t = _first_seen
        session.execute(
            self._uow._insert(t)
            .values(
                study_oid=study_oid,
                subject_key=subject_key,
                identity=identity,
                first_seen=today,
                created_at=self._uow._now(),
            )
            .on_conflict_do_nothing(index_elements=[t.c.study_oid, t.c.subject_key, t.c.identity])
        )
        stored = session.execute(
            select(t.c.first_seen).where(
                t.c.study_oid == study_oid, t.c.subject_key == subject_key, t.c.identity == identity
            )
        ).scalar_one()
        return stored


class SqlAlchemyUnitOfWork:
    """One database transaction around a use case (implements `esource.domain.ports.UnitOfWork`).

    Use as a context manager: the transaction begins on enter; on exit whatever was not committed is
    rolled back (so an exception, or simply forgetting `commit()`, writes nothing). `commit()` may be
    called more than once; work after a commit starts a new transaction.

    Build it from a session factory bound to an engine made by `make_engine` (that engine's BEGIN
    handling is what makes SQLite safe under concurrency), or get one from `Store.uow()`.
    """

    def __init__(
        self,
        session_factory: Callable[[], Session],
        *,
        clock: Clock | None = None,
        read_only: bool = False,
        audit_session_factory: Callable[[], Session] | None = None,
    ) -> None:
        self._session_factory = session_factory
        self._clock: Clock = clock or SystemClock()
        self._read_only = read_only
        self._session: Session | None = None
        # audit events of this transaction, chained and inserted at commit (see `audit`)
        self._audit_pending: list[dict[str, Any]] = []
        # read-only units of work record DATA_READ through a short write transaction of their own
        self._audit_session_factory = audit_session_factory
        self.repeat_keys = SqlRepeatKeys(self)
        self.first_seen = SqlFirstSeen(self)

    # -- transaction -------------------------------------------------------------------------------

    def __enter__(self) -> SqlAlchemyUnitOfWork:
        if self._session is not None:
            raise StoreError("this unit of work is already in use: open a new one")
        self._session = self._session_factory()
        self._session.begin()
        return self

    def __exit__(self, *exc: object) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        reads, self._audit_pending = self._audit_pending, []
        try:
            session.rollback()  # a no-op after commit(); undoes anything not committed
        finally:
            session.close()
        if reads and self._read_only and exc[0] is None:
            self._write_read_audit(reads)  # what was read is recorded before the caller uses it

    def commit(self) -> None:
        session = self._active()
        pending, self._audit_pending = self._audit_pending, []
        if pending and self._read_only:
            self._write_read_audit(pending)
            pending = []
        if pending:
            self._append_audit(session, pending)
        session.commit()

    def rollback(self) -> None:
        self._audit_pending = []  # the events of a rolled-back transaction vanish with it
        self._active().rollback()

    @property
    def session(self) -> Session:
        """The SQLAlchemy session of the open transaction (for queries the port does not cover)."""
        return self._active()

    def _active(self) -> Session:
        if self._session is None:
            raise StoreError("the unit of work is not open: use it as a context manager (with store.uow() as uow:)")
        return self._session

    def _writable(self) -> Session:
        if self._read_only:
            raise StoreError("this unit of work is read-only: open it with store.uow() to write")
        return self._active()

    def _now(self) -> dt.datetime:
        now = self._clock.now()
        if now.tzinfo is None or now.utcoffset() is None:
            raise StoreError("the clock returned a naive datetime: it must return timezone-aware UTC")
        return now.astimezone(dt.timezone.utc)

    def _insert(self, table: Table) -> Any:
        """A dialect INSERT that supports ON CONFLICT (SQLite and PostgreSQL spell it the same)."""
        name = self._active().get_bind().dialect.name
        if name == "postgresql":
            return postgresql.insert(table)
        if name == "sqlite":
            return sqlite.insert(table)
        raise StoreError(f"unsupported database dialect {name!r}: esource supports SQLite and PostgreSQL")

    # -- audit trail (migration 0004; the chain's canonical form: esource/audit/chain.py) ---------------

    def audit(self, event: AuditEvent) -> None:
        """Record an audit event in this transaction. Buffered, then numbered, hash-chained and inserted
        (one executemany) when the unit of work commits, holding the chain lock (`audit_head`) only
        then; a rollback drops it. A read-only unit of work records DATA_READ events only: they are
        written by a short write transaction of their own when it closes (or commits) without an
        exception — before the caller can hand out what was read."""
        self._active()
        if self._read_only:
            if event.action is not AuditAction.DATA_READ:
                raise StoreError(f"a read-only unit of work records only {AuditAction.DATA_READ.value} events, "
                                 f"not {event.action}: record changes in the unit of work that makes them")
            if self._audit_session_factory is None:
                raise StoreError("this read-only unit of work cannot record audit events: open it with Store.uow()")
        at = event.at if event.at is not None else self._now()
        if at.tzinfo is not dt.timezone.utc and (at.tzinfo is None or at.utcoffset() is None):
            raise StoreError("an audit event's time must be timezone-aware UTC")
        try:
            self._audit_pending.append(audit_row_values(event, at))
        except TypeError as exc:
            raise StoreError(f"audit event {event.action}: {exc}") from None

    def _append_audit(self, session: Session, values: list[dict[str, Any]]) -> None:
        """Chain `values` after the head and insert them; the head row stays locked until commit
        (PostgreSQL: SELECT ... FOR UPDATE; SQLite: the write transaction already excludes others)."""
        h = _audit_head
        head = select(h.c.last_id, h.c.last_hash).where(h.c.id == 1).with_for_update()
        row = session.execute(head).first()
        if row is None:  # a database built without the migration's seed row
            dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
            session.execute(dialect.insert(h).values(id=1, last_id=0, last_hash=AUDIT_GENESIS_HASH)
                            .on_conflict_do_nothing())
            row = session.execute(head).one()
        rows = audit_chain_rows(values, int(row.last_id), str(row.last_hash))
        executemany(session, "audit_log.insert", insert(_audit_log), rows)
        session.execute(update(h).where(h.c.id == 1).values(last_id=rows[-1]["id"], last_hash=rows[-1]["hash"]))

    def _write_read_audit(self, values: list[dict[str, Any]]) -> None:
        factory = self._audit_session_factory
        if factory is None:  # checked in audit(); kept for safety
            raise StoreError("this read-only unit of work cannot record audit events")
        session = factory()
        try:
            session.begin()
            self._append_audit(session, values)
            session.commit()
        finally:
            session.close()  # rolls back when the commit did not happen

    def audit_entries(
        self,
        *,
        study_oid: str | None = None,
        subject_key: str | None = None,
        item: ItemKey | None = None,
        item_oid: str | None = None,
        actions: Iterable[str] | None = None,
        actor: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        sites: Iterable[str] | None = None,
        limit: int | None = None,
        offset: int = 0,
        newest_first: bool = False,
    ) -> tuple[list[AuditEntry], int]:
        """Audit entries matching every filter given, in id (= chain) order, and how many match in
        all. `item` matches the whole item key (absent repeat keys as absent), `item_oid` only the
        ItemOID; `since` inclusive, `until` exclusive; `sites` keeps entries of those sites only
        (None: all; entries without a site are then left out)."""
        session = self._active()
        a = _audit_log
        conds: list[Any] = []
        if study_oid is not None:
            conds.append(a.c.study_oid == study_oid)
        if subject_key is not None:
            conds.append(a.c.subject_key == subject_key)
        if item is not None:
            for name in _ITEM_KEY_COLUMNS:
                value = getattr(item, name)
                conds.append(a.c[name].is_(None) if value is None else a.c[name] == value)
        if item_oid is not None:
            conds.append(a.c.item_oid == item_oid)
        if actions is not None:
            conds.append(a.c.action.in_([str(x) for x in actions]))
        if actor is not None:
            conds.append(a.c.actor == actor)
        if since is not None:
            conds.append(a.c.at >= since)
        if until is not None:
            conds.append(a.c.at < until)
        if sites is not None:
            conds.append(a.c.site_oid.in_(sorted(sites)))
        total = int(session.execute(select(func.count()).select_from(a).where(*conds)).scalar() or 0)
        q = select(a).where(*conds).order_by(a.c.id.desc() if newest_first else a.c.id).offset(offset)
        if limit is not None:
            q = q.limit(limit)
        return [self._audit_entry_of(r) for r in session.execute(q)], total

    def audit_range(self, first_id: int, last_id: int | None = None) -> list[AuditEntry]:
        """The entries with first_id <= id <= last_id (to the end when last_id is None), in id order."""
        a = _audit_log
        q = select(a).where(a.c.id >= first_id).order_by(a.c.id)
        if last_id is not None:
            q = q.where(a.c.id <= last_id)
        return [self._audit_entry_of(r) for r in self._active().execute(q)]

    def audit_rows(self, after_id: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        """Stored rows exactly as in the table (every column), id > after_id, in id order: what
        `esource.audit.verify` recomputes the hashes from."""
        a = _audit_log
        q = select(a).where(a.c.id > after_id).order_by(a.c.id).limit(limit)
        return [dict(r._mapping) for r in self._active().execute(q)]

    def audit_head(self) -> tuple[int, str]:
        """(id, hash) of the newest entry as the head row records them; (0, 64 zeros) when empty."""
        h = _audit_head
        row = self._active().execute(select(h.c.last_id, h.c.last_hash).where(h.c.id == 1)).first()
        return (0, AUDIT_GENESIS_HASH) if row is None else (int(row.last_id), str(row.last_hash))

    @staticmethod
    def _audit_entry_of(row: Any) -> AuditEntry:
        item = None
        if None not in (row.study_oid, row.subject_key, row.study_event_oid, row.form_oid, row.item_group_oid,
                        row.item_oid):
            item = ItemKey(row.study_oid, row.subject_key, row.study_event_oid, row.study_event_repeat_key,
                           row.form_oid, row.item_group_oid, row.item_group_repeat_key, row.item_oid)
        source = None
        if row.source_type is not None:
            source = SourceRef(resource_type=row.source_type, id=row.source_id, version=row.source_version or "",
                               identity=row.source_identity or "")
        try:
            action: Any = AuditAction(row.action)
        except ValueError:  # an action a newer esource wrote: shown as stored
            action = row.action
        event = AuditEvent(action=action, actor=row.actor, study_oid=row.study_oid, subject_key=row.subject_key,
                           site_oid=row.site_oid, item=item, old_value=row.old_value, new_value=row.new_value,
                           reason=row.reason, source=source, rule=row.rule, detail=dict(row.detail or {}), at=row.at)
        return AuditEntry(id=int(row.id), at=row.at, event=event, prev_hash=row.prev_hash, hash=row.hash)

    # -- enrollment --------------------------------------------------------------------------------

    def find_enrollment(self, study_oid: str, identifiers: Iterable[tuple[str, str]]) -> Enrollment | None:
        """The subject any of the patient's (system, value) identifiers is enrolled under, else None.
        Raises `AmbiguousEnrollmentError` when they name more than one subject of the study."""
        patient = tuple(dict.fromkeys((system, value) for system, value in identifiers))
        return self.find_enrollments(study_oid, [patient])[patient]

    def find_enrollments(self, study_oid: str, patients: Iterable[Sequence[tuple[str, str]]]
                         ) -> dict[tuple[tuple[str, str], ...], Enrollment | None]:
        """`find_enrollment` for the patients of a whole batch (each a sequence of identifiers, the
        key of the answer as a tuple): one lookup of all their identifiers and one load of the
        subjects found, instead of three round trips per patient. Raises `AmbiguousEnrollmentError`
        when one patient's identifiers name more than one subject."""
        session = self._active()
        wanted = list(dict.fromkeys(tuple(p) for p in patients))
        pairs = list(dict.fromkeys(pair for p in wanted for pair in p))
        owner: dict[tuple[str, str], str] = {}
        for i in range(0, len(pairs), 50):
            chunk = pairs[i:i + 50]
            params = {"study": study_oid, **{f"{k}{j}": v for j, pair in enumerate(chunk) for k, v in zip("sv", pair)}}
            for row in session.execute(_identifier_statement(len(chunk)), params):
                owner[(row.system, row.value)] = row.subject_key
        subject_of: dict[tuple[tuple[str, str], ...], str | None] = {}
        for p in wanted:
            keys = sorted({owner[pair] for pair in p if pair in owner})
            if len(keys) > 1:
                raise AmbiguousEnrollmentError(study_oid, keys)
            subject_of[p] = keys[0] if keys else None
        found = sorted({k for k in subject_of.values() if k is not None})
        loaded = {e.subject_key: e for e in self._load_enrollments(study_oid, found)} if found else {}
        return {p: (loaded.get(k) if k is not None else None) for p, k in subject_of.items()}

    def add_enrollment(self, enrollment: Enrollment) -> None:
        """Add a subject, or update it when (study, SubjectKey) exists: site, dates and withdrawal
        are replaced, and its identifiers become exactly `enrollment.identifiers`. An identifier
        already enrolled under another subject of the study raises `EnrollmentError`."""
        session = self._writable()
        e = enrollment
        pairs = list(dict.fromkeys((system, value) for system, value in e.identifiers))
        now = self._now()
        t_id = _identifier
        if pairs:
            clash = session.execute(
                select(t_id.c.system, t_id.c.subject_key).where(
                    t_id.c.study_oid == e.study_oid,
                    t_id.c.subject_key != e.subject_key,
                    or_(*(and_(t_id.c.system == s, t_id.c.value == v) for s, v in pairs)),
                )
            ).first()
            if clash is not None:
                raise EnrollmentError(
                    f"study {e.study_oid}, subject {e.subject_key}: an identifier of system {clash.system} "
                    f"is already enrolled as subject {clash.subject_key}"
                )
        t = _enrollment
        fields = {
            "site_oid": e.site_oid,
            "consent_date": e.consent_date,
            "day1": e.day1,
            "withdrawal_date": e.withdrawal_date,
        }
        existing = session.execute(
            select(t.c.id, *(t.c[name] for name in fields)).where(
                t.c.study_oid == e.study_oid, t.c.subject_key == e.subject_key
            )
        ).first()
        if existing is None:
            session.execute(
                t.insert().values(
                    study_oid=e.study_oid, subject_key=e.subject_key, created_at=now, updated_at=now, **fields
                )
            )
        fields_changed = existing is not None and any(getattr(existing, n) != v for n, v in fields.items())

        current = {
            (row.system, row.value): row.id
            for row in session.execute(
                select(t_id.c.id, t_id.c.system, t_id.c.value).where(
                    t_id.c.study_oid == e.study_oid, t_id.c.subject_key == e.subject_key
                )
            )
        }
        stale = [row_id for pair, row_id in current.items() if pair not in pairs]
        if stale:
            session.execute(t_id.delete().where(t_id.c.id.in_(stale)))
        missing = [pair for pair in pairs if pair not in current]
        if missing:
            try:
                with session.begin_nested():
                    session.execute(
                        t_id.insert(),
                        [
                            {"study_oid": e.study_oid, "subject_key": e.subject_key, "system": s, "value": v}
                            for s, v in missing
                        ],
                    )
            except IntegrityError as exc:  # a concurrent enrollment took one of them
                raise EnrollmentError(
                    f"study {e.study_oid}, subject {e.subject_key}: an identifier is already enrolled "
                    "under another subject"
                ) from exc
        if existing is not None and (fields_changed or stale or missing):
            session.execute(update(t).where(t.c.id == existing.id).values(updated_at=now, **fields))

    def enrollments(self, study_oid: str) -> list[Enrollment]:
        """Every subject of the study, by SubjectKey."""
        return self._load_enrollments(study_oid, None)

    def _load_enrollments(self, study_oid: str, subject_keys: Sequence[str] | None) -> list[Enrollment]:
        session = self._active()
        if subject_keys is not None:  # the hot path (every batch): statements prepared once
            q, q_id = _PREPARED["enrollments_of"], _PREPARED["enrollment_identifiers_of"]
            params: dict[str, Any] = {"study": study_oid, "subjects": list(subject_keys)}
        else:
            t, t_id = _enrollment, _identifier
            q = select(t).where(t.c.study_oid == study_oid).order_by(t.c.subject_key)
            q_id = select(t_id.c.subject_key, t_id.c.system, t_id.c.value).where(
                t_id.c.study_oid == study_oid).order_by(t_id.c.id)
            params = {}
        identifiers: dict[str, list[tuple[str, str]]] = {}
        for row in session.execute(q_id, params):
            identifiers.setdefault(row.subject_key, []).append((row.system, row.value))
        return [
            Enrollment(
                study_oid=row.study_oid,
                subject_key=row.subject_key,
                site_oid=row.site_oid,
                identifiers=tuple(identifiers.get(row.subject_key, ())),
                consent_date=row.consent_date,
                day1=row.day1,
                withdrawal_date=row.withdrawal_date,
            )
            for row in session.execute(q, params)
        ]

    # -- intake de-duplication -------------------------------------------------------------------------

    def seen_intake(self, intake_key: str) -> bool:
        session = self._active()
        return session.execute(select(exists().where(_intake.c.intake_key == intake_key))).scalar_one()

    def mark_intake(self, intake_key: str) -> None:
        """Record an intake key (idempotent: marking it again changes nothing)."""
        session = self._writable()
        session.execute(
            self._insert(_intake)
            .values(intake_key=intake_key, received_at=self._now())
            .on_conflict_do_nothing(index_elements=[_intake.c.intake_key])
        )

    def seen_intakes(self, intake_keys: Sequence[str]) -> set[str]:
        """Which of these intake keys were processed before (one query per 500 keys)."""
        session = self._active()
        seen: set[str] = set()
        keys = list(dict.fromkeys(intake_keys))
        for i in range(0, len(keys), 500):
            seen.update(session.execute(select(_intake.c.intake_key)
                                        .where(_intake.c.intake_key.in_(keys[i:i + 500]))).scalars())
        return seen

    def mark_intakes(self, intake_keys: Sequence[str]) -> None:
        """Record many intake keys in one executemany (idempotent)."""
        if not intake_keys:
            return
        session = self._writable()
        now = self._now()
        executemany(session, "intake.insert",
                    self._insert(_intake).on_conflict_do_nothing(index_elements=[_intake.c.intake_key]),
                    [{"intake_key": k, "received_at": now} for k in dict.fromkeys(intake_keys)])

    def prune_intake(self, received_before: dt.datetime) -> int:
        """Forget intake keys received before a moment: the table otherwise grows with every message.
        Safe once no channel can redeliver them — choose a moment older than the Kafka topic's
        retention and any client's retry window (a key forgotten and then redelivered is mapped again;
        its content changes nothing, but a duplicate message audit entry is lost). Returns the count."""
        from sqlalchemy import delete

        if received_before.tzinfo is None:
            raise ValueError("received_before must be timezone-aware (UTC)")
        session = self._writable()
        done = cast(CursorResult[Any], session.execute(delete(_intake).where(_intake.c.received_at < received_before)))
        return int(done.rowcount or 0)

    # -- subject facts -------------------------------------------------------------------------------

    def upsert_fact(self, study_oid: str, subject_key: str, fact: StoredFact) -> bool:
        """Keep the newest version of a source record. True when something changed: a new identity,
        or a different version (then the resource is replaced; its first_seen date is kept)."""
        session = self._writable()
        t = _fact
        where = (t.c.study_oid == study_oid, t.c.subject_key == subject_key, t.c.identity == fact.identity)
        now = self._now()
        content = {
            "resource_type": fact.resource_type,
            "resource_id": fact.resource_id,
            "version": fact.version,
            "full_url": fact.full_url,
            "resource": _json_ready(fact.resource),
            "clinical_date": fact.clinical_date,
            "clinical_basis": fact.clinical_basis,
            "updated_at": now,
        }
        existing = session.execute(select(t.c.id, t.c.version).where(*where)).first()
        if existing is None:
            inserted = session.execute(
                self._insert(t)
                .values(
                    study_oid=study_oid,
                    subject_key=subject_key,
                    identity=fact.identity,
                    first_seen=fact.first_seen,
                    created_at=now,
                    **content,
                )
                .on_conflict_do_nothing(index_elements=[t.c.study_oid, t.c.subject_key, t.c.identity])
                .returning(t.c.id)
            )
            if inserted.first() is not None:
                return True
            existing = session.execute(select(t.c.id, t.c.version).where(*where)).one()  # lost a race
        if existing.version == fact.version:
            return False
        session.execute(update(t).where(t.c.id == existing.id).values(**content))
        return True

    def facts(self, study_oid: str, subject_key: str, *,
              dates: Sequence[tuple[dt.date, dt.date]] | None = None, basis: str | None = None
              ) -> list[StoredFact]:
        """The subject's stored facts, oldest first (first_seen, then arrival). With `dates` (what an
        incremental run re-selects): only the facts with no clinical date, one stored under another
        basis than `basis` (the map changed since), or one inside one of the ranges; the index on
        (study, subject, clinical date, basis) answers that without reading the other facts."""
        session = self._active()
        if dates is None:
            rows = session.execute(_FACT_STMTS["all"], {"study": study_oid, "subject": subject_key})
        else:
            params: dict[str, Any] = {"study": study_oid, "subject": subject_key, "basis": basis or ""}
            for i, (lo, hi) in enumerate(dates):
                params[f"lo{i}"], params[f"hi{i}"] = lo, hi
            rows = session.execute(_fact_window_statement(len(dates)), params)
        return [StoredFact(*row) for row in rows]

    def facts_of(self, study_oid: str, dates: Mapping[str, Sequence[tuple[dt.date, dt.date]] | None],
                 basis: str | None) -> dict[str, list[StoredFact]]:
        """`facts(subject, dates=..., basis=...)` for the subjects of a batch, each with its own
        ranges (None: all its facts). PostgreSQL answers them in one statement, where a round trip
        per subject cost most of a small batch; SQLite (no round trips) asks subject by subject."""
        session = self._active()
        windowed = [k for k, d in dates.items() if d is not None]
        if session.get_bind().dialect.name != "postgresql" or not windowed:
            return {k: self.facts(study_oid, k, dates=d, basis=basis) for k, d in dates.items()}
        s: list[str] = []
        lo: list[dt.date] = []
        hi: list[dt.date] = []
        for k in windowed:
            for a, b in dates[k] or ():
                s.append(k)
                lo.append(a)
                hi.append(b)
        rows: dict[str, list[Any]] = {k: [] for k in windowed}
        for row in session.execute(_FACT_WINDOWS_PG, {"study": study_oid, "subjects": windowed, "basis": basis or "",
                                                      "s": s, "lo": lo, "hi": hi}):
            rows[row[0]].append(row)
        out = {k: [StoredFact(*r[2:]) for r in sorted(found, key=lambda r: (r.first_seen, r.id))]
               for k, found in rows.items()}
        return {k: out[k] if k in out else self.facts(study_oid, k) for k in dates}

    def store_facts(self, study_oid: str, subject_key: str, incoming: Sequence[StoredFact]
                    ) -> tuple[list[StoredFact], set[str], list[StoredFact]]:
        """Keep the newest version of each incoming record: one read (of the incoming identities only)
        and at most two executemany writes for a whole batch of messages. A version older than the
        one kept is ignored (`is_stale`); a record's first_seen date never changes. Returns the records
        now kept that are new or changed (what an incremental mapping run re-selects), their
        identities, and the versions the changed ones replaced (where their readings were placed)."""
        return self.store_facts_of(study_oid, {subject_key: incoming})[subject_key]

    def store_facts_of(self, study_oid: str, incoming: Mapping[str, Sequence[StoredFact]]
                       ) -> dict[str, tuple[list[StoredFact], set[str], list[StoredFact]]]:
        """`store_facts` for the subjects of a batch at once: the same reads and writes, each one
        statement for all of them (a round trip per subject was most of a small batch's time)."""
        from esource.intake.identity import is_stale

        session = self._writable()
        t = _fact
        kept: dict[tuple[str, str], StoredFact] = {}
        ids: dict[tuple[str, str], int] = {}
        wanted = {s: [f.identity for f in facts] for s, facts in incoming.items() if facts}
        for stmt, params in _pair_lookups(session, _FACT_BY_IDENTITY_PG, _FACT_STMTS["by_identity_of"], wanted,
                                          "identities"):
            for row in session.execute(stmt, {"study": study_oid, **params}):
                key = (row.subject_key, row.identity)
                kept[key] = StoredFact(*row[2:])
                ids[key] = row.id
        now = self._now()
        inserts: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        out: dict[str, tuple[list[StoredFact], set[str], list[StoredFact]]] = {}
        for subject_key, facts in incoming.items():
            new: dict[str, StoredFact] = {}
            changed: dict[str, StoredFact] = {}
            for fact in facts:
                prior = kept.get((subject_key, fact.identity))
                old = new.get(fact.identity) or changed.get(fact.identity) or prior
                if old is not None and (old.version == fact.version
                                        or is_stale(fact.resource, fact.version, old.resource, old.version)):
                    continue
                if prior is not None:
                    fact = StoredFact(fact.identity, fact.resource_type, fact.resource_id, fact.version, fact.full_url,
                                      fact.resource, prior.first_seen, fact.clinical_date, fact.clinical_basis)
                    changed[fact.identity] = fact
                else:
                    new[fact.identity] = fact
            inserts.extend(
                {"study_oid": study_oid, "subject_key": subject_key, "identity": f.identity,
                 "resource_type": f.resource_type, "resource_id": f.resource_id, "version": f.version,
                 "full_url": f.full_url, "resource": f.resource, "first_seen": f.first_seen,
                 "clinical_date": f.clinical_date, "clinical_basis": f.clinical_basis,
                 "created_at": now, "updated_at": now} for f in new.values())
            updates.extend(
                {"fact_id": ids[(subject_key, f.identity)], "rtype": f.resource_type, "rid": f.resource_id,
                 "ver": f.version, "url": f.full_url, "res": f.resource, "cdate": f.clinical_date,
                 "cbasis": f.clinical_basis, "upd": now} for f in changed.values())
            now_kept = [*changed.values(), *new.values()]
            out[subject_key] = (now_kept, {f.identity for f in now_kept},
                                [kept[(subject_key, identity)] for identity in changed])
        if inserts:
            executemany(
                session, "subject_fact.insert",
                self._insert(t).on_conflict_do_nothing(index_elements=[t.c.study_oid, t.c.subject_key, t.c.identity]),
                inserts)
        if updates:
            executemany(
                session, "subject_fact.update",
                update(t).where(t.c.id == bindparam("fact_id")).values(
                    resource_type=bindparam("rtype"), resource_id=bindparam("rid"), version=bindparam("ver"),
                    full_url=bindparam("url"), resource=bindparam("res"), clinical_date=bindparam("cdate"),
                    clinical_basis=bindparam("cbasis"), updated_at=bindparam("upd")),
                updates)
        return out

    # -- item state -------------------------------------------------------------------------------------

    def sent_items(self, study_oid: str, subject_key: str, *,
                   buckets: Iterable[tuple[str, str | None, str, str | None]] | None = None,
                   identities: Iterable[str] = (), type_ids: Iterable[tuple[str, str]] = (),
                   frozen: bool = True) -> dict[ItemKey, SentItem]:
        """The subject's item state (only the columns the diff needs: it is read on every mapping run).

        With `buckets`, only the items of those (StudyEventOID, StudyEventRepeatKey, FormOID,
        ItemGroupRepeatKey) groups, plus items sent from `identities` or from `type_ids` (resource type,
        id), plus every frozen item unless `frozen` is False: what an incremental run diffs against (a
        subject's full state grows with every visit). Each part is its own indexed query, prepared
        once (one OR over them made the database read every item of the subject)."""
        session = self._active()
        params = {"study": study_oid, "subject": subject_key}
        if buckets is None:
            rows = list(session.execute(_SENT_STMTS["all"], params))
        else:
            found: dict[int, Any] = {}

            def run(stmt: Any, **extra: Any) -> None:
                for row in session.execute(stmt, {**params, **extra}):
                    found[row[0]] = row

            wanted = list(dict.fromkeys((e, _repeat_in(er), f, _repeat_in(gr)) for e, er, f, gr in buckets))
            if wanted and session.get_bind().dialect.name == "postgresql":
                e, r, f, g = (list(column) for column in zip(*wanted))
                for row in session.execute(_SENT_BUCKETS_PG, {"study": study_oid, "s": [subject_key] * len(e),
                                                              "e": e, "r": r, "f": f, "g": g}):
                    found[row[1]] = row[1:]
                wanted = []
            for i in range(0, len(wanted), 100):
                chunk = wanted[i:i + 100]
                binds = {f"{p}{j}": v for j, b in enumerate(chunk) for p, v in zip("erfg", b)}
                run(_sent_buckets_statement(len(chunk)), **binds)
            ids, tids = list(dict.fromkeys(identities)), list(dict.fromkeys(type_ids))
            for i in range(0, len(ids), 500):
                run(_SENT_STMTS["identities"], ids=ids[i:i + 500])
            for i in range(0, len(tids), 200):
                run(_SENT_STMTS["type_ids"], tids=tids[i:i + 200])
            if frozen:
                run(_SENT_STMTS["frozen"])
            rows = [found[k] for k in sorted(found)]
        return _sent_of(study_oid, subject_key, rows)

    def sent_items_in(self, study_oid: str,
                      wanted: Mapping[str, tuple[Iterable[tuple[str, str | None, str, str | None]], Iterable[str]]]
                      ) -> dict[str, dict[ItemKey, SentItem]]:
        """`sent_items(subject, buckets=..., identities=..., frozen=False)` for the subjects of a
        batch (SubjectKey -> (buckets, identities)): on PostgreSQL one statement for all the buckets
        and one for all the identities; SQLite asks subject by subject."""
        session = self._active()
        if session.get_bind().dialect.name != "postgresql":
            return {k: self.sent_items(study_oid, k, buckets=b, identities=i, frozen=False)
                    for k, (b, i) in wanted.items()}
        found: dict[str, dict[int, Any]] = {k: {} for k in wanted}
        arrays: tuple[list[str], ...] = ([], [], [], [], [])
        for k, (buckets, _) in wanted.items():
            for bucket in dict.fromkeys((e, _repeat_in(r), f, _repeat_in(g)) for e, r, f, g in buckets):
                for column, value in zip(arrays, (k, *bucket)):
                    column.append(value)
        if arrays[0]:
            params = dict(zip("serfg", arrays))
            for row in session.execute(_SENT_BUCKETS_PG, {"study": study_oid, **params}):
                found[row[0]][row[1]] = row[1:]
        for row in self._sent_rows_from(session, study_oid, {k: i for k, (_, i) in wanted.items()}):
            found[row[0]][row[1]] = row[1:]
        return {k: _sent_of(study_oid, k, [rows[i] for i in sorted(rows)]) for k, rows in found.items()}

    def sent_items_from(self, study_oid: str, identities: Mapping[str, Iterable[str]]
                        ) -> dict[str, dict[ItemKey, SentItem]]:
        """The items each subject was sent from some source identities (frozen ones included, as in
        `sent_items(buckets=(), identities=...)`), for the subjects of a batch in one lookup."""
        rows: dict[str, list[Any]] = {k: [] for k in identities}
        for row in self._sent_rows_from(self._active(), study_oid, identities):
            rows[row[0]].append(row[1:])
        return {k: _sent_of(study_oid, k, sorted(r, key=lambda row: row[0])) for k, r in rows.items()}

    @staticmethod
    def _sent_rows_from(session: Session, study_oid: str, identities: Mapping[str, Iterable[str]]) -> Iterable[Any]:
        """Item-state rows (SubjectKey, then `_SENT_BASE`'s columns) sent from each subject's own
        source identities: the pair lookup, less what a chunk's cross product adds."""
        wanted = {k: set(v) for k, v in identities.items()}
        for stmt, params in _pair_lookups(session, _SENT_FROM_PG, _SENT_STMTS["identities_of"],
                                          {k: list(v) for k, v in wanted.items() if v}, "ids"):
            for row in session.execute(stmt, {"study": study_oid, **params}):
                if row.source_identity in wanted[row.subject_key]:
                    yield row

    def frozen_items(self, study_oid: str, subject_keys: Sequence[str]) -> dict[str, dict[ItemKey, SentItem]]:
        """The frozen items of many subjects in one query (what `sent_items` adds unless `frozen` is
        False): a batch reads them once instead of one round trip per subject."""
        session = self._active()
        by_subject: dict[str, list[Any]] = {k: [] for k in subject_keys}
        keys = list(by_subject)
        for i in range(0, len(keys), 500):
            for row in session.execute(_PREPARED["frozen_of"], {"study": study_oid, "subjects": keys[i:i + 500]}):
                by_subject[row[0]].append(row[1:])
        return {k: _sent_of(study_oid, k, rows) for k, rows in by_subject.items()}

    def freeze_item(self, key: ItemKey) -> bool:
        """Mark one item's state frozen (its value and lineage untouched) in a single UPDATE, so a
        concurrent ingest writing the same item cannot be overwritten by a read-modify-write. True
        when the item has a state row."""
        session = self._writable()
        t = _item
        done = cast(CursorResult[Any], session.execute(
            update(t).where(*(t.c[name] == value for name, value in self._item_key_values(key).items()))
            .values(frozen=True, updated_at=self._now())
        ))
        return done.rowcount == 1

    @staticmethod
    def _item_key_values(k: ItemKey) -> dict[str, str]:
        return {
            "study_oid": k.study_oid,
            "subject_key": k.subject_key,
            "study_event_oid": k.study_event_oid,
            "study_event_repeat_key": _repeat_in(k.study_event_repeat_key),
            "form_oid": k.form_oid,
            "item_group_oid": k.item_group_oid,
            "item_group_repeat_key": _repeat_in(k.item_group_repeat_key),
            "item_oid": k.item_oid,
        }

    def put_sent_item(self, item: SentItem) -> None:
        """Record (insert or replace) the last value sent for an item."""
        self.put_sent_items([item])

    def put_sent_items(self, items: Sequence[SentItem]) -> None:
        """Record many items in one executemany: the upsert statement is compiled once per dialect
        (building it per item cost ~4 ms, most of an ingest)."""
        if not items:
            return
        session = self._writable()
        dialect = session.get_bind().dialect.name
        stmt = _ITEM_UPSERT.get(dialect)
        if stmt is None:
            base = self._insert(_item)
            stmt = base.on_conflict_do_update(index_elements=[_item.c[name] for name in _ITEM_KEY_COLUMNS],
                                              set_={name: base.excluded[name] for name in _ITEM_STATE_COLUMNS})
            _ITEM_UPSERT[dialect] = stmt
        now = self._now()
        rows = []
        # one row per item key, the last given winning (as one upsert after the other would): a
        # multi-row INSERT cannot touch a row twice on PostgreSQL
        for item in {item.key: item for item in items}.values():
            k = item.key
            rows.append({
                "study_oid": k.study_oid, "subject_key": k.subject_key, "study_event_oid": k.study_event_oid,
                "study_event_repeat_key": _repeat_in(k.study_event_repeat_key), "form_oid": k.form_oid,
                "item_group_oid": k.item_group_oid, "item_group_repeat_key": _repeat_in(k.item_group_repeat_key),
                "item_oid": k.item_oid, "value": item.value, "source_identity": item.source_identity,
                "source_version": item.source_version, "source_type": item.source_type, "source_id": item.source_id,
                "rule": item.rule, "frozen": item.frozen, "updated_at": now,
            })
        executemany(session, "item_state.upsert", stmt, rows)

    def subject_known(self, study_oid: str, subject_key: str) -> bool:
        """Whether anything was ever sent (or queued) for the subject: item state or an outbox row.
        False means the next transaction must create the subject (SubjectData Insert)."""
        session = self._active()
        return bool(session.execute(_PREPARED["subject_known"], {"study": study_oid, "subject": subject_key}
                                    ).scalar_one())

    # -- discrepancies ---------------------------------------------------------------------------------

    def upsert_discrepancy(self, discrepancy: Discrepancy) -> bool:
        """Record a discrepancy by its natural key. True when new (status 'open'). When it exists,
        its status and created_at are kept; message, candidates, held value, source version etc.
        are refreshed, and updated_at moves only if one of them changed (re-running is idempotent).

        A resolved or dismissed one stays closed while the same facts come back (every message re-runs
        the map), and is re-opened (True, its resolution cleared) when the facts a decision was taken
        on changed: the held value, the source or its version, or - for a discrepancy without a held
        value - its candidates (tied readings, proposals, the rejected transaction)."""
        session = self._writable()
        t = _discrepancy
        natural_key = discrepancy_natural_key(discrepancy.key)
        content = self._discrepancy_content(discrepancy)
        now = self._now()
        inserted = session.execute(
            self._insert(t)
            .values(natural_key=natural_key, status="open", created_at=now, updated_at=now, **content)
            .on_conflict_do_nothing(index_elements=[t.c.natural_key])
            .returning(t.c.id)
        )
        if inserted.first() is not None:
            return True
        existing = session.execute(
            select(t.c.id, t.c.status, *(t.c[name] for name in content)).where(t.c.natural_key == natural_key)
        ).one()
        if not any(getattr(existing, name) != value for name, value in content.items()):
            return False
        values: dict[str, Any] = {"updated_at": now, **content}
        facts = _DECISION_FACTS + (("candidates",) if content["held_value"] is None else ())
        reopen = existing.status not in OPEN_DISCREPANCY_STATUSES and any(
            getattr(existing, name) != content[name] for name in facts)
        if reopen:
            values.update(status="open", **_NO_RESOLUTION)
        session.execute(update(t).where(t.c.id == existing.id).values(**values))
        return reopen

    @staticmethod
    def _discrepancy_content(d: Discrepancy) -> dict[str, Any]:
        src = d.source
        return {
            "kind": DiscrepancyKind(d.kind).value,
            "severity": Severity(d.severity).value,
            "message": d.message,
            "study_oid": d.study_oid,
            "subject_key": d.subject_key,
            "item_oid": d.item_oid,
            "study_event_oid": d.study_event_oid,
            "form_oid": d.form_oid,
            "item_group_repeat_key": d.item_group_repeat_key,
            "source_identity": src.identity if src else None,
            "source_type": src.resource_type if src else None,
            "source_id": src.id if src else None,
            "source_version": src.version if src else None,
            "source_full_url": src.full_url if src else None,
            "source_element": src.element if src else None,
            "held_value": d.held_value,
            "candidates": _json_ready(list(d.candidates)),
            "rule": d.rule,
            "item_group_oid": d.item_group_oid,
            "study_event_repeat_key": d.study_event_repeat_key,
        }

    def open_discrepancies(self, study_oid: str, subject_key: str | None = None) -> list[Discrepancy]:
        """Discrepancies still to be handled (status open or in_review), oldest first."""
        session = self._active()
        t = _discrepancy
        q = select(t).where(t.c.study_oid == study_oid, t.c.status.in_(OPEN_DISCREPANCY_STATUSES))
        if subject_key is not None:
            q = q.where(t.c.subject_key == subject_key)
        return [self._discrepancy_from_row(row) for row in session.execute(q.order_by(t.c.id))]

    @staticmethod
    def _discrepancy_from_row(row: Any) -> Discrepancy:
        source = None
        if row.source_type is not None:
            source = SourceRef(
                resource_type=row.source_type,
                id=row.source_id,
                version=row.source_version,
                identity=row.source_identity,
                full_url=row.source_full_url,
                element=row.source_element,
            )
        return Discrepancy(
            kind=DiscrepancyKind(row.kind),
            message=row.message,
            study_oid=row.study_oid,
            subject_key=row.subject_key,
            source=source,
            item_oid=row.item_oid,
            study_event_oid=row.study_event_oid,
            form_oid=row.form_oid,
            item_group_repeat_key=row.item_group_repeat_key,
            held_value=row.held_value,
            candidates=tuple(row.candidates or ()),
            severity=Severity(row.severity),
            rule=row.rule,
            item_group_oid=row.item_group_oid,
            study_event_repeat_key=row.study_event_repeat_key,
        )

    def discrepancy_status(self, key: Sequence[str]) -> str | None:
        """The status of the discrepancy with this `Discrepancy.key`, or None if unknown."""
        t = _discrepancy
        return self._active().execute(
            select(t.c.status).where(t.c.natural_key == discrepancy_natural_key(key))
        ).scalar()

    def set_discrepancy_status(self, key: Sequence[str], status: str) -> None:
        """Move a discrepancy to open / in_review / resolved / dismissed (a data manager's decision)."""
        if status not in DISCREPANCY_STATUSES:
            expected = ", ".join(DISCREPANCY_STATUSES)
            raise StoreError(f"unknown discrepancy status {status!r}: expected one of {expected}")
        session = self._writable()
        t = _discrepancy
        done = cast(
            CursorResult[Any],
            session.execute(
                update(t)
                .where(t.c.natural_key == discrepancy_natural_key(key))
                .values(status=status, updated_at=self._now(),
                        **(_NO_RESOLUTION if status in OPEN_DISCREPANCY_STATUSES else {}))
            ),
        )
        if done.rowcount != 1:
            raise StoreError("no such discrepancy")

    # -- reconciliation queue (migration 0006; esource.reconciliation) ---------------------------------

    def query_discrepancies(self, flt: DiscrepancyFilter, *, limit: int | None = None,
                            offset: int = 0) -> tuple[list[DiscrepancyRecord], int]:
        """One page of the queue, oldest first (by id), and how many match in all. The site is the
        subject's enrollment site (outer join: a discrepancy of a subject no longer enrolled still lists)."""
        session = self._active()
        joined, where = self._queue_where(flt)
        total = session.execute(select(func.count()).select_from(joined).where(*where)).scalar_one()
        q = (select(_discrepancy, _enrollment.c.site_oid.label("enrolled_site")).select_from(joined)
             .where(*where).order_by(_discrepancy.c.id).offset(offset))
        if limit is not None:
            q = q.limit(limit)
        return [self._record_from_row(row) for row in session.execute(q)], int(total)

    def discrepancy_ids(self, flt: DiscrepancyFilter, *, limit: int | None = None) -> list[int]:
        """The ids matching a filter, oldest first (what a bulk action works through)."""
        joined, where = self._queue_where(flt)
        q = select(_discrepancy.c.id).select_from(joined).where(*where).order_by(_discrepancy.c.id)
        if limit is not None:
            q = q.limit(limit)
        return [int(i) for i in self._active().execute(q).scalars()]

    def get_discrepancy(self, discrepancy_id: int) -> DiscrepancyRecord | None:
        t, e = _discrepancy, _enrollment
        row = self._active().execute(
            select(t, e.c.site_oid.label("enrolled_site"))
            .select_from(t.outerjoin(e, and_(e.c.study_oid == t.c.study_oid, e.c.subject_key == t.c.subject_key)))
            .where(t.c.id == int(discrepancy_id))
        ).first()
        return None if row is None else self._record_from_row(row)

    def transition_discrepancy(self, discrepancy_id: int, *, from_statuses: Iterable[str], status: str,
                               assignee: Any = _KEEP, resolution: str | None = None, actor: str | None = None,
                               reason: str | None = None, value: str | None = None) -> DiscrepancyRecord:
        """Move one discrepancy to `status` only if it is in one of `from_statuses` (a conditional
        UPDATE: two data managers deciding at once cannot both win; the loser gets
        DiscrepancyStateError and its unit of work rolls back). Closing (resolved/dismissed) records
        the resolution, who, when, why and the value sent; re-opening clears them."""
        if status not in DISCREPANCY_STATUSES:
            raise StoreError(f"unknown discrepancy status {status!r}: expected one of {', '.join(DISCREPANCY_STATUSES)}")
        session = self._writable()
        t = _discrepancy
        now = self._now()
        values: dict[str, Any] = {"status": status, "updated_at": now}
        if assignee is not _KEEP:
            values["assignee"] = assignee
        if status in OPEN_DISCREPANCY_STATUSES:
            values.update(_NO_RESOLUTION)
        else:
            if resolution not in DISCREPANCY_RESOLUTIONS:
                raise StoreError(f"closing a discrepancy needs a resolution: one of {', '.join(DISCREPANCY_RESOLUTIONS)}")
            values.update(resolution=resolution, resolved_by=actor, resolved_at=now, resolution_reason=reason,
                          resolution_value=value)
        done = cast(CursorResult[Any], session.execute(
            update(t).where(t.c.id == int(discrepancy_id), t.c.status.in_(list(from_statuses))).values(**values)))
        if done.rowcount != 1:
            current = self.get_discrepancy(discrepancy_id)
            if current is None:
                raise DiscrepancyNotFound(f"no discrepancy {discrepancy_id}")
            raise DiscrepancyStateError(f"discrepancy {discrepancy_id} is {current.status}: the action applies to "
                                        f"{' or '.join(from_statuses)} discrepancies only")
        record = self.get_discrepancy(discrepancy_id)
        assert record is not None
        return record

    def review_policies(self, study_oid: str) -> dict[str, tuple[str, str, dt.datetime]]:
        """Run-time review-before-send overrides: {form OID: (mode, changed_by, updated_at)}."""
        t = _review_policy
        rows = self._active().execute(select(t).where(t.c.study_oid == study_oid).order_by(t.c.form_oid))
        return {row.form_oid: (row.mode, row.changed_by, row.updated_at) for row in rows}

    def set_review_policy(self, study_oid: str, form_oid: str, mode: str | None, *, changed_by: str,
                          reason: str) -> str | None:
        """Store (or with mode None remove) a form's run-time policy; returns the previous override."""
        if mode is not None and mode not in REVIEW_MODES:
            raise StoreError(f"unknown review mode {mode!r}: expected one of {', '.join(REVIEW_MODES)}")
        session = self._writable()
        t = _review_policy
        where = (t.c.study_oid == study_oid, t.c.form_oid == form_oid)
        previous = session.execute(select(t.c.mode).where(*where)).scalar()
        if mode is None:
            session.execute(t.delete().where(*where))
            return previous
        values = {"mode": mode, "changed_by": changed_by, "reason": reason, "updated_at": self._now()}
        session.execute(self._insert(t).values(study_oid=study_oid, form_oid=form_oid, **values)
                        .on_conflict_do_update(index_elements=[t.c.study_oid, t.c.form_oid], set_=values))
        return previous

    def requeue_outbox(self, outbox_id: int, *, from_statuses: Iterable[str] = ("rejected", "failed"),
                       note: str | None = None) -> bool:
        """Put a rejected or failed outbox row back to 'pending' (a data manager's re-push). False when
        the row is not in one of `from_statuses` any more. Its attempt count is kept (history)."""
        values: dict[str, Any] = {"status": "pending"}
        if note is not None:
            values["last_error"] = note
        done = cast(CursorResult[Any], self._writable().execute(
            update(_outbox).where(_outbox.c.id == int(outbox_id), _outbox.c.status.in_(list(from_statuses)))
            .values(**values)))
        return done.rowcount == 1

    def delete_sent_items(self, keys: Iterable[ItemKey]) -> int:
        """Forget the state of items a data manager's decision removed from the eCRF (ODM Remove), so a
        later value for them is an Insert again. Returns how many rows went."""
        session = self._writable()
        n = 0
        for key in keys:
            done = cast(CursorResult[Any], session.execute(_item.delete().where(
                *(_item.c[name] == value for name, value in self._item_key_values(key).items()))))
            n += done.rowcount
        return n

    def _queue_where(self, flt: DiscrepancyFilter) -> tuple[Any, list[Any]]:
        t, e = _discrepancy, _enrollment
        joined = t.outerjoin(e, and_(e.c.study_oid == t.c.study_oid, e.c.subject_key == t.c.subject_key))
        where: list[Any] = [t.c.study_oid == flt.study_oid]
        if flt.site_oids is not None:
            where.append(e.c.site_oid.in_(list(flt.site_oids)))
        for column, wanted in ((t.c.subject_key, flt.subject_keys), (t.c.kind, flt.kinds),
                               (t.c.status, flt.statuses), (t.c.id, flt.ids)):
            if wanted is not None:
                where.append(column.in_(list(wanted)))
        for column, one in ((t.c.item_oid, flt.item_oid), (t.c.form_oid, flt.form_oid),
                            (t.c.study_event_oid, flt.study_event_oid), (t.c.assignee, flt.assignee)):
            if one is not None:
                where.append(column == one)
        if flt.unassigned:
            where.append(t.c.assignee.is_(None))
        if flt.created_from is not None:
            where.append(t.c.created_at >= flt.created_from)
        if flt.created_to is not None:
            where.append(t.c.created_at < flt.created_to)
        return joined, where

    def _record_from_row(self, row: Any) -> DiscrepancyRecord:
        return DiscrepancyRecord(
            id=int(row.id), discrepancy=self._discrepancy_from_row(row), status=row.status,
            site_oid=row.enrolled_site, assignee=row.assignee, resolution=row.resolution,
            resolved_by=row.resolved_by, resolved_at=row.resolved_at, resolution_reason=row.resolution_reason,
            resolution_value=row.resolution_value, created_at=row.created_at, updated_at=row.updated_at)

    # -- outbox ----------------------------------------------------------------------------------------

    def next_sequence(self, study_oid: str, subject_key: str) -> int:
        """The subject's next outbox sequence: 1, then the highest so far + 1."""
        session = self._active()
        top = session.execute(_PREPARED["max_sequence"], {"study": study_oid, "subject": subject_key}).scalar()
        return (top or 0) + 1

    def outbox_positions(self, study_oid: str, subject_keys: Sequence[str]) -> dict[str, tuple[bool, int]]:
        """(`subject_known`, `next_sequence`) of many subjects: one query for the subjects of a batch
        (a subject with an outbox row is known), plus `subject_known`'s for each one without."""
        session = self._active()
        top: dict[str, int] = {}
        keys = list(dict.fromkeys(subject_keys))
        for i in range(0, len(keys), 500):
            for subject, seq in session.execute(_PREPARED["max_sequences"],
                                                {"study": study_oid, "subjects": keys[i:i + 500]}):
                top[subject] = int(seq)
        return {k: (True, top[k] + 1) if k in top else (self.subject_known(study_oid, k), 1) for k in keys}

    def add_outbox(self, transaction: SubjectTransaction, odm: bytes) -> int:
        """Queue an ODM transaction (status 'pending'); returns the outbox id. `transaction.sequence`
        must be set (from `next_sequence`). A sequence the subject already has raises
        `StoreConflictError`: a concurrent unit of work got there first; re-run this one."""
        session = self._writable()
        tx = transaction
        if tx.sequence < 1:
            raise StoreError(
                f"subject {tx.subject_key}: the transaction has no sequence; set it from next_sequence() first"
            )
        t = _outbox
        dialect = session.get_bind().dialect.name
        stmt = _OUTBOX_INSERT.get(dialect)
        if stmt is None:  # ON CONFLICT DO NOTHING: a taken sequence leaves the transaction usable
            stmt = _OUTBOX_INSERT[dialect] = self._insert(t).on_conflict_do_nothing(
                index_elements=[t.c.study_oid, t.c.subject_key, t.c.sequence]).returning(t.c.id)
        new_id = session.execute(stmt, {
            "study_oid": tx.study_oid, "subject_key": tx.subject_key, "sequence": tx.sequence,
            "site_oid": tx.site_oid, "odm": bytes(odm), "item_count": len(tx.changes), "status": "pending",
            "attempts": 0, "created_at": self._now(), "previous_values": previous_values_of(tx.changes),
        }).scalar()
        if new_id is None:
            raise StoreConflictError(
                f"study {tx.study_oid}, subject {tx.subject_key}: outbox sequence {tx.sequence} is already "
                "taken (a concurrent unit of work); roll back and re-run"
            )
        return int(new_id)

    def outbox_entries(
        self,
        *,
        statuses: Iterable[str] | None = ("pending",),
        study_oid: str | None = None,
        subject_key: str | None = None,
        limit: int | None = None,
    ) -> list[OutboxEntry]:
        """Outbox rows in id order (= per subject, sequence order); `statuses=None` for all."""
        session = self._active()
        t = _outbox
        q = select(t).order_by(t.c.id)
        if statuses is not None:
            q = q.where(t.c.status.in_(list(statuses)))
        if study_oid is not None:
            q = q.where(t.c.study_oid == study_oid)
        if subject_key is not None:
            q = q.where(t.c.subject_key == subject_key)
        if limit is not None:
            q = q.limit(limit)
        return [
            OutboxEntry(
                id=row.id,
                study_oid=row.study_oid,
                subject_key=row.subject_key,
                sequence=row.sequence,
                site_oid=row.site_oid,
                odm=bytes(row.odm),
                item_count=row.item_count,
                status=row.status,
                attempts=row.attempts,
                created_at=row.created_at,
                sent_at=row.sent_at,
                last_error=row.last_error,
                previous_values=dict(row.previous_values or {}),
            )
            for row in session.execute(q)
        ]

    def outbox_counts(self) -> dict[str, int]:
        """Outbox rows by status (cheap: no ODM bytes loaded) — for the depth gauge and readiness."""
        t = _outbox
        rows = self._active().execute(select(t.c.status, func.count()).group_by(t.c.status))
        return {status: int(n) for status, n in rows}

    def ping(self) -> None:
        """A cheap round trip to the database (readiness)."""
        self._active().execute(select(1))

    # ------------------------------------------------------------------ dead letters

    def add_dead_letter(self, *, channel: str, intake_key: str, origin: str, reason: str, payload: bytes,
                        received_at: dt.datetime) -> int:
        session = self._writable()
        result = session.execute(insert(_dead_letter).values(
            channel=channel, intake_key=intake_key, origin=origin, reason=reason, payload=payload,
            payload_size=len(payload), status="open", received_at=received_at, created_at=self._now()))
        return int(result.inserted_primary_key[0])

    def dead_letters(self, *, channel: str | None = None, statuses: Iterable[str] | None = ("open",),
                     limit: int | None = None) -> list[DeadLetterEntry]:
        t = _dead_letter
        q = select(t).order_by(t.c.id)
        if channel is not None:
            q = q.where(t.c.channel == channel)
        if statuses is not None:
            q = q.where(t.c.status.in_(list(statuses)))
        if limit is not None:
            q = q.limit(limit)
        return [DeadLetterEntry(r.id, r.channel, r.intake_key, r.origin, r.reason, bytes(r.payload), r.status,
                                r.received_at) for r in self._active().execute(q)]

    def set_dead_letter_status(self, dead_letter_id: int, status: str) -> None:
        if status not in DEAD_LETTER_STATUSES:
            raise StoreError(f"unknown dead-letter status {status!r}: expected one of {', '.join(DEAD_LETTER_STATUSES)}")
        done = self._writable().execute(update(_dead_letter).where(_dead_letter.c.id == dead_letter_id)
                                        .values(status=status))
        if done.rowcount != 1:
            raise StoreError(f"no dead letter {dead_letter_id}")

    def replace_outbox_odm(self, outbox_id: int, odm: bytes, *, item_count: int, note: str | None = None) -> None:
        """Replace the ODM of a row not yet delivered (the dispatcher withheld conflicting items):
        from now on every attempt sends these bytes. `note` is kept as last_error (why it changed).
        Refused for a row that is already sent, acknowledged or rejected."""
        session = self._writable()
        t = _outbox
        values: dict[str, Any] = {"odm": bytes(odm), "item_count": item_count}
        if note is not None:
            values["last_error"] = note
        done = cast(CursorResult[Any], session.execute(
            update(t).where(t.c.id == outbox_id, t.c.status.in_(("pending", "failed"))).values(**values)))
        if done.rowcount != 1:
            raise StoreError(f"outbox row {outbox_id} does not exist or is no longer pending/failed")

    # -- EDC key map -------------------------------------------------------------------------------

    def edc_key(self, connector: str, study_oid: str, subject_key: str, scope: str, esource_key: str) -> int:
        """The EDC key of `esource_key` within (connector, study, subject, scope): the one allocated
        before, else max + 1 (race-safe like repeat keys: BEGIN IMMEDIATE on SQLite, the two unique
        constraints and ON CONFLICT DO NOTHING plus a re-read on PostgreSQL). Needs a writable unit
        of work when the key is new; commit it before the EDC sees the key."""
        t = _edc_key_map
        same_scope = (t.c.connector == connector, t.c.study_oid == study_oid, t.c.subject_key == subject_key,
                      t.c.scope == scope)
        for _ in range(MAX_ALLOCATION_ATTEMPTS):
            key = self.find_edc_key(connector, study_oid, subject_key, scope, esource_key)
            if key is not None:
                return key
            session = self._writable()
            top = session.execute(select(func.max(t.c.edc_key)).where(*same_scope)).scalar()
            candidate = (top or 0) + 1
            inserted = session.execute(
                self._insert(t)
                .values(connector=connector, study_oid=study_oid, subject_key=subject_key, scope=scope,
                        esource_key=esource_key, edc_key=candidate, created_at=self._now())
                .on_conflict_do_nothing()  # either unique constraint: a concurrent writer got there first
                .returning(t.c.id)
            )
            if inserted.first() is not None:
                return candidate
        raise StoreConflictError(
            f"connector {connector}, study {study_oid}, subject {subject_key}, scope {scope}: could not allocate "
            f"an EDC key after {MAX_ALLOCATION_ATTEMPTS} attempts; roll back and retry"
        )

    def find_edc_key(self, connector: str, study_oid: str, subject_key: str, scope: str,
                     esource_key: str) -> int | None:
        """The EDC key allocated to `esource_key`, or None (never allocates)."""
        t = _edc_key_map
        key = self._active().execute(
            select(t.c.edc_key).where(t.c.connector == connector, t.c.study_oid == study_oid,
                                      t.c.subject_key == subject_key, t.c.scope == scope,
                                      t.c.esource_key == esource_key)
        ).scalar()
        return None if key is None else int(key)

    def esource_key(self, connector: str, study_oid: str, subject_key: str, scope: str, edc_key: int) -> str | None:
        """The esource key an EDC key was allocated to, or None."""
        t = _edc_key_map
        return self._active().execute(
            select(t.c.esource_key).where(t.c.connector == connector, t.c.study_oid == study_oid,
                                          t.c.subject_key == subject_key, t.c.scope == scope,
                                          t.c.edc_key == int(edc_key))
        ).scalar()

    def set_outbox_status(
        self, outbox_id: int, status: str, *, error: str | None = None, attempted: bool = False
    ) -> None:
        """Record what happened to an outbox row. `attempted=True` counts a delivery attempt; the
        first move to sent/acked/rejected stamps sent_at; `error` is kept as last_error."""
        values = self._status_values(status, attempted=attempted, error=error)
        session = self._writable()
        done = cast(CursorResult[Any], session.execute(
            update(_outbox).where(_outbox.c.id == outbox_id).values(**values)))
        if done.rowcount != 1:
            raise StoreError(f"no outbox row {outbox_id}")

    def _status_values(self, status: str, *, attempted: bool, error: str | None) -> dict[str, Any]:
        """The columns an outbox status change sets (see set_outbox_status); an unknown status raises."""
        if status not in OUTBOX_STATUSES:
            raise StoreError(f"unknown outbox status {status!r}: expected one of {', '.join(OUTBOX_STATUSES)}")
        t = _outbox
        values: dict[str, Any] = {"status": status}
        if attempted:
            values["attempts"] = t.c.attempts + 1
        if status in ("sent", "acked", "rejected"):
            values["sent_at"] = func.coalesce(t.c.sent_at, self._now())
        if error is not None:
            values["last_error"] = error
        return values

    def set_outbox_statuses(self, outbox_ids: Sequence[int], status: str, *, attempted: bool = False) -> None:
        """`set_outbox_status` for many rows in one UPDATE (the dispatcher records the acks waiting
        together: one round trip per ack was most of the recorder's time on PostgreSQL)."""
        values = self._status_values(status, attempted=attempted, error=None)
        ids = list(dict.fromkeys(outbox_ids))
        if not ids:
            return
        session = self._writable()
        updated = 0
        for i in range(0, len(ids), 500):
            done = cast(CursorResult[Any], session.execute(
                update(_outbox).where(_outbox.c.id.in_(ids[i:i + 500])).values(**values)))
            updated += done.rowcount
        if updated != len(ids):
            raise StoreError(f"{len(ids) - updated} of outbox rows {ids} do not exist")

    # -- API users, tokens and transfer queries (esource.api; migration 0005) -------------------------

    def user(self, username: str) -> User | None:
        """The API user `username`, or None."""
        row = self._active().execute(select(_api_user).where(_api_user.c.username == username)).first()
        return _user_of(row) if row is not None else None

    def users(self) -> list[User]:
        rows = self._active().execute(select(_api_user).order_by(_api_user.c.username)).all()
        return [_user_of(r) for r in rows]

    def put_user(self, user: User) -> None:
        """Create or replace an API user (roles, sites, studies, password hash, active)."""
        t = _api_user
        now = self._now()
        values = {"roles": sorted(str(r) for r in user.roles),
                  "sites": sorted(user.sites) if user.sites is not None else None,
                  "studies": sorted(user.studies) if user.studies is not None else None,
                  "password_hash": user.password_hash, "active": bool(user.active),
                  "updated_at": user.updated_at or now}
        self._writable().execute(
            self._insert(t).values(username=user.username, created_at=user.created_at or now, **values)
            .on_conflict_do_update(index_elements=[t.c.username], set_=values))

    def add_api_token(self, token: ApiToken) -> None:
        """Store a new token (its hash only)."""
        self._writable().execute(_api_token.insert().values(
            token_id=token.token_id, token_hash=token.token_hash, username=token.username, label=token.label,
            created_at=token.created_at, expires_at=token.expires_at, revoked_at=token.revoked_at))

    def api_token(self, token_id: str) -> ApiToken | None:
        row = self._active().execute(select(_api_token).where(_api_token.c.token_id == token_id)).first()
        return _token_of(row) if row is not None else None

    def api_tokens(self, username: str | None = None) -> list[ApiToken]:
        q = select(_api_token).order_by(_api_token.c.created_at, _api_token.c.token_id)
        if username is not None:
            q = q.where(_api_token.c.username == username)
        return [_token_of(r) for r in self._active().execute(q).all()]

    def revoke_api_token(self, token_id: str, at: dt.datetime) -> bool:
        """Revoke one token; False when unknown or already revoked."""
        t = _api_token
        done = cast(CursorResult[Any], self._writable().execute(
            update(t).where(t.c.token_id == token_id, t.c.revoked_at.is_(None)).values(revoked_at=at)))
        return done.rowcount == 1

    def revoke_user_tokens(self, username: str, at: dt.datetime) -> int:
        """Revoke every live token of a user; how many."""
        t = _api_token
        done = cast(CursorResult[Any], self._writable().execute(
            update(t).where(t.c.username == username, t.c.revoked_at.is_(None)).values(revoked_at=at)))
        return int(done.rowcount or 0)

    def needs_visit_index(self, study_oid: str | None = None) -> bool:
        """True when some outbox row (of the study) has no `outbox_visit` rows yet (a cheap read, so
        the API takes the write lock of `index_outbox_visits` only when there is work)."""
        o, v = _outbox, _outbox_visit
        q = select(o.c.id).where(~exists().where(v.c.outbox_id == o.c.id)).limit(1)
        if study_oid is not None:
            q = q.where(o.c.study_oid == study_oid)
        return self._active().execute(q).first() is not None

    def index_outbox_visits(self, study_oid: str | None = None, *, batch: int = 500) -> int:
        """Record the StudyEventOIDs of outbox rows not indexed yet (parsed from their stored ODM; '' for
        a transaction without one). Idempotent and safe under concurrency (insert-or-ignore). How many
        rows were indexed."""
        from esource.odm.xsd import safe_parse

        session = self._writable()
        o, v = _outbox, _outbox_visit
        done = 0
        while True:
            q = (select(o.c.id, o.c.odm).where(~exists().where(v.c.outbox_id == o.c.id))
                 .order_by(o.c.id).limit(batch))
            if study_oid is not None:
                q = q.where(o.c.study_oid == study_oid)
            rows = session.execute(q).all()
            if not rows:
                return done
            values = []
            for row in rows:
                try:
                    root = safe_parse(bytes(row.odm), f"outbox {row.id}")
                    events = {el.get("StudyEventOID") or "" for el in root.iter("{*}StudyEventData")}
                except Exception:  # a row that cannot be read stays findable without the visit filter
                    events = set()
                values.extend({"outbox_id": row.id, "study_event_oid": e} for e in sorted(events or {""}))
            session.execute(self._insert(v).on_conflict_do_nothing(), values)
            done += len(rows)
            if len(rows) < batch:
                return done

    def transfers(self, study_oid: str, *, sites: Iterable[str] | None = None, subject_key: str | None = None,
                  visit: str | None = None, statuses: Iterable[str] | None = None,
                  since: dt.datetime | None = None, until: dt.datetime | None = None,
                  limit: int = 50, offset: int = 0) -> tuple[list[TransferSummary], int]:
        """One page of a study's outbox rows, newest first, and the total matching: filtered by sites
        (None: all), subject, visit (StudyEventOID, needs `index_outbox_visits` first), statuses and
        creation time [since, until). Without the ODM body."""
        session = self._active()
        o, v = _outbox, _outbox_visit
        conds: list[Any] = [o.c.study_oid == study_oid]
        if sites is not None:
            conds.append(o.c.site_oid.in_(sorted(sites)))
        if subject_key is not None:
            conds.append(o.c.subject_key == subject_key)
        if statuses is not None:
            conds.append(o.c.status.in_(sorted(statuses)))
        if since is not None:
            conds.append(o.c.created_at >= since)
        if until is not None:
            conds.append(o.c.created_at < until)
        if visit is not None:
            conds.append(exists().where(v.c.outbox_id == o.c.id, v.c.study_event_oid == visit))
        total = int(session.execute(select(func.count()).select_from(o).where(*conds)).scalar() or 0)
        cols = [c for c in o.c if c.name not in ("odm", "previous_values")]
        rows = session.execute(select(*cols).where(*conds).order_by(o.c.id.desc()).limit(limit).offset(offset)).all()
        visits = self.outbox_visits([r.id for r in rows])
        return [_summary_of(r, visits.get(r.id, [])) for r in rows], total

    def outbox_visits(self, outbox_ids: Sequence[int]) -> dict[int, list[str]]:
        """The indexed StudyEventOIDs per outbox row (rows not indexed yet are absent)."""
        if not outbox_ids:
            return {}
        v = _outbox_visit
        out: dict[int, list[str]] = {}
        for row in self._active().execute(select(v.c.outbox_id, v.c.study_event_oid)
                                          .where(v.c.outbox_id.in_(list(outbox_ids)))
                                          .order_by(v.c.outbox_id, v.c.study_event_oid)):
            lst = out.setdefault(row.outbox_id, [])
            if row.study_event_oid:
                lst.append(row.study_event_oid)
        return out

    def outbox_entry(self, outbox_id: int) -> OutboxEntry | None:
        """One outbox row with its ODM body, or None."""
        row = self._active().execute(select(_outbox).where(_outbox.c.id == outbox_id)).first()
        if row is None:
            return None
        return OutboxEntry(id=row.id, study_oid=row.study_oid, subject_key=row.subject_key, sequence=row.sequence,
                           site_oid=row.site_oid, odm=bytes(row.odm), item_count=row.item_count, status=row.status,
                           attempts=row.attempts, created_at=row.created_at, sent_at=row.sent_at,
                           last_error=row.last_error, previous_values=dict(row.previous_values or {}))

    def sent_items_since(self, study_oid: str, *, since: dt.datetime | None = None, subject_key: str | None = None,
                         sites: Iterable[str] | None = None) -> list[tuple[SentItem, str, dt.datetime]]:
        """(item state, the subject's site, when it last changed) for the study's items changed at or
        after `since` — what esource sent, for the ODM pull. Subjects in id order, items in state order."""
        t, e = _item, _enrollment
        q = (select(t, e.c.site_oid.label("enrolled_site"))
             .join(e, and_(e.c.study_oid == t.c.study_oid, e.c.subject_key == t.c.subject_key))
             .where(t.c.study_oid == study_oid).order_by(e.c.id, t.c.id))
        if since is not None:
            q = q.where(t.c.updated_at >= since)
        if subject_key is not None:
            q = q.where(t.c.subject_key == subject_key)
        if sites is not None:
            q = q.where(e.c.site_oid.in_(sorted(sites)))
        out = []
        for row in self._active().execute(q):
            key = ItemKey(study_oid=row.study_oid, subject_key=row.subject_key, study_event_oid=row.study_event_oid,
                          study_event_repeat_key=_repeat_out(row.study_event_repeat_key), form_oid=row.form_oid,
                          item_group_oid=row.item_group_oid,
                          item_group_repeat_key=_repeat_out(row.item_group_repeat_key), item_oid=row.item_oid)
            item = SentItem(key=key, value=row.value, source_identity=row.source_identity,
                            source_version=row.source_version, source_type=row.source_type, source_id=row.source_id,
                            rule=row.rule, frozen=bool(row.frozen))
            out.append((item, row.enrolled_site, row.updated_at))
        return out


# -- API users, tokens and transfer queries (migration 0005) ----------------------------------------

from esource.domain.users import ApiToken, User  # noqa: E402
from esource.store.schema import ApiTokenRow, ApiUserRow, OutboxVisitRow  # noqa: E402

_api_user: Table = ApiUserRow.__table__  # type: ignore[assignment]
_api_token: Table = ApiTokenRow.__table__  # type: ignore[assignment]
_outbox_visit: Table = OutboxVisitRow.__table__  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class TransferSummary:
    """An outbox row as the transfers API lists it: no ODM body; `visits` the StudyEventOIDs inside."""

    id: int
    study_oid: str
    subject_key: str
    sequence: int
    site_oid: str
    item_count: int
    status: str
    attempts: int
    created_at: dt.datetime
    sent_at: dt.datetime | None
    last_error: str | None
    visits: tuple[str, ...] = ()


def _summary_of(row: Any, visits: Sequence[str]) -> TransferSummary:
    return TransferSummary(id=row.id, study_oid=row.study_oid, subject_key=row.subject_key, sequence=row.sequence,
                           site_oid=row.site_oid, item_count=row.item_count, status=row.status, attempts=row.attempts,
                           created_at=row.created_at, sent_at=row.sent_at, last_error=row.last_error,
                           visits=tuple(visits))


def _user_of(row: Any) -> User:
    return User(username=row.username, roles=frozenset(str(r) for r in row.roles or ()),
                sites=frozenset(row.sites) if row.sites is not None else None,
                studies=frozenset(row.studies) if row.studies is not None else None,
                password_hash=row.password_hash, active=bool(row.active), created_at=row.created_at,
                updated_at=row.updated_at)


def _token_of(row: Any) -> ApiToken:
    return ApiToken(token_id=row.token_id, token_hash=row.token_hash, username=row.username,
                    created_at=row.created_at, expires_at=row.expires_at, revoked_at=row.revoked_at, label=row.label)


STATISTICS_CHECK_S = 1.0
STATISTICS_MIN_ROWS = 1000
_INGEST_TABLES = frozenset({"item_state", "subject_fact", "outbox", "audit_log", "intake"})
_STATISTICS_TABLES = (*sorted(_INGEST_TABLES), "discrepancy", "enrollment_identifier")


class Store:
    """A database holding esource's state: opens the engine, migrates it to head (unless
    `migrate=False`, e.g. when migrations run as a separate deployment step), and hands out units
    of work. Extra keyword arguments go to `make_engine`."""

    def __init__(
        self,
        url: str | URL,
        *,
        migrate: bool = True,
        clock: Clock | None = None,
        **engine_kwargs: Any,
    ) -> None:
        self.url = make_url(url)
        path = sqlite_file(self.url)
        engine_kwargs.setdefault("background_checkpoint", path is not None)
        self.engine: Engine = make_engine(self.url, **engine_kwargs)
        self._checkpointer: WalCheckpointer | None = None
        if path is not None and engine_kwargs["background_checkpoint"]:
            self._checkpointer = WalCheckpointer(path).start()
        try:
            if migrate:
                from esource.store.migrate import upgrade

                upgrade(self.engine)
        except BaseException:
            self.engine.dispose()
            if self._checkpointer is not None:
                self._checkpointer.stop()
            raise
        self._clock: Clock = clock or SystemClock()
        self._sessions = sessionmaker(bind=self.engine, expire_on_commit=False)
        self._read_only_sessions = sessionmaker(
            bind=self.engine.execution_options(**{READ_ONLY_OPTION: True}), expire_on_commit=False
        )
        self._postgres = self.engine.dialect.name == "postgresql"
        self._statistics_checked = time.monotonic()
        self._statistics_interval = STATISTICS_CHECK_S
        self._statistics_lock = threading.Lock()

    def uow(self, *, read_only: bool = False) -> SqlAlchemyUnitOfWork:
        """A new unit of work. Read-only ones refuse writes and, on SQLite, do not take the write
        lock (they read alongside a writer)."""
        if self._postgres and time.monotonic() - self._statistics_checked > self._statistics_interval:
            self.first_statistics()
        factory = self._read_only_sessions if read_only else self._sessions
        return SqlAlchemyUnitOfWork(factory, clock=self._clock, read_only=read_only,
                                    audit_session_factory=self._sessions if read_only else None)

    def first_statistics(self) -> list[str]:
        """PostgreSQL: ANALYZE the hot tables that have rows but no statistics yet (a fresh install
        filling up faster than autovacuum's first pass, e.g. a backfill in its first minute). Without
        statistics the planner takes any index on (study, subject) for a lookup by source or identity
        and reads every row of the subject: 20x slower. Checked (one catalogue query) every
        STATISTICS_CHECK_S until the tables every ingest writes have statistics, then never again:
        each table is analyzed once, then autovacuum keeps it up to date."""
        if not self._postgres or not self._statistics_lock.acquire(blocking=False):
            return []
        try:
            self._statistics_checked = time.monotonic()
            with self.engine.begin() as conn:
                lacking = {row[0]: row[1] for row in conn.execute(text(
                    "SELECT relname, n_live_tup FROM pg_stat_user_tables WHERE schemaname = current_schema() AND "
                    "relname = ANY(:names) AND last_analyze IS NULL AND last_autoanalyze IS NULL ORDER BY relname"),
                    {"names": list(_STATISTICS_TABLES)})}
                tables = [t for t, rows in lacking.items() if rows >= STATISTICS_MIN_ROWS]
                for table in tables:
                    conn.exec_driver_sql(f'ANALYZE "{table}"')  # names from the fixed list above
            if tables:
                log.info("first statistics", extra={"count": len(tables)})
            if not set(lacking).difference(tables).intersection(_INGEST_TABLES):
                self._statistics_interval = float("inf")  # every table an ingest writes has statistics
            return tables
        except Exception as exc:  # never fails a unit of work: autovacuum gets there anyway
            log.warning("statistics check failed", extra={"reason": type(exc).__name__})
            return []
        finally:
            self._statistics_lock.release()

    def dispose(self) -> None:
        """Close all pooled connections (SQLite: after a last WAL checkpoint)."""
        self.engine.dispose()
        if self._checkpointer is not None:
            self._checkpointer.stop()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.dispose()

    def __repr__(self) -> str:
        return f"Store({self.url.render_as_string(hide_password=True)!r})"
