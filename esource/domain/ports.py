"""Small interfaces the core defines and the outside implements (store, clock).

The mapping engine needs two pieces of memory to keep its promises across messages: log repeat keys
that are stable forever, and the date esource first saw an undated record. Both are ports so the dry
run (in memory) and the service (database) share one engine.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Iterable, Mapping, Protocol, Sequence

from esource.domain.audit import AuditEvent
from esource.domain.model import Discrepancy, Enrollment, ItemKey, SubjectTransaction


class Clock(Protocol):
    def now(self) -> dt.datetime:
        """Current UTC time (timezone-aware)."""
        ...


class SystemClock:
    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)


class RepeatKeyAllocator(Protocol):
    def key_for(self, study_oid: str, subject_key: str, form_oid: str, identity: str) -> int:
        """The log repeat key (1, 2, 3 ...) of a source record: allocated in first-seen order, never reused."""
        ...


class FirstSeenRegistry(Protocol):
    def first_seen(self, study_oid: str, subject_key: str, identity: str, today: dt.date) -> dt.date:
        """The date esource first saw this source record (recorded as `today` on first call)."""
        ...


class InMemoryRepeatKeys:
    """Dry-run allocator: first-seen order within one run."""

    def __init__(self) -> None:
        self._keys: dict[tuple[str, str, str], dict[str, int]] = {}

    def key_for(self, study_oid: str, subject_key: str, form_oid: str, identity: str) -> int:
        keys = self._keys.setdefault((study_oid, subject_key, form_oid), {})
        if identity not in keys:
            keys[identity] = len(keys) + 1
        return keys[identity]


class InMemoryFirstSeen:
    def __init__(self) -> None:
        self._seen: dict[tuple[str, str, str], dt.date] = {}

    def first_seen(self, study_oid: str, subject_key: str, identity: str, today: dt.date) -> dt.date:
        return self._seen.setdefault((study_oid, subject_key, identity), today)


@dataclass(frozen=True, slots=True)
class SentItem:
    """The last value sent for one item, and where it came from (the state the diff runs against)."""

    key: ItemKey
    value: str
    source_identity: str
    source_version: str
    source_type: str
    source_id: str | None
    rule: str
    frozen: bool = False  # set when its source was retracted (entered-in-error): a data manager decides


@dataclass(frozen=True, slots=True)
class StoredFact:
    """A source resource kept for a subject (minimal, no free text): what re-mapping runs over."""

    identity: str
    resource_type: str
    resource_id: str | None
    version: str
    full_url: str | None
    resource: dict
    first_seen: dt.date
    # the day its readings are placed on, under the map rules `clinical_basis` names (see
    # MappingEngine.clinical_date): what lets an incremental run load only facts near its visits
    clinical_date: dt.date | None = None
    clinical_basis: str | None = None


class UnitOfWork(Protocol):
    """One database transaction around a use case: facts, item state, discrepancies and the outbox
    commit together or not at all."""

    def __enter__(self) -> "UnitOfWork": ...
    def __exit__(self, *exc: object) -> None: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...

    # enrollment
    def find_enrollment(self, study_oid: str, identifiers: Iterable[tuple[str, str]]) -> Enrollment | None: ...
    def find_enrollments(self, study_oid: str, patients: Iterable[Sequence[tuple[str, str]]]
                         ) -> dict[tuple[tuple[str, str], ...], Enrollment | None]:
        """find_enrollment for many patients (keyed by their identifiers as a tuple) in one lookup."""
        ...
    def add_enrollment(self, enrollment: Enrollment) -> None: ...
    def enrollments(self, study_oid: str) -> list[Enrollment]: ...

    # intake de-duplication
    def seen_intake(self, intake_key: str) -> bool: ...
    def mark_intake(self, intake_key: str) -> None: ...
    def seen_intakes(self, intake_keys: Sequence[str]) -> set[str]: ...
    def mark_intakes(self, intake_keys: Sequence[str]) -> None: ...

    # subject facts (source resources the map reads)
    def upsert_fact(self, study_oid: str, subject_key: str, fact: StoredFact) -> bool: ...
    def store_facts(self, study_oid: str, subject_key: str, incoming: Sequence[StoredFact]
                    ) -> tuple[list[StoredFact], set[str], list[StoredFact]]:
        """Keep the newest version of each incoming record (stale versions ignored): the records now
        kept that are new or changed, their identities, and the versions the changed ones replaced
        (nothing else is read)."""
        ...
    def store_facts_of(self, study_oid: str, incoming: "Mapping[str, Sequence[StoredFact]]"
                       ) -> dict[str, tuple[list[StoredFact], set[str], list[StoredFact]]]:
        """store_facts for many subjects (SubjectKey -> its incoming records) in one read and write."""
        ...
    def facts(self, study_oid: str, subject_key: str, *,
              dates: "Sequence[tuple[dt.date, dt.date]] | None" = None, basis: str | None = None
              ) -> list[StoredFact]:
        """The subject's facts, oldest first. With `dates`: only those with no clinical date, one
        stored under another basis than `basis`, or one inside a range."""
        ...

    # item state
    def sent_items(self, study_oid: str, subject_key: str) -> dict[ItemKey, SentItem]: ...
    def put_sent_item(self, item: SentItem) -> None: ...
    def put_sent_items(self, items: "Iterable[SentItem]") -> None: ...
    def subject_known(self, study_oid: str, subject_key: str) -> bool: ...
    def sent_items_from(self, study_oid: str, identities: "Mapping[str, Iterable[str]]"
                        ) -> dict[str, dict[ItemKey, SentItem]]: ...
    def frozen_items(self, study_oid: str, subject_keys: Sequence[str]) -> dict[str, dict[ItemKey, SentItem]]: ...

    # repeat keys and first-seen dates (the engine's memory)
    repeat_keys: RepeatKeyAllocator
    first_seen: FirstSeenRegistry

    # discrepancies (upsert by Discrepancy.key; returns True when new)
    def upsert_discrepancy(self, discrepancy: Discrepancy) -> bool: ...
    def open_discrepancies(self, study_oid: str, subject_key: str | None = None) -> list[Discrepancy]: ...

    # outbox: the ODM transaction written in the same database transaction as the state
    def next_sequence(self, study_oid: str, subject_key: str) -> int: ...
    def outbox_positions(self, study_oid: str, subject_keys: Sequence[str]) -> dict[str, tuple[bool, int]]:
        """(subject_known, next_sequence) of many subjects in one read."""
        ...
    def add_outbox(self, transaction: SubjectTransaction, odm: bytes) -> int: ...

    # audit trail: recorded in this unit of work, chained (hash of the predecessor) when it commits
    def audit(self, event: AuditEvent) -> None: ...


# ---------------------------------------------------------------------- EDC side


@dataclass(frozen=True, slots=True)
class DeliveryReceipt:
    """What an EDC said about one transaction. `permanent` failures are not retried blindly: they become
    an "EDC rejected" discrepancy carrying the vendor's own code and message."""

    accepted: bool
    reference: str | None = None  # the EDC's own reference (Rave ReferenceNumber, file name ...)
    permanent: bool = False
    code: str | None = None
    message: str | None = None


