"""Lineage of an eCRF value mapped through the real Processor from the CV01 demo data, delivered by the
real Dispatcher to a fake EDC: sources and versions, map rule, conversions, transactions, the EDC's
acknowledgement or rejection — and the dispatcher's transfer audit entries."""

from __future__ import annotations

import pytest
from audit_helpers import (
    ARLA,
    ARLA_SITE,
    ARLA_SUBJECT,
    ARLA_WEIGHT_AMENDED,
    PSEUDONYM_KEY,
    WEIGHT,
    WEIGHT_OBSERVATION,
    FakeEdc,
    demo_processor,
    ingest_file,
)

from esource.audit.lineage import item_lineage, subject_items
from esource.audit.verify import verify_chain
from esource.domain.audit import AuditAction
from esource.domain.model import ItemKey, SourceRef
from esource.privacy import Pseudonymizer
from esource.services.dispatch import Dispatcher

PSEUDO = Pseudonymizer(PSEUDONYM_KEY)


def dispatcher(store, processor, edc: FakeEdc, **kw) -> Dispatcher:
    return Dispatcher(store.uow, {"CV01": edc}, {"CV01": processor.study.metadata_version_oid}, workers=1,
                      sleep=lambda _s: None, **kw)


@pytest.fixture
def processor(store, clock):
    return demo_processor(store, clock)


def lineage(store, key: ItemKey = WEIGHT):
    with store.uow(read_only=True) as uow:
        return item_lineage(uow, key, PSEUDO)


def test_lineage_of_a_value_mapped_sent_updated_and_acknowledged(store, clock, processor):
    ingest_file(processor, ARLA)
    clock.advance(minutes=1)
    assert dispatcher(store, processor, FakeEdc("ack")).drain().sent == 1
    clock.advance(days=1)
    ingest_file(processor, ARLA_WEIGHT_AMENDED)  # version 2 of the baseline weight Observation
    clock.advance(minutes=1)
    assert dispatcher(store, processor, FakeEdc("sent")).drain().sent == 1

    lin = lineage(store)
    assert lin is not None
    assert (lin.value, lin.frozen, lin.rule, lin.site_oid) == ("78.9", False, "F.VS/WEIGHT/result", ARLA_SITE)
    # sources: both versions of the Observation, oldest first, with the pseudonymous SourceID the EDC got
    assert [(s.resource_type, s.id, s.version) for s in lin.sources] == [
        ("Observation", WEIGHT_OBSERVATION, lin.sources[0].version), ("Observation", WEIGHT_OBSERVATION, "2")]
    assert lin.sources[0].version.startswith("sha256:")
    assert lin.source.version == "2" and lin.source.latest_version == "2"
    assert lin.source.first_seen == lin.sources[0].first_seen is not None
    assert lin.source.source_id == PSEUDO.source_id(SourceRef("Observation", WEIGHT_OBSERVATION, "2", "x"))
    # transactions: the Insert (acknowledged with the EDC's reference), then the Update (sent)
    t1, t2 = lin.transfers
    assert (t1.sequence, t1.transaction_type, t1.value, t1.status) == (1, "Insert", "78.4", "acked")
    assert (t1.edc_reference, t1.connector) == (f"REF-{ARLA_SUBJECT}-1", "fake-edc")
    assert (t2.sequence, t2.transaction_type, t2.value, t2.status, t2.edc_reference) == (2, "Update", "78.9", "sent",
                                                                                         None)
    # history: mapped, queued, sent, acknowledged; mapped again (Update, old -> new), queued, sent
    actions = [s.action for s in lin.history]
    assert actions == ["value.mapped", "transfer.queued", "transfer.sent", "transfer.acknowledged",
                       "value.mapped", "transfer.queued", "transfer.sent"]
    first, update = lin.history[0], lin.history[4]
    assert first.conversions == ("rounded half-up to 1 decimal(s): 78.4",)
    assert lin.history[0].rule == "F.VS/WEIGHT/result"
    assert (update.old_value, update.new_value, update.transaction_type) == ("78.4", "78.9", "Update")
    assert update.outbox_id == t2.outbox_id and update.sequence == 2
    assert lin.manual_actions == [] and lin.open_discrepancies == []
    assert verify_chain(store).intact


def test_a_rejection_shows_in_the_lineage_with_the_vendor_code(store, clock, processor):
    ingest_file(processor, ARLA)
    report = dispatcher(store, processor, FakeEdc("reject")).drain()
    assert report.rejected == 1
    (t,) = lineage(store).transfers
    assert (t.status, t.edc_code, t.edc_message) == ("rejected", "E-042", "form locked")
    with store.uow(read_only=True) as uow:
        (entry,), _ = uow.audit_entries(actions=["transfer.rejected"])
    assert entry.event.detail == {"outbox_id": t.outbox_id, "sequence": 1, "connector": "fake-edc",
                                  "code": "E-042", "message": "form locked", "attempts": 1}
    assert entry.event.reason == "E-042: form locked"
    assert (entry.event.subject_key, entry.event.site_oid) == (ARLA_SUBJECT, ARLA_SITE)


def test_retries_exhausted_are_audited_as_transfer_failed(store, clock, processor):
    ingest_file(processor, ARLA)
    report = dispatcher(store, processor, FakeEdc("fail"), max_attempts=2).drain()
    assert report.failed == 1
    with store.uow(read_only=True) as uow:
        entries, _ = uow.audit_entries(actions=[a.value for a in AuditAction if a.value.startswith("transfer.")])
    failed = [e for e in entries if e.event.action is AuditAction.TRANSFER_FAILED]
    assert len(failed) == 1 and failed[0].event.detail["attempts"] == 2
    assert "EDC unreachable" in failed[0].event.reason
    assert not any(e.event.action is AuditAction.TRANSFER_SENT for e in entries)
    (t,) = lineage(store).transfers
    assert t.status == "failed" and t.attempts == 2


def test_unknown_items_have_no_lineage(store, processor):
    ingest_file(processor, ARLA)
    assert lineage(store, ItemKey("CV01", ARLA_SUBJECT, "SE.WEEK52", None, "F.VS", "IG.VS", "WEIGHT",
                                  "IT.VS.VSORRES")) is None


def test_subject_items_list_every_item_with_its_state(store, clock, processor):
    ingest_file(processor, ARLA)
    dispatcher(store, processor, FakeEdc("ack")).drain()
    with store.uow(read_only=True) as uow:
        items = subject_items(uow, "CV01", ARLA_SUBJECT, PSEUDO)
        states = uow.sent_items("CV01", ARLA_SUBJECT)
    assert len(items) == len(states) > 50
    weight = next(i for i in items if i.key == WEIGHT)
    assert (weight.value, weight.rule, weight.sequence, weight.transfer_status) == ("78.4", "F.VS/WEIGHT/result", 1,
                                                                                    "acked")
    assert weight.source.id == WEIGHT_OBSERVATION
    # a Patient source (sex, birth year) never shows its id
    assert all(i.source.id is None for i in items if i.source.resource_type == "Patient")
    assert any(i.source.resource_type == "Patient" for i in items)
