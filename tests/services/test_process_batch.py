"""Batches (a Kafka poll): one unit of work, each subject mapped once, at most one transaction per
subject; a bad input in a batch parks only itself; stale versions never replace newer ones; re-map."""

from __future__ import annotations

import datetime as dt

import pytest

from esource.domain.model import Enrollment
from esource.intake.parse import parse_fhir
from esource.odm.xsd import validate_odm
from esource.services.ingest import Envelope, IngestService
from esource.services.process import enroll
from process_helpers import MRN, bundle, item_data, obs, outbox, patient

OTHER = ("http://hospital.example/mrn", "MRN-112233")


@pytest.fixture
def service(processor, store):
    return IngestService({"CV01": processor}, store.uow)


def _env(i: int) -> Envelope:
    return Envelope("kafka", f"t:0:{i}", f"kafka t[0]@{i}")


def test_a_batch_sends_one_transaction_per_subject_with_the_final_values(service, store):
    first = bundle(patient(), obs("o-wt", "29463-7", 80.04, "kg", "2024-05-01T09:00:00+02:00"))
    second = bundle(patient(), obs("o-wt", "29463-7", 81.26, "kg", "2024-05-01T09:00:00+02:00", "2", "amended"))
    results = service.ingest_batch([(first, _env(1)), (second, _env(2))])
    assert [r.accepted for r in results] == [True, True]
    rows = outbox(store)
    assert len(rows) == 1, "two messages for one subject in one batch make one transaction"
    assert validate_odm(rows[0].odm) == []
    value, ttype, _ = item_data(rows[0].odm)[("SE.BASELINE", "WEIGHT", "IT.VS.VSORRES")]
    assert (value, ttype) == ("81.3", "Insert"), "the intermediate value never reaches the EDC"
    # the batch's intake keys are all recorded: a redelivery changes nothing
    again = service.ingest_batch([(first, _env(1)), (second, _env(2))])
    assert all(r.duplicate for r in again)
    assert len(outbox(store)) == 1


def test_the_same_message_twice_in_one_batch_is_processed_once(service, store):
    data = bundle(patient(), obs("o-sbp", "8480-6", 128, "mm[Hg]", "2024-05-01T09:00:00+02:00"))
    results = service.ingest_batch([(data, _env(7)), (data, _env(7))])
    assert [r.duplicate for r in results] == [False, True]
    assert len(outbox(store)) == 1


def test_one_ambiguous_input_parks_itself_and_the_rest_of_the_batch_goes_through(service, store):
    # a Patient whose identifiers name two enrolled subjects: the whole message is refused
    enroll(store.uow, [Enrollment("CV01", "001-0008", "SITE.001", (OTHER,), dt.date(2024, 4, 15),
                                  dt.date(2024, 5, 1))])
    ambiguous = patient()
    ambiguous["identifier"].append({"system": OTHER[0], "value": OTHER[1]})
    good = bundle(patient(), obs("o-sbp", "8480-6", 128, "mm[Hg]", "2024-05-01T09:00:00+02:00"))
    bad = bundle(ambiguous, obs("o-hr", "8867-4", 70, "/min", "2024-05-01T09:00:00+02:00"))
    not_json = b"{not json"
    results = service.ingest_batch([(good, _env(1)), (bad, _env(2)), (not_json, _env(3))])
    assert [r.accepted for r in results] == [True, False, False]
    assert "001-0007" in results[1].error and "001-0008" in results[1].error
    with store.uow(read_only=True) as uow:
        parked = {d.intake_key for d in uow.dead_letters()}
    assert parked == {"kafka:t:0:2", "kafka:t:0:3"}
    assert len(outbox(store)) == 1  # the good input's transaction


