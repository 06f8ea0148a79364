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
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Callable, Iterable, Sequence, cast

from sqlalchemy import Engine, Table, and_, exists, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, CursorResult, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

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
from esource.store.engine import READ_ONLY_OPTION, make_engine
from esource.store.errors import AmbiguousEnrollmentError, StoreConflictError, StoreError
from esource.store.schema import (
    DISCREPANCY_STATUSES,
    OPEN_DISCREPANCY_STATUSES,
    OUTBOX_STATUSES,
    DEAD_LETTER_STATUSES,
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
    ) -> None:
        self._session_factory = session_factory
        self._clock: Clock = clock or SystemClock()
        self._read_only = read_only
        self._session: Session | None = None
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
        try:
            session.rollback()  # a no-op after commit(); undoes anything not committed
        finally:
            session.close()

    def commit(self) -> None:
        self._active().commit()

    def rollback(self) -> None:
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

    # -- enrollment --------------------------------------------------------------------------------

    def find_enrollment(self, study_oid: str, identifiers: Iterable[tuple[str, str]]) -> Enrollment | None:
        """The subject any of the patient's (system, value) identifiers is enrolled under, else None.
        Raises `AmbiguousEnrollmentError` when they name more than one subject of the study."""
        session = self._active()
        pairs = list(dict.fromkeys((system, value) for system, value in identifiers))
        if not pairs:
            return None
        t = _identifier
        matches = or_(*(and_(t.c.system == system, t.c.value == value) for system, value in pairs))
        subject_keys = sorted(
            session.execute(select(t.c.subject_key).where(t.c.study_oid == study_oid, matches).distinct()).scalars()
        )
        if not subject_keys:
            return None
        if len(subject_keys) > 1:
            raise AmbiguousEnrollmentError(study_oid, subject_keys)
        return self._load_enrollments(study_oid, subject_keys[0])[0]

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

    def _load_enrollments(self, study_oid: str, subject_key: str | None) -> list[Enrollment]:
        session = self._active()
        t, t_id = _enrollment, _identifier
        q = select(t).where(t.c.study_oid == study_oid).order_by(t.c.subject_key)
        q_id = select(t_id.c.subject_key, t_id.c.system, t_id.c.value).where(t_id.c.study_oid == study_oid)
        if subject_key is not None:
            q = q.where(t.c.subject_key == subject_key)
            q_id = q_id.where(t_id.c.subject_key == subject_key)
        identifiers: dict[str, list[tuple[str, str]]] = {}
        for row in session.execute(q_id.order_by(t_id.c.id)):
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
            for row in session.execute(q)
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

    def facts(self, study_oid: str, subject_key: str) -> list[StoredFact]:
        """The subject's stored facts, oldest first (first_seen, then arrival)."""
        session = self._active()
        t = _fact
        rows = session.execute(
            select(t)
            .where(t.c.study_oid == study_oid, t.c.subject_key == subject_key)
            .order_by(t.c.first_seen, t.c.id)
        )
        return [
            StoredFact(
                identity=row.identity,
                resource_type=row.resource_type,
                resource_id=row.resource_id,
                version=row.version,
                full_url=row.full_url,
                resource=row.resource,
                first_seen=row.first_seen,
            )
            for row in rows
        ]

    # -- item state -------------------------------------------------------------------------------------

    def sent_items(self, study_oid: str, subject_key: str) -> dict[ItemKey, SentItem]:
        session = self._active()
        t = _item
        rows = session.execute(
            select(t).where(t.c.study_oid == study_oid, t.c.subject_key == subject_key).order_by(t.c.id)
        )
        out: dict[ItemKey, SentItem] = {}
        for row in rows:
            key = ItemKey(
                study_oid=row.study_oid,
                subject_key=row.subject_key,
                study_event_oid=row.study_event_oid,
                study_event_repeat_key=_repeat_out(row.study_event_repeat_key),
                form_oid=row.form_oid,
                item_group_oid=row.item_group_oid,
                item_group_repeat_key=_repeat_out(row.item_group_repeat_key),
                item_oid=row.item_oid,
            )
            out[key] = SentItem(
                key=key,
                value=row.value,
                source_identity=row.source_identity,
                source_version=row.source_version,
                source_type=row.source_type,
                source_id=row.source_id,
                rule=row.rule,
                frozen=bool(row.frozen),
            )
        return out

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
        for item in items:
            k = item.key
            rows.append({
                "study_oid": k.study_oid, "subject_key": k.subject_key, "study_event_oid": k.study_event_oid,
                "study_event_repeat_key": _repeat_in(k.study_event_repeat_key), "form_oid": k.form_oid,
                "item_group_oid": k.item_group_oid, "item_group_repeat_key": _repeat_in(k.item_group_repeat_key),
                "item_oid": k.item_oid, "value": item.value, "source_identity": item.source_identity,
                "source_version": item.source_version, "source_type": item.source_type, "source_id": item.source_id,
                "rule": item.rule, "frozen": item.frozen, "updated_at": now,
            })
        session.execute(stmt, rows)

    def subject_known(self, study_oid: str, subject_key: str) -> bool:
        """Whether anything was ever sent (or queued) for the subject: item state or an outbox row.
        False means the next transaction must create the subject (SubjectData Insert)."""
        session = self._active()
        in_state = exists().where(_item.c.study_oid == study_oid, _item.c.subject_key == subject_key)
        in_outbox = exists().where(_outbox.c.study_oid == study_oid, _outbox.c.subject_key == subject_key)
        return bool(session.execute(select(or_(in_state, in_outbox))).scalar_one())

    # -- discrepancies ---------------------------------------------------------------------------------

    def upsert_discrepancy(self, discrepancy: Discrepancy) -> bool:
        """Record a discrepancy by its natural key. True when new (status 'open'). When it exists,
        its status and created_at are kept; message, candidates, held value, source version etc.
        are refreshed, and updated_at moves only if one of them changed (re-running is idempotent)."""
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
            select(t.c.id, *(t.c[name] for name in content)).where(t.c.natural_key == natural_key)
        ).one()
        if any(getattr(existing, name) != value for name, value in content.items()):
            session.execute(update(t).where(t.c.id == existing.id).values(updated_at=now, **content))
        return False

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
                .values(status=status, updated_at=self._now())
            ),
        )
        if done.rowcount != 1:
            raise StoreError("no such discrepancy")

    # -- outbox ----------------------------------------------------------------------------------------

    def next_sequence(self, study_oid: str, subject_key: str) -> int:
        """The subject's next outbox sequence: 1, then the highest so far + 1."""
        session = self._active()
        t = _outbox
        top = session.execute(
            select(func.max(t.c.sequence)).where(t.c.study_oid == study_oid, t.c.subject_key == subject_key)
        ).scalar()
        return (top or 0) + 1

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
        try:
            with session.begin_nested():
                result = session.execute(
                    t.insert().values(
                        study_oid=tx.study_oid,
                        subject_key=tx.subject_key,
                        sequence=tx.sequence,
                        site_oid=tx.site_oid,
                        odm=bytes(odm),
                        item_count=len(tx.changes),
                        status="pending",
                        attempts=0,
                        created_at=self._now(),
                        previous_values=previous_values_of(tx.changes),
                    )
                )
        except IntegrityError as exc:
            raise StoreConflictError(
                f"study {tx.study_oid}, subject {tx.subject_key}: outbox sequence {tx.sequence} is already "
                "taken (a concurrent unit of work); roll back and re-run"
            ) from exc
        primary_key = cast(CursorResult[Any], result).inserted_primary_key
        assert primary_key is not None
        return int(primary_key[0])

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
        if status not in OUTBOX_STATUSES:
            raise StoreError(f"unknown outbox status {status!r}: expected one of {', '.join(OUTBOX_STATUSES)}")
        session = self._writable()
        t = _outbox
        values: dict[str, Any] = {"status": status}
        if attempted:
            values["attempts"] = t.c.attempts + 1
        if status in ("sent", "acked", "rejected"):
            values["sent_at"] = func.coalesce(t.c.sent_at, self._now())
        if error is not None:
            values["last_error"] = error
        done = cast(CursorResult[Any], session.execute(update(t).where(t.c.id == outbox_id).values(**values)))
        if done.rowcount != 1:
            raise StoreError(f"no outbox row {outbox_id}")


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
        self.engine: Engine = make_engine(self.url, **engine_kwargs)
        try:
            if migrate:
                from esource.store.migrate import upgrade

                upgrade(self.engine)
        except BaseException:
            self.engine.dispose()
            raise
        self._clock: Clock = clock or SystemClock()
        self._sessions = sessionmaker(bind=self.engine, expire_on_commit=False)
        self._read_only_sessions = sessionmaker(
            bind=self.engine.execution_options(**{READ_ONLY_OPTION: True}), expire_on_commit=False
        )

    def uow(self, *, read_only: bool = False) -> SqlAlchemyUnitOfWork:
        """A new unit of work. Read-only ones refuse writes and, on SQLite, do not take the write
        lock (they read alongside a writer)."""
        factory = self._read_only_sessions if read_only else self._sessions
        return SqlAlchemyUnitOfWork(factory, clock=self._clock, read_only=read_only)

    def dispose(self) -> None:
        """Close all pooled connections."""
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.dispose()

    def __repr__(self) -> str:
        return f"Store({self.url.render_as_string(hide_password=True)!r})"