@dataclass(frozen=True, slots=True)
class ConnectorCapabilities:
    name: str
    read_back: bool  # can read a subject's clinical data back (for de-duplication and conflicts)
    idempotency_key: bool  # the protocol de-duplicates on a key we send
    integer_repeat_keys: bool  # needs integer repeat keys (key map kept by the connector)


class EdcConnector(Protocol):
    """One per EDC (connectors/). The transaction key (study, subject, sequence) is what de-duplicates."""

    def capabilities(self) -> ConnectorCapabilities: ...

    def send(self, transaction: SubjectTransaction, odm: bytes) -> DeliveryReceipt:
        """Deliver one ODM transaction. Raise for transient faults (retried); return a receipt otherwise."""
        ...

    def read_back(self, study_oid: str, subject_key: str) -> bytes | None:
        """The subject's ClinicalData as the EDC holds it now (ODM), or None when not supported."""
        ...


class DeadLetterSink(Protocol):
    """Where input that cannot be processed goes, with its reason and payload (nothing is lost)."""

    def add_dead_letter(self, *, channel: str, intake_key: str, origin: str, reason: str, payload: bytes,
                        received_at: dt.datetime) -> int: ...


class EdcKeyMap(Protocol):
    """esource's repeat keys (test code, date, log number) <-> an EDC's integer keys (Rave log lines,
    REDCap repeat instances): allocated once per scope and stable forever, persisted by the connector."""

    def edc_key(self, connector: str, study_oid: str, subject_key: str, scope: str, esource_key: str) -> int:
        """The EDC key for esource_key within scope (e.g. "SE.UNSCHED" or "IG.VS"), allocated 1, 2, 3 ..."""
        ...

    def esource_key(self, connector: str, study_oid: str, subject_key: str, scope: str, edc_key: int) -> str | None:
        ...


class InMemoryEdcKeyMap:
    def __init__(self) -> None:
        self._fwd: dict[tuple[str, str, str, str], dict[str, int]] = {}

    def edc_key(self, connector: str, study_oid: str, subject_key: str, scope: str, esource_key: str) -> int:
        keys = self._fwd.setdefault((connector, study_oid, subject_key, scope), {})
        if esource_key not in keys:
            keys[esource_key] = len(keys) + 1
        return keys[esource_key]

    def esource_key(self, connector: str, study_oid: str, subject_key: str, scope: str, edc_key: int) -> str | None:
        keys = self._fwd.get((connector, study_oid, subject_key, scope), {})
        return next((k for k, v in keys.items() if v == edc_key), None)
