"""Each reconciliation action end to end on a real store (SQLite, and PostgreSQL when
ESOURCE_TEST_POSTGRES_DSN is set): discrepancies made by the real ingest use case, the decision, the
item state, the outbox transaction it queues (XSD-valid ODM with a ReasonForChange naming the decision)
and the audit trail; then the next message with the same facts, which must not re-open anything."""

from __future__ import annotations

import pytest

from recon_helpers import ACTOR, STUDY, UNSCHEDULED, assert_valid_odm, odm_items, reasons_for_change, \
    reconciliation, study_copy
from esource.domain.model import ItemKey
from esource.reconciliation.model import DiscrepancyFilter, DiscrepancyStateError, InvalidDecision, \
    ReconciliationError
from esource.services.dispatch import Dispatcher

A, B = "001-0001", "002-0001"
SYSBP = "SE.BASELINE/F.VS/IG.VS[SYSBP]/"
SYSBP_KEY = ItemKey(STUDY, A, "SE.BASELINE", None, "F.VS", "IG.VS", "SYSBP", "IT.VS.VSORRES")


def held_sysbp(feeder, value: float = 300, subject: str = A):
    feeder.ingest(subject, feeder.sysbp(subject, value), feeder.weight(subject, 70))
    return feeder.one("out_of_range", subject_keys=(subject,))


def test_accept_sends_the_held_value_with_its_item_group_and_the_same_facts_do_not_reopen_it(feeder, recon, clock):
    rec = held_sysbp(feeder)
    assert SYSBP_KEY not in feeder.state(A)  # held: never sent
    rows_before = len(feeder.outbox())
    clock.advance(hours=2)
    result = recon.accept(STUDY, rec.id, actor=ACTOR, reason="confirmed with the site: a real reading")
    assert result.ok and result.status == "resolved" and result.resolution == "accepted"
    # one new outbox transaction: the whole SYSBP item group, Inserts, XSD-valid, the decision named
    (row,) = feeder.outbox()[rows_before:]
    assert (row.id, row.sequence) == (result.outbox_id, result.sequence) and row.status == "pending"
    assert_valid_odm(row.odm)
    assert odm_items(row.odm) == {SYSBP + "IT.VS.VSTESTCD": ("Insert", "SYSBP"),
                                  SYSBP + "IT.VS.VSORRES": ("Insert", "300"),
                                  SYSBP + "IT.VS.VSORRESU": ("Insert", "mmHg"),
                                  SYSBP + "IT.VS.VSDAT": ("Insert", "2024-05-01"),
                                  SYSBP + "IT.VS.VSTIM": ("Insert", "09:00")}
    assert set(reasons_for_change(row.odm)) == {
        (f"Data manager decision (accepted) by {ACTOR} on discrepancy #{rec.id} (out_of_range): "
         "confirmed with the site: a real reading")}
    assert b"bp-001-0001" not in row.odm  # the source only by its pseudonym
    # the item state holds what was sent; the discrepancy records who, when, why and what
    assert feeder.state(A)[SYSBP_KEY].value == "300" and not feeder.state(A)[SYSBP_KEY].frozen
    after = feeder.one("out_of_range")
    assert (after.status, after.resolution, after.resolved_by, after.resolution_value) == ("resolved", "accepted",
                                                                                          ACTOR, "300")
    assert after.resolution_reason == "confirmed with the site: a real reading" and after.resolved_at == clock.now()
    audited = feeder.audit()
    resolved = [e for e in audited if e.event.action.value == "discrepancy.resolved"]
    assert len(resolved) == 1 and resolved[0].event.actor == ACTOR and resolved[0].event.reason.startswith("confirmed")
    mapped = [e for e in audited if e.event.action.value == "value.mapped" and e.event.actor == ACTOR]
    assert {e.event.item.item_oid for e in mapped} == {"IT.VS.VSTESTCD", "IT.VS.VSORRES", "IT.VS.VSORRESU",
                                                      "IT.VS.VSDAT", "IT.VS.VSTIM"}
    assert all(e.event.detail["decision"] == "accepted" for e in mapped)
    # the next message with the same facts: nothing re-opened, nothing sent again
    rows = len(feeder.outbox())
    feeder.ingest(A, feeder.sysbp(A, 300), feeder.weight(A, 70))
    assert len(feeder.outbox()) == rows and feeder.one("out_of_range").status == "resolved"
    # accepting again is refused: it is closed
    with pytest.raises(DiscrepancyStateError):
        recon.accept(STUDY, rec.id, actor=ACTOR, reason="twice")


