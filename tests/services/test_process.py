"""The stateful use case on a real store (SQLite, and PostgreSQL when ESOURCE_TEST_POSTGRES_DSN is set):
idempotence, Updates with reasons, stable log repeat keys, entered-in-error freezing, privacy."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from lxml import etree

from esource.domain.model import DiscrepancyKind, Enrollment
from esource.odm.xsd import validate_odm
from esource.services.process import enroll

from process_helpers import DATA, MRN, ODM, L, U, bundle, condition, ingest, item_data, obs, outbox, patient  # noqa: F401


def test_first_transaction_is_an_insert_and_valid_transactional_odm(processor, store):
    out = ingest(processor, bundle(patient(), obs("o-sbp", "8480-6", 128, "mm[Hg]", "2024-05-01T09:00:00+02:00")))
    assert [s.subject_key for s in out.subjects] == ["001-0007"]
    rows = outbox(store)
    assert len(rows) == 1 and rows[0].sequence == 1
    odm = rows[0].odm
    assert validate_odm(odm) == []
    root = etree.fromstring(odm)
    assert root.get("FileType") == "Transactional"
    subj = root.find(f".//{ODM}SubjectData")
    assert subj.get("SubjectKey") == "001-0007" and subj.get("TransactionType") == "Insert"
    items = item_data(odm)
    assert items[("SE.BASELINE", "SYSBP", "IT.VS.VSORRES")] == ("128", "Insert", None)
    assert items[("SE.SCREEN", None, "IT.DM.BRTHYR")][0] == "1961"
    # nothing identifying leaves: Patient id, identifier, name, telecom, notes, full birth date
    for secret in (b"MRN-778899", b"Dupont", b"Jeanne", b"+33 1 23", b"anxious", b"1961-07-14", b"o-sbp"):
        assert secret not in odm


def test_reprocessing_the_same_input_produces_no_new_transaction(processor, store):
    data = bundle(patient(), obs("o-sbp", "8480-6", 128, "mm[Hg]", "2024-05-01T09:00:00+02:00"))
    ingest(processor, data, "kafka:t:0:1")
    again = ingest(processor, data, "kafka:t:0:1")
    assert again.duplicate
    # the same content under another intake key (e.g. an HTTP re-post) changes nothing either
    ingest(processor, data, "http:req-2")
    assert len(outbox(store)) == 1


def test_new_source_version_sends_update_with_reason(processor, store):
    ingest(processor, bundle(patient(), obs("o-wt", "29463-7", 80.04, "kg", "2024-05-01T09:00:00+02:00")))
    ingest(processor, bundle(patient(), obs("o-wt", "29463-7", 81.26, "kg", "2024-05-01T09:00:00+02:00", "2", "amended")))
    rows = outbox(store)
    assert len(rows) == 2 and rows[1].sequence == 2
    items = item_data(rows[1].odm)
    value, ttype, reason = items[("SE.BASELINE", "WEIGHT", "IT.VS.VSORRES")]
    assert (value, ttype) == ("81.3", "Update")
    assert "version 2" in reason and "80.0 -> 81.3" in reason
    assert "o-wt" not in reason  # the pseudonymous reference stands for the resource id
    assert etree.fromstring(rows[1].odm).find(f".//{ODM}SubjectData").get("TransactionType") != "Insert"
    # only the changed item travels
    assert set(items) == {("SE.BASELINE", "WEIGHT", "IT.VS.VSORRES")}


def test_reading_closer_to_target_replaces_sent_value(processor, store):
    # Day 1 = 2024-05-01; Week 4 target day 29 = 2024-05-29, window 26..32
    ingest(processor, bundle(patient(), obs("o-hr-31", "8867-4", 70, "/min", "2024-05-31T09:00:00+02:00")))
    ingest(processor, bundle(patient(), obs("o-hr-29", "8867-4", 74, "/min", "2024-05-29T09:00:00+02:00")))
    rows = outbox(store)
    items = item_data(rows[-1].odm)
    value, ttype, reason = items[("SE.WEEK4", "HR", "IT.VS.VSORRES")]
    assert (value, ttype) == ("74", "Update")
    assert "prefers" in reason
    assert items[("SE.WEEK4", "HR", "IT.VS.VSDAT")][:2] == ("2024-05-29", "Update")


def test_log_repeat_keys_are_stable_across_updates(processor, store):
    ingest(processor, bundle(patient(), condition("c-1", "Asthma", "2001-03"), condition("c-2", "Migraine", "2010")))
    # later: a new condition, then a new version of the first one
    ingest(processor, bundle(patient(), condition("c-3", "Gout", "2015-06-01")))
    ingest(processor, bundle(patient(), condition("c-1", "Asthma, allergic", "2001-03", "2")))
    rows = outbox(store)
    first, second, third = (item_data(r.odm) for r in rows)
    assert first[("SE.COMMON", "1", "IT.MH.MHTERM")][0] == "Asthma"
    assert first[("SE.COMMON", "2", "IT.MH.MHTERM")][0] == "Migraine"
    assert second[("SE.COMMON", "3", "IT.MH.MHTERM")] == ("Gout", "Insert", None)
    assert third[("SE.COMMON", "1", "IT.MH.MHTERM")][:2] == ("Asthma, allergic", "Update")
    assert set(third) == {("SE.COMMON", "1", "IT.MH.MHTERM")}


def test_entered_in_error_freezes_the_item_and_raises_one_discrepancy(processor, store):
    ingest(processor, bundle(patient(), obs("o-t", "8310-5", 37.2, "Cel", "2024-05-01T09:00:00+02:00")))
    ingest(processor, bundle(patient(), obs("o-t2", "8310-5", 36.8, "Cel", "2024-05-01T11:00:00+02:00")))
    assert len(outbox(store)) == 1  # the earlier reading of the day stays selected
    out = ingest(processor, bundle(patient(), obs("o-t", "8310-5", 37.2, "Cel", "2024-05-01T09:00:00+02:00", "2",
                                                  "entered-in-error")))
    assert len(outbox(store)) == 1, "a retracted source never silently replaces eCRF data"
    assert out.discrepancies_by_kind == {"entered_in_error": 1}
    with store.uow(read_only=True) as uow:
        d = [x for x in uow.open_discrepancies("CV01", "001-0007") if x.kind is DiscrepancyKind.ENTERED_IN_ERROR]
        sent = uow.sent_items("CV01", "001-0007")
    assert len(d) == 1 and "36.8" in d[0].message and d[0].study_event_oid == "SE.BASELINE"
    assert all(s.frozen for k, s in sent.items() if k.item_group_repeat_key == "TEMP")
    # a later change to that item is not sent while frozen
    ingest(processor, bundle(patient(), obs("o-t2", "8310-5", 36.9, "Cel", "2024-05-01T11:00:00+02:00", "2")))
    assert len(outbox(store)) == 1


def test_patient_not_enrolled_is_dropped_and_nothing_is_kept(processor, store):
    other = patient("P-OTHER")
    other["identifier"] = [{"system": MRN[0], "value": "MRN-000001"}]
    o = obs("o-x", "8480-6", 120, "mm[Hg]", "2024-05-01T09:00:00+02:00")
    o["subject"] = {"reference": "Patient/P-OTHER"}
    out = ingest(processor, bundle(other, o))
    assert out.subjects == [] and out.dropped_not_enrolled == 2
    assert outbox(store) == []
    from sqlalchemy import text
    with store.engine.connect() as conn:
        assert conn.execute(text("select count(*) from subject_fact")).scalar() == 0
        assert conn.execute(text("select count(*) from discrepancy")).scalar() == 0


def test_facts_keep_no_free_text_or_names(processor, store):
    ingest(processor, bundle(patient(), obs("o-sbp", "8480-6", 128, "mm[Hg]", "2024-05-01T09:00:00+02:00")))
    with store.uow(read_only=True) as uow:
        facts = uow.facts("CV01", "001-0007")
    dumped = json.dumps([f.resource for f in facts])
    assert "anxious" not in dumped and "Dupont" not in dumped and "+33" not in dumped
    assert "MRN-778899" in dumped  # identifiers stay inside the hospital store for matching


def test_withdrawal_stops_later_data(processor, store, study):
    enroll(store.uow, [Enrollment("CV01", "001-0008", "SITE.001", (("http://hospital.example/mrn", "MRN-2"),),
                                  dt.date(2024, 1, 1), dt.date(2024, 1, 20), dt.date(2024, 2, 15))])
    p = patient("P2")
    p["identifier"] = [{"system": "http://hospital.example/mrn", "value": "MRN-2"}]
    before = obs("o-a", "8867-4", 70, "/min", "2024-02-15T09:00:00+01:00")  # day 27 (Week 4), on the withdrawal date
    after = obs("o-b", "8480-6", 120, "mm[Hg]", "2024-02-16T09:00:00+01:00")
    for o in (before, after):
        o["subject"] = {"reference": "Patient/P2"}
    ingest(processor, bundle(p, before, after))
    items = item_data(outbox(store)[0].odm)
    assert items[("SE.WEEK4", "HR", "IT.VS.VSORRES")][0] == "70"
    assert not any(k[1] == "SYSBP" for k in items)


def test_dead_letters_keep_reason_and_payload(store):
    from esource.services.ingest import Envelope, IngestService

    svc = IngestService({}, store.uow)
    bad = b'{"resourceType": "Observation", "status": "final"'  # truncated JSON
    res = svc.ingest_bytes(bad, Envelope("http", "req-1", "POST /fhir (req-1)"))
    assert not res.accepted and res.dead_letter_id is not None
    assert "not JSON" in res.error or "JSON" in res.error
    with store.uow(read_only=True) as uow:
        (dl,) = uow.dead_letters()
    assert dl.payload == bad and dl.channel == "http" and dl.intake_key == "http:req-1"
    assert dl.reason == res.error
    assert svc.metrics.dead_letters.labels("http")._value.get() == 1


def test_store_conflicts_are_retried_not_dead_lettered(store, monkeypatch):
    """A concurrent unit of work (StoreConflictError) is the database's problem, not the input's."""
    from esource.services.ingest import Envelope, IngestService
    from esource.store.errors import StoreConflictError

    class Boom:
        def ingest_batch(self, inputs):
            raise StoreConflictError("outbox sequence already taken")

    svc = IngestService({"CV01": Boom()}, store.uow)
    with pytest.raises(StoreConflictError):
        svc.ingest_bytes(bundle(patient()), Envelope("kafka", "t:0:5", "kafka t[0]@5"))
    with store.uow(read_only=True) as uow:
        assert uow.dead_letters() == []


def test_sql_parameters_never_appear_in_store_errors(store):
    import sqlalchemy as sa

    with pytest.raises(sa.exc.SQLAlchemyError) as e:
        with store.engine.connect() as conn:
            conn.execute(sa.text("insert into no_such_table values (:v)"), {"v": "MRN-SECRET-1"})
    assert "MRN-SECRET-1" not in str(e.value)