def test_an_older_version_arriving_late_does_not_replace_the_newer(processor, store):
    newer = obs("o-wt", "29463-7", 81.26, "kg", "2024-05-01T09:00:00+02:00", "3", "amended")
    older = obs("o-wt", "29463-7", 80.04, "kg", "2024-05-01T09:00:00+02:00", "2")
    processor.ingest(parse_fhir(bundle(patient(), newer), "t"), "k1")
    processor.ingest(parse_fhir(bundle(patient(), older), "t"), "k2")
    rows = outbox(store)
    assert len(rows) == 1 and item_data(rows[0].odm)[("SE.BASELINE", "WEIGHT", "IT.VS.VSORRES")][0] == "81.3"
    # lastUpdated decides when both carry one (version ids need not be numbers)
    a = obs("o-hr", "8867-4", 71, "/min", "2024-05-01T09:00:00+02:00", "b")
    a["meta"]["lastUpdated"] = "2024-05-02T10:00:00Z"
    b = obs("o-hr", "8867-4", 99, "/min", "2024-05-01T09:00:00+02:00", "a")
    b["meta"]["lastUpdated"] = "2024-05-02T09:00:00Z"
    processor.ingest(parse_fhir(bundle(patient(), a), "t"), "k3")
    processor.ingest(parse_fhir(bundle(patient(), b), "t"), "k4")
    with store.uow(read_only=True) as uow:
        (hr,) = [f for f in uow.facts("CV01", "001-0007") if f.resource_id == "o-hr"]
    assert hr.version == "b"


def test_remap_reruns_the_map_over_stored_facts(processor, store, study):
    processor.ingest(parse_fhir(bundle(patient(), obs("o-sbp", "8480-6", 128, "mm[Hg]",
                                                       "2024-05-01T09:00:00+02:00")), "t"), "k1")
    assert processor.remap(["001-0007"], actor="user:dm1", reason="map v2") [0].items_sent == 0
    assert len(outbox(store)) == 1  # nothing changed: nothing sent
    # the map changes (here: the subject's Day 1 moves, so the visit of the reading changes)
    with store.uow() as uow:
        uow.add_enrollment(Enrollment("CV01", "001-0007", "SITE.001", (MRN,), dt.date(2024, 4, 15),
                                      dt.date(2024, 4, 3)))
        uow.commit()
    (outcome,) = processor.remap(["001-0007"], actor="user:dm1", reason="Day 1 corrected")
    assert outcome.items_sent > 0 and len(outbox(store)) == 2
    with pytest.raises(Exception, match="not enrolled"):
        processor.remap(["999-9999"])


def test_intake_keys_older_than_the_retention_are_forgotten(processor, store, clock):
    """The de-duplication table does not grow forever: keys older than the retention go, newer stay."""
    data = bundle(patient(), obs("o-sbp", "8480-6", 128, "mm[Hg]", "2024-05-01T09:00:00+02:00"))
    processor.ingest(parse_fhir(data, "t"), "kafka:t:0:1")
    clock.advance(days=10)
    processor.ingest(parse_fhir(data, "t"), "kafka:t:0:2")
    with store.uow() as uow:
        assert uow.prune_intake(clock.now() - dt.timedelta(days=5)) == 1
        uow.commit()
    with store.uow(read_only=True) as uow:
        assert uow.seen_intakes(["kafka:t:0:1", "kafka:t:0:2"]) == {"kafka:t:0:2"}
    # a forgotten key redelivered is mapped again and changes nothing: same facts, no new transaction
    assert not processor.ingest(parse_fhir(data, "t"), "kafka:t:0:1").duplicate
    assert len(outbox(store)) == 1


def test_the_dispatcher_is_woken_only_by_a_commit_that_queued_transactions(processor, store):
    woken: list[int] = []
    service = IngestService({"CV01": processor}, store.uow, on_outbox=lambda: woken.append(len(outbox(store))))
    data = bundle(patient(), obs("o-wt", "29463-7", 80.04, "kg", "2024-05-01T09:00:00+02:00"))
    service.ingest_batch([(data, _env(1))])
    assert woken == [1], "told once, after the row was committed (the dispatcher can read it)"
    service.ingest_batch([(data, _env(1))])  # a redelivery queues nothing
    service.ingest_batch([(b"not json", _env(2))])  # nor does a dead letter
    assert woken == [1]