def test_changed_facts_reopen_an_accepted_discrepancy(feeder, recon):
    rec = held_sysbp(feeder)
    recon.accept(STUDY, rec.id, actor=ACTOR, reason="real")
    feeder.ingest(A, feeder.sysbp(A, 310, version=2), feeder.weight(A, 70))  # corrected, still out of range
    again = feeder.one("out_of_range")
    assert again.id == rec.id and (again.status, again.resolution) == ("open", None)
    assert again.discrepancy.held_value == "310"
    # an in-range correction is simply sent as an Update over the accepted value
    feeder.ingest(A, feeder.sysbp(A, 150, version=3), feeder.weight(A, 70))
    last = feeder.outbox()[-1]
    assert odm_items(last.odm)[SYSBP + "IT.VS.VSORRES"] == ("Update", "150")


def test_accept_is_refused_when_the_map_no_longer_holds_that_value(feeder, recon):
    rec = held_sysbp(feeder)
    # the source changed, but the queue still shows the old value (a message not processed yet)
    from esource.domain.ports import StoredFact

    with feeder.store.uow() as uow:
        fact = next(f for f in uow.facts(STUDY, A) if f.resource_id == f"bp-{A}")
        changed = dict(fact.resource, valueQuantity={**fact.resource["valueQuantity"], "value": 320},
                       meta={"versionId": "2"})
        uow.upsert_fact(STUDY, A, StoredFact(fact.identity, fact.resource_type, fact.resource_id, "2", fact.full_url,
                                             changed, fact.first_seen))
        uow.commit()
    with pytest.raises(ReconciliationError, match="no longer holds"):
        recon.accept(STUDY, rec.id, actor=ACTOR, reason="too late")
    assert feeder.one("out_of_range").status == "open"


def test_override_is_validated_against_the_metadata_and_sent(feeder, recon):
    rec = held_sysbp(feeder)
    for bad, why in (("abc", "not a valid float"), ("250.0", "exactly 0 decimal"), ("123456789", "Length"),
                     ("", "required")):
        with pytest.raises(InvalidDecision, match=why):
            recon.override(STUDY, rec.id, actor=ACTOR, reason="typo", value=bad)
    with pytest.raises(InvalidDecision, match="reason"):
        recon.override(STUDY, rec.id, actor=ACTOR, reason="  ", value="250")
    result = recon.override(STUDY, rec.id, actor=ACTOR, reason="unit typo in the EHR", value="130")
    assert result.ok and result.resolution == "overridden"
    row = feeder.outbox()[-1]
    assert_valid_odm(row.odm)
    items = odm_items(row.odm)
    assert items[SYSBP + "IT.VS.VSORRES"] == ("Insert", "130") and items[SYSBP + "IT.VS.VSTESTCD"] == ("Insert", "SYSBP")
    assert "Data manager decision (overridden)" in reasons_for_change(row.odm)[0]
    assert feeder.state(A)[SYSBP_KEY].value == "130" and feeder.state(A)[SYSBP_KEY].rule == "manual:override"
    assert feeder.one("out_of_range").resolution_value == "130"
    rows = len(feeder.outbox())
    feeder.ingest(A, feeder.sysbp(A, 300), feeder.weight(A, 70))  # same facts: stays overridden, nothing sent
    assert len(feeder.outbox()) == rows and feeder.one("out_of_range").status == "resolved"


def test_override_of_an_unknown_gender_writes_sex_in_dm_after_the_codelist_check(feeder, recon):
    feeder.ingest(A, feeder.weight(A, 70), gender="other")
    rec = feeder.one("unknown_gender")
    with pytest.raises(ReconciliationError, match="nothing is held"):
        recon.accept(STUDY, rec.id, actor=ACTOR, reason="?")
    with pytest.raises(InvalidDecision, match="codelist"):
        recon.override(STUDY, rec.id, actor=ACTOR, reason="asked the site", value="X")
    result = recon.override(STUDY, rec.id, actor=ACTOR, reason="asked the site", value="U")
    row = feeder.outbox()[-1]
    assert_valid_odm(row.odm)
    assert odm_items(row.odm) == {"SE.SCREEN/F.DM/IG.DM/IT.DM.SEX": ("Insert", "U")}
    assert result.status == "resolved"


