"""The SqlAlchemyUnitOfWork keeps the promises of the UnitOfWork port, on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest
from sqlalchemy import func, select

from esource.domain.model import (
    Discrepancy,
    DiscrepancyKind,
    Enrollment,
    ItemChange,
    ItemKey,
    ItemValue,
    Severity,
    SourceRef,
    SubjectTransaction,
    TransactionType,
)
from esource.domain.ports import SentItem, StoredFact, UnitOfWork
from esource.errors import EnrollmentError
from esource.store import AmbiguousEnrollmentError, StoreConflictError, StoreError, discrepancy_natural_key
from esource.store.schema import DiscrepancyRow, EnrollmentIdentifierRow, OutboxRow

STUDY = "CV01"
MRN = "urn:oid:1.2.250.1000.1"
INS = "urn:oid:1.2.250.1.213.1.4.8"


def enrollment(subject_key: str = "001-0001", *identifiers: tuple[str, str], **changes) -> Enrollment:
    fields: dict[str, Any] = dict(
        study_oid=STUDY,
        subject_key=subject_key,
        site_oid="SITE.001",
        identifiers=identifiers or ((MRN, f"MRN{subject_key}"),),
        consent_date=dt.date(2025, 1, 10),
        day1=dt.date(2025, 1, 15),
    )
    fields.update(changes)
    return Enrollment(**fields)


def fact(identity: str = "urn:lab|O-1", version: str = "1", first_seen=dt.date(2025, 2, 1), **resource) -> StoredFact:
    return StoredFact(
        identity=identity,
        resource_type="Observation",
        resource_id="obs-1",
        version=version,
        full_url="urn:uuid:0f1e",
        resource={"resourceType": "Observation", "id": "obs-1", **resource},
        first_seen=first_seen,
    )


def item_key(**changes) -> ItemKey:
    fields: dict[str, Any] = dict(
        study_oid=STUDY,
        subject_key="001-0001",
        study_event_oid="SE.W4",
        study_event_repeat_key=None,
        form_oid="F.VS",
        item_group_oid="IG.VS",
        item_group_repeat_key="SYSBP",
        item_oid="I.VSORRES",
    )
    fields.update(changes)
    return ItemKey(**fields)


def sent(key: ItemKey, value: str = "128", version: str = "1", frozen: bool = False) -> SentItem:
    return SentItem(
        key=key,
        value=value,
        source_identity="urn:lab|O-1",
        source_version=version,
        source_type="Observation",
        source_id="obs-1",
        rule="F.VS/SYSBP/result",
        frozen=frozen,
    )


def discrepancy(message: str = "unit mmol/mol is not convertible", **changes) -> Discrepancy:
    fields: dict[str, Any] = dict(
        kind=DiscrepancyKind.UNIT_NOT_CONVERTIBLE,
        message=message,
        study_oid=STUDY,
        subject_key="001-0001",
        source=SourceRef("Observation", "obs-9", "3", "urn:lab|O-9", full_url="urn:uuid:9", element="valueQuantity"),
        item_oid="I.LBORRES",
        study_event_oid="SE.W4",
        form_oid="F.LB",
        item_group_repeat_key="HBA1C",
        held_value="53",
        candidates=({"value": "7.0", "unit": "%", "date": "2025-02-03"},),
        severity=Severity.ERROR,
        rule="F.LB/HBA1C/result",
    )
    fields.update(changes)
    return Discrepancy(**fields)


def subject_transaction(sequence: int, subject_key: str = "001-0001", n_items: int = 2) -> SubjectTransaction:
    changes = [
        ItemChange(
            item=ItemValue(
                key=item_key(subject_key=subject_key, item_oid=f"I.{i}"),
                value=str(i),
                source=SourceRef("Observation", "o", "1", "urn:lab|O-1"),
                rule="r",
            ),
            transaction_type=TransactionType.INSERT,
        )
        for i in range(n_items)
    ]
    return SubjectTransaction(
        study_oid=STUDY,
        metadata_version_oid="MDV.1",
        subject_key=subject_key,
        site_oid="SITE.001",
        subject_transaction_type=TransactionType.INSERT,
        changes=changes,
        sequence=sequence,
    )


def count(uow, column) -> int:
    return uow.session.execute(select(func.count()).select_from(column.class_)).scalar_one()


# -- the port --------------------------------------------------------------------------------------


def test_it_is_a_unit_of_work(store):
    uow: UnitOfWork = store.uow()  # type-checks against the Protocol
    for name in ("repeat_keys", "first_seen", "upsert_fact", "add_outbox", "open_discrepancies"):
        assert hasattr(uow, name)


def test_using_it_outside_with_is_an_error(store):
    uow = store.uow()
    with pytest.raises(StoreError, match="not open"):
        uow.seen_intake("x")
    with uow:
        with pytest.raises(StoreError, match="already in use"):
            uow.__enter__()


# -- transactions ----------------------------------------------------------------------------------


def test_an_exception_leaves_nothing_written(store):
    with pytest.raises(RuntimeError, match="boom"):
        with store.uow() as uow:
            uow.add_enrollment(enrollment())
            uow.mark_intake("kafka:p0:o1")
            uow.upsert_fact(STUDY, "001-0001", fact())
            uow.put_sent_item(sent(item_key()))
            assert uow.repeat_keys.key_for(STUDY, "001-0001", "F.MH", "urn:h|C-1") == 1
            uow.first_seen.first_seen(STUDY, "001-0001", "urn:h|C-1", dt.date(2025, 2, 1))
            uow.upsert_discrepancy(discrepancy())
            uow.add_outbox(subject_transaction(1), b"<ODM/>")
            raise RuntimeError("boom")
    with store.uow() as uow:
        assert uow.enrollments(STUDY) == []
        assert not uow.seen_intake("kafka:p0:o1")
        assert uow.facts(STUDY, "001-0001") == []
        assert uow.sent_items(STUDY, "001-0001") == {}
        assert not uow.subject_known(STUDY, "001-0001")
        assert uow.open_discrepancies(STUDY) == []
        assert uow.next_sequence(STUDY, "001-0001") == 1
        # the allocation was rolled back with the rest: the next first-seen record gets 1
        assert uow.repeat_keys.key_for(STUDY, "001-0001", "F.MH", "urn:h|C-2") == 1


def test_leaving_without_commit_rolls_back(store):
    with store.uow() as uow:
        uow.mark_intake("a")
    with store.uow() as uow:
        assert not uow.seen_intake("a")


def test_explicit_rollback_and_work_after_a_commit(store):
    with store.uow() as uow:
        uow.mark_intake("a")
        uow.commit()
        uow.mark_intake("b")
        uow.rollback()
        uow.mark_intake("c")  # after commit: a new transaction, rolled back on exit
    with store.uow() as uow:
        assert [uow.seen_intake(k) for k in "abc"] == [True, False, False]


# -- enrollment ------------------------------------------------------------------------------------


def test_enrollment_is_found_by_any_of_its_identifiers(store):
    e = enrollment("001-0007", (MRN, "123456"), (INS, "1840275123456"), withdrawal_date=dt.date(2025, 5, 1))
    with store.uow() as uow:
        uow.add_enrollment(e)
        uow.add_enrollment(enrollment("002-0001", (MRN, "999"), site_oid="SITE.002"))
        uow.commit()
    with store.uow() as uow:
        assert uow.find_enrollment(STUDY, [(MRN, "123456")]) == e
        assert uow.find_enrollment(STUDY, [(INS, "1840275123456")]) == e
        assert uow.find_enrollment(STUDY, iter([("urn:other", "x"), (INS, "1840275123456")])) == e
        assert uow.find_enrollment(STUDY, [(MRN, "123456"), (INS, "1840275123456")]) == e
        # system and value must both match, in the same study
        assert uow.find_enrollment(STUDY, [(INS, "123456")]) is None
        assert uow.find_enrollment(STUDY, [(MRN, "1234567")]) is None
        assert uow.find_enrollment("OTHER", [(MRN, "123456")]) is None
        assert uow.find_enrollment(STUDY, []) is None
        assert [x.subject_key for x in uow.enrollments(STUDY)] == ["001-0007", "002-0001"]
        assert uow.enrollments("OTHER") == []


def test_identifiers_naming_two_subjects_are_ambiguous(store):
    with store.uow() as uow:
        uow.add_enrollment(enrollment("001-0001", (MRN, "1")))
        uow.add_enrollment(enrollment("001-0002", (INS, "2")))
        with pytest.raises(AmbiguousEnrollmentError) as raised:
            uow.find_enrollment(STUDY, [(MRN, "1"), (INS, "2")])
        assert raised.value.subject_keys == ["001-0001", "001-0002"]
        assert "1" not in str(raised.value).replace("001-0001", "").replace("001-0002", "").replace("CV01", "")


def test_adding_an_enrollment_again_updates_it(store, clock):
    with store.uow() as uow:
        uow.add_enrollment(enrollment("001-0001", (MRN, "1"), (INS, "2")))
        uow.commit()
    clock.advance(days=1)
    updated = enrollment("001-0001", (INS, "2"), (MRN, "1b"), withdrawal_date=dt.date(2025, 4, 1))
    with store.uow() as uow:
        uow.add_enrollment(updated)
        uow.add_enrollment(updated)  # idempotent
        uow.commit()
    with store.uow() as uow:
        assert uow.enrollments(STUDY) == [updated]
        assert uow.find_enrollment(STUDY, [(MRN, "1")]) is None  # the identifier was replaced
        assert uow.find_enrollment(STUDY, [(MRN, "1b")]) == updated
        assert count(uow, EnrollmentIdentifierRow.id) == 2


def test_an_identifier_cannot_belong_to_two_subjects(store):
    with store.uow() as uow:
        uow.add_enrollment(enrollment("001-0001", (MRN, "1")))
        with pytest.raises(EnrollmentError, match="already enrolled as subject 001-0001") as raised:
            uow.add_enrollment(enrollment("001-0002", (MRN, "1")))
        assert "MRN" not in str(raised.value) and ": 1" not in str(raised.value)


def test_the_same_identifier_may_be_enrolled_in_two_studies(store):
    with store.uow() as uow:
        uow.add_enrollment(enrollment("001-0001", (MRN, "1")))
        uow.add_enrollment(enrollment("001-0001", (MRN, "1"), study_oid="CV02"))
        assert uow.find_enrollment("CV02", [(MRN, "1")]).study_oid == "CV02"
        assert uow.find_enrollment(STUDY, [(MRN, "1")]).study_oid == STUDY


# -- intake ----------------------------------------------------------------------------------------


def test_intake_keys_are_remembered_once(store):
    key = "kafka:ehr.summary:3:1042|sha256:ab12"
    with store.uow() as uow:
        assert not uow.seen_intake(key)
        uow.mark_intake(key)
        assert uow.seen_intake(key)
        uow.mark_intake(key)  # a redelivery marks again without error
        uow.commit()
    with store.uow() as uow:
        assert uow.seen_intake(key)
        assert not uow.seen_intake(key + "x")
        uow.mark_intake(key)
        uow.commit()


# -- facts -----------------------------------------------------------------------------------------


def test_fact_upsert_reports_version_changes(store, clock):
    with store.uow() as uow:
        assert uow.upsert_fact(STUDY, "001-0001", fact(version="1", valueQuantity={"value": 120})) is True
        assert uow.upsert_fact(STUDY, "001-0001", fact(version="1", valueQuantity={"value": 999})) is False
        uow.commit()
    with store.uow() as uow:
        (stored,) = uow.facts(STUDY, "001-0001")
        assert stored.resource["valueQuantity"] == {"value": 120}  # same version: not replaced
        assert uow.upsert_fact(STUDY, "001-0001", fact(version="1")) is False
        later = fact(version="2", first_seen=dt.date(2025, 3, 9), valueQuantity={"value": 125})
        assert uow.upsert_fact(STUDY, "001-0001", later) is True
        assert uow.upsert_fact(STUDY, "001-0001", later) is False
        assert uow.upsert_fact(STUDY, "001-0001", fact("urn:lab|O-2", "1", dt.date(2025, 1, 5))) is True
        assert uow.upsert_fact(STUDY, "001-0002", fact(version="1")) is True  # another subject
        uow.commit()
    with store.uow() as uow:
        facts = uow.facts(STUDY, "001-0001")
        assert [f.identity for f in facts] == ["urn:lab|O-2", "urn:lab|O-1"]  # first_seen order
        newest = facts[1]
        assert newest.version == "2"
        assert newest.resource == {"resourceType": "Observation", "id": "obs-1", "valueQuantity": {"value": 125}}
        assert newest.first_seen == dt.date(2025, 2, 1)  # first seen stays the first
        assert newest.full_url == "urn:uuid:0f1e" and newest.resource_id == "obs-1"
        assert len(uow.facts(STUDY, "001-0002")) == 1


# -- item state ------------------------------------------------------------------------------------


def test_item_state_round_trips_including_absent_repeat_keys(store):
    no_repeats = item_key(study_event_repeat_key=None, item_group_repeat_key=None, item_oid="I.AGE")
    repeated = item_key(study_event_repeat_key="2025-02-03", item_group_repeat_key="1", item_oid="I.AGE")
    vertical = item_key()
    with store.uow() as uow:
        assert not uow.subject_known(STUDY, "001-0001")
        for key, value in ((no_repeats, "61"), (repeated, "62"), (vertical, "128")):
            uow.put_sent_item(sent(key, value))
        uow.commit()
    with store.uow() as uow:
        items = uow.sent_items(STUDY, "001-0001")
        assert set(items) == {no_repeats, repeated, vertical}
        assert items[no_repeats] == sent(no_repeats, "61")
        assert items[no_repeats].key.study_event_repeat_key is None
        assert items[no_repeats].key.item_group_repeat_key is None
        assert items[repeated].value == "62"
        assert uow.subject_known(STUDY, "001-0001")
        assert uow.sent_items(STUDY, "001-0002") == {}


def test_putting_an_item_again_replaces_its_state(store):
    key = item_key(item_group_repeat_key=None)
    with store.uow() as uow:
        uow.put_sent_item(sent(key, "128", version="1"))
        uow.commit()
    with store.uow() as uow:
        uow.put_sent_item(sent(key, "131", version="2", frozen=True))
        uow.commit()
    with store.uow() as uow:
        items = uow.sent_items(STUDY, "001-0001")
        assert list(items.values()) == [sent(key, "131", version="2", frozen=True)]


def test_facts_stored_in_one_call_keep_their_order(store):
    """Facts first seen the same day are read back in arrival order (PostgreSQL inserts a batch as one
    statement: its rows must still get their ids in the order given)."""
    identities = [f"urn:lab|O-{n}" for n in (5, 1, 9, 3, 7, 2, 8)]
    with store.uow() as uow:
        uow.store_facts(STUDY, "001-0001", [fact(i) for i in identities])
        uow.commit()
    with store.uow() as uow:
        assert [f.identity for f in uow.facts(STUDY, "001-0001")] == identities


def test_many_items_in_one_call_keep_every_value_exactly(store):
    """One call with many rows (PostgreSQL: one INSERT over arrays) keeps awkward text as it is, NULL
    repeat keys as absent, and the last state of a key given twice; bucket lookups find them all."""
    awkward = ['a,b', '{x}', 'say "hi"', "back\\slash", "NULL", "", "\u00e9t\u00e9 \u2265 5", "(1)", "x" * 300]
    keys = [item_key(study_event_repeat_key=None if i % 2 else f"R{i}", item_group_repeat_key=None if i % 3 else str(i),
                     item_oid=f"I.{i}") for i in range(len(awkward))]
    given = [sent(k, v or "0", frozen=i == 4) for i, (k, v) in enumerate(zip(keys, awkward))]
    again = sent(keys[0], "last wins", version="2")
    with store.uow() as uow:
        uow.put_sent_items([*given, again])
        uow.commit()
    expected = {s.key: s for s in [*given, again]}
    with store.uow() as uow:
        assert uow.sent_items(STUDY, "001-0001") == expected
        buckets = [(k.study_event_oid, k.study_event_repeat_key, k.form_oid, k.item_group_repeat_key) for k in keys]
        assert uow.sent_items(STUDY, "001-0001", buckets=buckets, frozen=False) == expected
        assert uow.sent_items(STUDY, "001-0001", buckets=buckets[:1], frozen=False) == {
            k: v for k, v in expected.items() if (k.study_event_repeat_key, k.item_group_repeat_key) ==
            (keys[0].study_event_repeat_key, keys[0].item_group_repeat_key)}
        assert uow.sent_items(STUDY, "001-0001", buckets=()) == {keys[4]: expected[keys[4]]}  # the frozen one


def test_batch_reads_answer_as_the_per_subject_ones(store):
    """What ingest_batch reads for all of a batch's subjects at once (facts stored, items sent from
    the changed sources, frozen items, outbox positions, enrollments) is what the per-subject calls
    answer, subject by subject, whatever the other subjects hold."""
    subjects = ["001-0001", "001-0002", "001-0003", "001-0004"]
    with store.uow() as uow:
        for i, s in enumerate(subjects):
            uow.add_enrollment(enrollment(s, (MRN, f"M{i}"), (INS, f"I{i}")))
        # the same identity under two subjects must not leak from one to the other
        uow.store_facts(STUDY, "001-0001", [fact("urn:lab|shared", "1"), fact("urn:lab|A", "1")])
        uow.store_facts(STUDY, "001-0002", [fact("urn:lab|shared", "7")])
        for s in subjects[:3]:
            uow.put_sent_items([
                SentItem(item_key(subject_key=s, item_oid="I.1"), "1", "urn:lab|shared", "1", "Observation", "o", "r",
                         False),
                SentItem(item_key(subject_key=s, item_oid="I.2"), "2", "urn:lab|other", "1", "Observation", "o", "r",
                         s == "001-0002"),
            ])
        uow.add_outbox(subject_transaction(1, "001-0001"), b"<ODM/>")
        uow.add_outbox(subject_transaction(2, "001-0001"), b"<ODM/>")
        uow.commit()
    incoming = {"001-0001": [fact("urn:lab|shared", "1"), fact("urn:lab|A", "2"), fact("urn:lab|B", "1")],
                "001-0002": [fact("urn:lab|shared", "8")], "001-0003": [fact("urn:lab|shared", "1")], "001-0004": []}
    with store.uow() as uow:
        one_by_one = {s: uow.store_facts(STUDY, s, f) for s, f in incoming.items()}
        uow.rollback()
    with store.uow() as uow:
        assert uow.store_facts_of(STUDY, incoming) == one_by_one
        assert one_by_one["001-0001"][1] == {"urn:lab|A", "urn:lab|B"} and one_by_one["001-0003"][1] == {"urn:lab|shared"}
        uow.commit()
    with store.uow() as uow:  # and it stored what store_facts stores
        assert {f.identity: f.version for f in uow.facts(STUDY, "001-0001")} == {"urn:lab|shared": "1", "urn:lab|A": "2",
                                                                              "urn:lab|B": "1"}
        assert [f.version for f in uow.facts(STUDY, "001-0002")] == ["8"]
        wanted = {"001-0001": {"urn:lab|shared"}, "001-0002": {"urn:lab|other"}, "001-0003": set(), "001-0004": {"x"}}
        assert uow.sent_items_from(STUDY, wanted) == {
            s: {k: v for k, v in uow.sent_items(STUDY, s, buckets=(), identities=ids).items()
                if v.source_identity in ids} for s, ids in wanted.items()}
        assert uow.frozen_items(STUDY, subjects) == {s: uow.sent_items(STUDY, s, buckets=()) for s in subjects}
        assert list(uow.frozen_items(STUDY, subjects)["001-0002"]) == [item_key(subject_key="001-0002", item_oid="I.2")]
        assert uow.outbox_positions(STUDY, subjects) == {
            s: (uow.subject_known(STUDY, s), uow.next_sequence(STUDY, s)) for s in subjects}
        assert uow.outbox_positions(STUDY, subjects)["001-0001"] == (True, 3)
        assert uow.outbox_positions(STUDY, subjects)["001-0004"] == (False, 1)
        buckets = {"001-0001": [("SE.W4", None, "F.VS", "SYSBP"), ("SE.W12", None, "F.VS", "SYSBP")],
                   "001-0002": [("SE.W4", None, "F.VS", "SYSBP")], "001-0003": [], "001-0004": [("SE.W4", None, "F.VS",
                                                                                               "SYSBP")]}
        sources = {"001-0001": {"urn:lab|other"}, "001-0002": set(), "001-0003": {"urn:lab|shared"}, "001-0004": set()}
        assert uow.sent_items_in(STUDY, {k: (b, sources[k]) for k, b in buckets.items()}) == {
            k: uow.sent_items(STUDY, k, buckets=b, identities=sources[k], frozen=False) for k, b in buckets.items()}
        assert len(uow.sent_items_in(STUDY, {k: (b, sources[k]) for k, b in buckets.items()})["001-0001"]) == 2
        patients = [((MRN, "M0"),), ((INS, "I1"), (MRN, "M1")), ((MRN, "nobody"),)]
        assert uow.find_enrollments(STUDY, patients) == {p: uow.find_enrollment(STUDY, p) for p in patients}
        with pytest.raises(AmbiguousEnrollmentError):
            uow.find_enrollments(STUDY, [((MRN, "M0"),), ((MRN, "M0"), (INS, "I1"))])


def test_facts_of_many_subjects_answer_as_facts_subject_by_subject(store):
    """Each subject's own date ranges (and None: everything), undated facts and facts stored under
    another map basis always included, oldest first; nothing of another subject."""
    days = {"001-0001": [1, 5, 29, 30, 85], "001-0002": [2, 29, 170], "001-0003": [29]}
    with store.uow() as uow:
        for s, ds in days.items():
            facts = [dataclasses.replace(fact(f"urn:lab|{s}-{d}"), clinical_date=dt.date(2025, 1, 14) +
                                         dt.timedelta(days=d), clinical_basis="b1") for d in ds]
            facts.append(dataclasses.replace(fact(f"urn:lab|{s}-undated"), clinical_basis="b1"))
            facts.append(dataclasses.replace(fact(f"urn:lab|{s}-old-basis"), clinical_date=dt.date(2025, 9, 1),
                                             clinical_basis="b0"))
            uow.store_facts(STUDY, s, facts)
        uow.commit()
    d = lambda n: dt.date(2025, 1, 14) + dt.timedelta(days=n)  # noqa: E731
    dates = {"001-0001": [(d(26), d(32)), (d(78), d(92))], "001-0002": [(d(162), d(176))], "001-0003": None,
             "001-0004": [(d(1), d(200))]}
    with store.uow() as uow:
        got = uow.facts_of(STUDY, dates, "b1")
        assert got == {s: uow.facts(STUDY, s, dates=r, basis="b1") for s, r in dates.items()}
        assert [f.identity.split("|")[1] for f in got["001-0001"]] == [
            "001-0001-29", "001-0001-30", "001-0001-85", "001-0001-undated", "001-0001-old-basis"]
        assert len(got["001-0003"]) == 3 and got["001-0004"] == []


def test_first_statistics_analyze_only_tables_never_analyzed(store):
    """PostgreSQL: a hot table with rows and no statistics is analyzed once; SQLite has nothing to do."""
    with store.uow() as uow:
        uow.mark_intakes([f"kafka:t:0:{i}" for i in range(1200)])
        uow.commit()
    if store.engine.dialect.name != "postgresql":
        assert store.first_statistics() == []
        return
    with store.engine.connect() as conn:  # the statistics counters are flushed at transaction end
        conn.exec_driver_sql("SELECT pg_stat_force_next_flush()") if conn.dialect.server_version_info >= (15,) else None
    assert "intake" in store.first_statistics()
    assert "intake" not in store.first_statistics()
    assert store._statistics_interval == 1.0  # item_state, audit_log ... have none yet: checked again


# -- repeat keys and first-seen dates --------------------------------------------------------------


def test_repeat_keys_follow_first_seen_order_and_stay_stable(store):
    key_for = lambda uow, identity, form="F.MH", subject="001-0001": uow.repeat_keys.key_for(  # noqa: E731
        STUDY, subject, form, identity
    )
    with store.uow() as uow:
        assert [key_for(uow, i) for i in ("urn:h|C-9", "urn:h|C-1", "urn:h|C-5")] == [1, 2, 3]
        assert key_for(uow, "urn:h|C-1") == 2
        uow.commit()
    with store.uow() as uow:  # a later unit of work: same keys, new records continue the sequence
        assert key_for(uow, "urn:h|C-5") == 3
        assert key_for(uow, "urn:h|C-0") == 4
        assert key_for(uow, "urn:h|C-9") == 1
        # per form and per subject
        assert key_for(uow, "urn:h|C-9", form="F.CM") == 1
        assert key_for(uow, "urn:h|C-7", form="F.CM") == 2
        assert key_for(uow, "urn:h|C-7", subject="001-0002") == 1
        uow.commit()
    with store.uow() as uow:
        keys = {i: key_for(uow, i) for i in ("urn:h|C-9", "urn:h|C-1", "urn:h|C-5", "urn:h|C-0", "urn:h|C-3")}
        assert keys == {"urn:h|C-9": 1, "urn:h|C-1": 2, "urn:h|C-5": 3, "urn:h|C-0": 4, "urn:h|C-3": 5}
        assert len(set(keys.values())) == len(keys)  # never reused


def test_first_seen_is_recorded_once(store):
    with store.uow() as uow:
        assert uow.first_seen.first_seen(STUDY, "001-0001", "urn:h|C-1", dt.date(2025, 2, 1)) == dt.date(2025, 2, 1)
        assert uow.first_seen.first_seen(STUDY, "001-0001", "urn:h|C-1", dt.date(2025, 2, 2)) == dt.date(2025, 2, 1)
        uow.commit()
    with store.uow() as uow:
        assert uow.first_seen.first_seen(STUDY, "001-0001", "urn:h|C-1", dt.date(2025, 3, 1)) == dt.date(2025, 2, 1)
        assert uow.first_seen.first_seen(STUDY, "001-0002", "urn:h|C-1", dt.date(2025, 3, 1)) == dt.date(2025, 3, 1)


# -- discrepancies ---------------------------------------------------------------------------------


def test_discrepancy_upsert_is_idempotent_and_rebuilds_the_domain_object(store, clock):
    d = discrepancy()
    with store.uow() as uow:
        assert uow.upsert_discrepancy(d) is True
        uow.commit()
    clock.advance(hours=1)
    with store.uow() as uow:
        assert uow.upsert_discrepancy(d) is False
        uow.commit()
    with store.uow() as uow:
        assert uow.open_discrepancies(STUDY) == [d]
        assert uow.open_discrepancies(STUDY, "001-0001") == [d]
        assert uow.open_discrepancies(STUDY, "001-0002") == []
        row = uow.session.execute(select(DiscrepancyRow)).scalar_one()
        assert row.status == "open"
        assert row.natural_key == discrepancy_natural_key(d.key)
        assert row.updated_at == row.created_at  # nothing changed: not touched


def test_discrepancy_upsert_keeps_status_and_created_at(store, clock):
    d = discrepancy()
    created = clock.now()
    with store.uow() as uow:
        uow.upsert_discrepancy(d)
        uow.set_discrepancy_status(d.key, "in_review")
        uow.commit()
    clock.advance(days=2)
    changed = discrepancy(
        "unit mmol/mol is still not convertible",
        candidates=({"value": "7.1"}, {"value": "7.2"}),
        source=SourceRef("Observation", "obs-9", "4", "urn:lab|O-9"),
    )
    assert changed.key == d.key
    with store.uow() as uow:
        assert uow.upsert_discrepancy(changed) is False
        uow.commit()
    with store.uow() as uow:
        assert uow.open_discrepancies(STUDY) == [changed]  # in_review is still open work
        assert uow.discrepancy_status(d.key) == "in_review"
        row = uow.session.execute(select(DiscrepancyRow)).scalar_one()
        assert (row.created_at, row.updated_at) == (created, clock.now())
        uow.set_discrepancy_status(d.key, "resolved")
        uow.commit()
    with store.uow() as uow:
        assert uow.upsert_discrepancy(changed) is False  # re-found by the next run
        assert uow.discrepancy_status(d.key) == "resolved"  # a data manager's decision stands
        assert uow.open_discrepancies(STUDY) == []
        assert count(uow, DiscrepancyRow.id) == 1
        with pytest.raises(StoreError, match="status"):
            uow.set_discrepancy_status(d.key, "closed")
        with pytest.raises(StoreError, match="no such"):
            uow.set_discrepancy_status(discrepancy(item_oid="I.OTHER").key, "resolved")


def test_discrepancies_with_different_keys_are_different(store):
    without_source = discrepancy(kind=DiscrepancyKind.MISSING_VALUE, source=None, candidates=(), held_value=None)
    with store.uow() as uow:
        assert uow.upsert_discrepancy(discrepancy()) is True
        assert uow.upsert_discrepancy(discrepancy(item_oid="I.LBSTRESN")) is True
        assert uow.upsert_discrepancy(discrepancy(subject_key="001-0002")) is True
        assert uow.upsert_discrepancy(without_source) is True
        # the parts are kept apart: 'a|b' + 'c' is not 'a' + 'b|c'
        assert uow.upsert_discrepancy(discrepancy(form_oid="F|X", item_group_repeat_key="1")) is True
        assert uow.upsert_discrepancy(discrepancy(form_oid="F", item_group_repeat_key="X|1")) is True
        uow.commit()
    with store.uow() as uow:
        found = uow.open_discrepancies(STUDY)
        assert len(found) == 6
        assert without_source in found and found[3].source is None


# -- outbox ----------------------------------------------------------------------------------------


def test_outbox_sequence_is_per_subject(store, clock):
    with store.uow() as uow:
        assert uow.next_sequence(STUDY, "001-0001") == 1
        first = uow.add_outbox(subject_transaction(1), b"<ODM seq='1'/>")
        assert uow.next_sequence(STUDY, "001-0001") == 2
        assert uow.next_sequence(STUDY, "001-0002") == 1
        second = uow.add_outbox(subject_transaction(2, n_items=5), b"<ODM seq='2'/>")
        other = uow.add_outbox(subject_transaction(1, subject_key="001-0002"), b"<ODM/>")
        assert uow.subject_known(STUDY, "001-0002")  # queued counts as known
        uow.commit()
    assert first < second < other
    with store.uow() as uow:
        assert uow.next_sequence(STUDY, "001-0001") == 3
        assert uow.next_sequence("CV02", "001-0001") == 1
        entries = uow.outbox_entries()
        assert [(e.subject_key, e.sequence, e.odm, e.item_count) for e in entries] == [
            ("001-0001", 1, b"<ODM seq='1'/>", 2),
            ("001-0001", 2, b"<ODM seq='2'/>", 5),
            ("001-0002", 1, b"<ODM/>", 2),
        ]
        assert {(e.status, e.attempts, e.site_oid, e.sent_at) for e in entries} == {("pending", 0, "SITE.001", None)}
        assert entries[0].created_at == clock.now()


def test_a_taken_sequence_is_a_conflict(store):
    with store.uow() as uow:
        uow.add_outbox(subject_transaction(1), b"<ODM/>")
        with pytest.raises(StoreConflictError, match="sequence 1"):
            uow.add_outbox(subject_transaction(1), b"<ODM again/>")
        with pytest.raises(StoreError, match="next_sequence"):
            uow.add_outbox(subject_transaction(0), b"<ODM/>")
        uow.add_outbox(subject_transaction(2), b"<ODM/>")  # the transaction is still usable
        uow.commit()
    with store.uow() as uow:
        assert [e.sequence for e in uow.outbox_entries()] == [1, 2]


def test_outbox_status_changes(store, clock):
    with store.uow() as uow:
        outbox_id = uow.add_outbox(subject_transaction(1), b"<ODM/>")
        uow.commit()
    clock.advance(minutes=1)
    with store.uow() as uow:
        uow.set_outbox_status(outbox_id, "failed", error="timeout", attempted=True)
        uow.commit()
    with store.uow() as uow:
        (e,) = uow.outbox_entries(statuses=["failed"])
        assert (e.status, e.attempts, e.last_error, e.sent_at) == ("failed", 1, "timeout", None)
        sent_time = clock.advance(minutes=1)
        uow.set_outbox_status(outbox_id, "sent", attempted=True)
        clock.advance(minutes=1)
        uow.set_outbox_status(outbox_id, "acked")
        uow.commit()
    with store.uow() as uow:
        assert uow.outbox_entries() == []
        (e,) = uow.outbox_entries(statuses=None)
        assert (e.status, e.attempts, e.sent_at) == ("acked", 2, sent_time)
        assert count(uow, OutboxRow.id) == 1
        with pytest.raises(StoreError, match="unknown outbox status"):
            uow.set_outbox_status(outbox_id, "delivered")
        with pytest.raises(StoreError, match="no outbox row"):
            uow.set_outbox_status(outbox_id + 100, "sent")


def test_outbox_statuses_of_many_rows_in_one_call(store, clock):
    """The dispatcher's acks: each row moves and counts its attempt as with set_outbox_status; a
    row already sent keeps its first sent_at; an id that does not exist fails the call."""
    with store.uow() as uow:
        ids = [uow.add_outbox(subject_transaction(n), b"<ODM/>") for n in (1, 2, 3)]
        uow.set_outbox_status(ids[2], "sent", attempted=True)
        uow.commit()
    first_sent = clock.now()
    clock.advance(minutes=1)
    with store.uow() as uow:
        uow.set_outbox_statuses(ids[1:], "acked", attempted=True)
        uow.set_outbox_statuses([], "acked")
        uow.commit()
    with store.uow() as uow:
        rows = {e.id: e for e in uow.outbox_entries(statuses=None)}
        assert [(rows[i].status, rows[i].attempts) for i in ids] == [("pending", 0), ("acked", 1), ("acked", 2)]
        assert (rows[ids[1]].sent_at, rows[ids[2]].sent_at) == (clock.now(), first_sent)
        with pytest.raises(StoreError, match="do not exist"):
            uow.set_outbox_statuses([ids[0], ids[0] + 100], "sent")
        with pytest.raises(StoreError, match="unknown outbox status"):
            uow.set_outbox_statuses(ids, "delivered")