def test_dismiss_needs_a_reason_sends_nothing_and_stays_dismissed(feeder, recon):
    rec = held_sysbp(feeder)
    rows = len(feeder.outbox())
    with pytest.raises(InvalidDecision):
        recon.dismiss(STUDY, rec.id, actor=ACTOR, reason="")
    result = recon.dismiss(STUDY, rec.id, actor=ACTOR, reason="artefact: cuff error")
    assert (result.status, result.resolution) == ("dismissed", "dismissed")
    assert len(feeder.outbox()) == rows and SYSBP_KEY not in feeder.state(A)
    feeder.ingest(A, feeder.sysbp(A, 300), feeder.weight(A, 70))
    assert feeder.one("out_of_range").status == "dismissed"
    assert [e.event.reason for e in feeder.audit("discrepancy.dismissed")] == ["artefact: cuff error"]


def test_assign_and_review(feeder, recon):
    rec = held_sysbp(feeder)
    assert recon.assign(STUDY, rec.id, actor=ACTOR, reason="lab specialist", assignee="dm2").status == "open"
    assert feeder.queue(assignee="dm2")[0].id == rec.id
    result = recon.start_review(STUDY, rec.id, actor=ACTOR, reason="looking at it")
    assert result.status == "in_review" and feeder.one("out_of_range").assignee == "dm2"
    assert recon.assign(STUDY, rec.id, actor=ACTOR, reason="back to the pool", assignee=None).status == "in_review"
    assert feeder.queue(unassigned=True)[0].id == rec.id
    changed = feeder.audit("discrepancy.changed")
    assert [e.event.detail["assignee"] for e in changed] == ["dm2", "dm2", None]
    # in review, a decision still applies
    assert recon.dismiss(STUDY, rec.id, actor=ACTOR, reason="cuff error").status == "dismissed"


def test_accepting_an_unscheduled_reading_derives_the_event_repeat_key_from_the_reading(feeder, recon):
    feeder.ingest(A, feeder.sysbp(A, 300, when=UNSCHEDULED))
    rec = feeder.one("out_of_range")
    assert rec.discrepancy.study_event_oid == "SE.UNSCHED" and rec.discrepancy.study_event_repeat_key is None
    recon.accept(STUDY, rec.id, actor=ACTOR, reason="real")
    row = feeder.outbox()[-1]
    assert_valid_odm(row.odm)
    assert odm_items(row.odm)["SE.UNSCHED[2024-06-10]/F.VS/IG.VS[SYSBP]/IT.VS.VSORRES"] == ("Insert", "300")


class RejectingEdc:
    """An EDC that refuses the first `rejections` transactions for good, then accepts everything."""

    def __init__(self, rejections: int) -> None:
        self.rejections = rejections
        self.received: list[tuple[str, int]] = []

    def capabilities(self):
        from esource.domain.ports import ConnectorCapabilities

        return ConnectorCapabilities("rejecting", read_back=False, idempotency_key=True, integer_repeat_keys=False)

    def send(self, tx, odm):
        from esource.domain.ports import DeliveryReceipt

        if self.rejections:
            self.rejections -= 1
            return DeliveryReceipt(False, permanent=True, code="FORM_LOCKED", message="the form is locked")
        self.received.append((tx.subject_key, tx.sequence))
        return DeliveryReceipt(True, reference=f"R-{tx.sequence}")

    def read_back(self, study_oid, subject_key):
        return None


def test_repush_puts_every_rejected_row_back_in_sequence_order(feeder, recon, store, clock):
    edc = RejectingEdc(rejections=1)
    dispatcher = Dispatcher(store.uow, {STUDY: edc}, {STUDY: "MDV.CV01.1"}, workers=1, clock=clock,
                            sleep=lambda s: clock.advance(seconds=s))
    feeder.ingest(A, feeder.weight(A, 70))
    assert dispatcher.drain().rejected == 1
    feeder.ingest(A, feeder.weight(A, 71, version=2))  # held behind the rejected row
    assert dispatcher.drain().sent == 0
    rec = feeder.one("edc_rejected")
    for other in ("accept", "remap"):
        with pytest.raises(ReconciliationError):
            recon.act(STUDY, rec.id, other, actor=ACTOR, reason="x")
    result = recon.repush(STUDY, rec.id, actor=ACTOR, reason="the site unlocked the form")
    assert result.ok and result.resolution == "repushed"
    assert [e.status for e in feeder.outbox()] == ["pending", "pending"]
    assert [e.event.detail["outbox_id"] for e in feeder.audit("transfer.repushed")] == [result.outbox_id]
    assert dispatcher.drain().sent == 2 and edc.received == [(A, 1), (A, 2)]
    assert feeder.one("edc_rejected").status == "resolved"
    # a later rejection re-opens it (the dispatcher's rule)
    edc.rejections = 1
    feeder.ingest(A, feeder.weight(A, 72, version=3))
    dispatcher.drain()
    assert feeder.one("edc_rejected").status == "open"
    with pytest.raises(ReconciliationError, match="re-push applies"):
        recon.repush(STUDY, held_sysbp(feeder, subject=B).id, actor=ACTOR, reason="x")


def test_remap_after_a_map_change_resolves_what_the_map_no_longer_reports(feeder, store, clock, tmp_path):
    # a unit the map does not know yet, and an out-of-range value no map change will fix
    feeder.ingest(A, feeder.obs(A, "hr-1", "8867-4", 72, "beats per minute", ucum=False), feeder.sysbp(A, 300))
    unknown = feeder.one("unknown_unit")
    held = feeder.one("out_of_range")
    changed = study_copy(tmp_path, lambda text: text.replace("    bpm: /min\n", "    bpm: /min\n"
                                                             "    beats per minute: /min\n"))
    from esource.mapping.engine import MappingEngine
    from esource.services.process import Processor

    processor = Processor(changed, MappingEngine(changed), store.uow, feeder.processor.pseudonymizer, clock)
    recon = reconciliation(feeder, study=changed, processor=processor)
    results = recon.remap(STUDY, [unknown.id, held.id], actor=ACTOR, reason="unit synonym added to the map")
    assert [(r.ok, r.status) for r in results] == [(True, "resolved"), (False, "open")]
    assert feeder.one("unknown_unit").resolution == "remapped"
    row = feeder.outbox()[-1]
    assert_valid_odm(row.odm)
    assert odm_items(row.odm)["SE.BASELINE/F.VS/IG.VS[HR]/IT.VS.VSORRES"] == ("Insert", "72")


def test_bulk_acts_per_discrepancy_and_reports_each_outcome(feeder, recon):
    held_sysbp(feeder, subject=A)
    held_sysbp(feeder, subject=B)
    feeder.ingest(A, feeder.weight(A, 70), gender="other")
    first = recon.bulk(DiscrepancyFilter(STUDY, kinds=("out_of_range",), site_oids=("SITE.002",)), "dismiss",
                       actor=ACTOR, reason="site 2 cuffs were broken")
    assert (first.matched, first.succeeded, first.failed) == (1, 1, 0)
    # accept on both kinds: the held value goes, the unknown gender has nothing held (per-item failure)
    result = recon.bulk(DiscrepancyFilter(STUDY, subject_keys=(A,)), "accept", actor=ACTOR, reason="confirmed")
    by_kind = {feeder.queue(ids=(r.discrepancy_id,))[0].kind.value: r for r in result.results}
    assert result.matched == 2 and (result.succeeded, result.failed) == (1, 1)
    assert by_kind["out_of_range"].ok and not by_kind["unknown_gender"].ok
    assert "nothing is held" in by_kind["unknown_gender"].message
    # closed ones are not matched again; too many is refused
    assert recon.bulk(DiscrepancyFilter(STUDY, kinds=("out_of_range",)), "accept", actor=ACTOR,
                      reason="again").matched == 0
    with pytest.raises(InvalidDecision, match="narrow"):
        recon.bulk(DiscrepancyFilter(STUDY), "dismiss", actor=ACTOR, reason="all", limit=0)
    with pytest.raises(InvalidDecision, match="unknown action"):
        recon.bulk(DiscrepancyFilter(STUDY), "delete", actor=ACTOR, reason="x")
