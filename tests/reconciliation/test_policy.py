"""Review-before-send: the pure policy, the map's `review:` setting, and the ingest use case wired with
the stored policies (SQLite, and PostgreSQL when ESOURCE_TEST_POSTGRES_DSN is set): adjudicated forms
are held as REVIEW_REQUIRED discrepancies until accepted, and what was decided stays decided."""

from __future__ import annotations

import pytest

from recon_helpers import ACTOR, STUDY, UNSCHEDULED, assert_valid_odm, odm_items, study_copy
from esource.domain.model import DiscrepancyKind, ItemChange, ItemKey, ItemValue, SourceRef, TransactionType
from esource.errors import StudyConfigError
from esource.reconciliation.model import DiscrepancyFilter, ReconciliationError
from esource.reconciliation.policy import hold_for_review

A = "001-0001"
VS_ITEMS = ("IT.VS.VSTESTCD", "IT.VS.VSORRES", "IT.VS.VSORRESU", "IT.VS.VSDAT", "IT.VS.VSTIM")


def change(form: str, group: str, item: str, value: str, *, event: str = "SE.BASELINE", erk: str | None = None,
           identity: str = "Observation/x", prev: str | None = None) -> ItemChange:
    key = ItemKey(STUDY, A, event, erk, form, group, "SYSBP" if form == "F.VS" else "GLUC", item)
    iv = ItemValue(key, value, SourceRef("Observation", identity.split("/")[1], "1", identity), f"{form}/rule")
    return ItemChange(iv, TransactionType.UPDATE if prev else TransactionType.INSERT, previous_value=prev)


def test_the_pure_policy_holds_adjudicated_forms_with_the_full_item_key(cv01):
    vs = change("F.VS", "IG.VS", "IT.VS.VSORRES", "120", prev="118")
    lb = change("F.LB", "IG.LB", "IT.LB.LBORRES", "99")
    assert hold_for_review(cv01, [vs, lb]) == ([vs, lb], [])  # CV01: auto everywhere
    send, held = hold_for_review(cv01, [vs, lb], {"F.VS": "adjudicate"})
    assert send == [lb]
    (d,) = held
    assert d.kind is DiscrepancyKind.REVIEW_REQUIRED and d.held_value == "120" and d.source == vs.item.source
    assert (d.study_event_oid, d.study_event_repeat_key, d.form_oid, d.item_group_oid, d.item_group_repeat_key,
            d.item_oid) == ("SE.BASELINE", None, "F.VS", "IG.VS", "SYSBP", "IT.VS.VSORRES")
    assert d.candidates[0]["previous_value"] == "118" and "'118' -> '120'" in d.message
    # one discrepancy per eCRF cell: another source for the same cell is the same discrepancy,
    # the same test on two unscheduled dates are two
    other_source = hold_for_review(cv01, [change("F.VS", "IG.VS", "IT.VS.VSORRES", "121", identity="Observation/y")],
                                   {"F.VS": "adjudicate"})[1][0]
    assert other_source.key == d.key
    day1, day2 = (hold_for_review(cv01, [change("F.VS", "IG.VS", "IT.VS.VSORRES", "1", event="SE.UNSCHED", erk=e)],
                                  {"F.VS": "adjudicate"})[1][0] for e in ("2024-06-10", "2024-06-11"))
    assert day1.key != day2.key


def test_the_map_says_review_per_form_and_refuses_anything_else(tmp_path):
    study = study_copy(tmp_path / "ok", lambda t: t.replace("  F.LB:\n    template: LB\n",
                                                           "  F.LB:\n    template: LB\n    review: adjudicate\n"))
    assert (study.review_mode("F.LB"), study.review_mode("F.VS"), study.review_mode("F.XX")) == (
        "adjudicate", "auto", "auto")
    with pytest.raises(StudyConfigError) as err:
        study_copy(tmp_path / "bad", lambda t: t.replace("  F.LB:\n    template: LB\n",
                                                        "  F.LB:\n    template: LB\n    review: sometimes\n"))
    assert "forms.F.LB.review" in str(err.value)


def adjudicate_vs(recon) -> None:
    recon.set_review_policy(STUDY, {"F.VS": "adjudicate"}, actor=ACTOR, reason="VS double-checked in this study")


def vs_key(test: str, item: str, *, event: str = "SE.BASELINE", erk: str | None = None) -> ItemKey:
    return ItemKey(STUDY, A, event, erk, "F.VS", "IG.VS", test, item)


def test_adjudicated_values_wait_for_approval_then_go_and_stay_decided(feeder, recon):
    adjudicate_vs(recon)
    policy = recon.review_policy(STUDY)
    vs = next(f for f in policy["forms"] if f["form_oid"] == "F.VS")
    assert (vs["mode"], vs["map_mode"], vs["source"], vs["changed_by"]) == ("adjudicate", "auto", "override", ACTOR)
    (changed,) = feeder.audit("config.changed")
    assert (changed.event.old_value, changed.event.new_value, changed.event.detail["form_oid"]) == (
        "map:auto", "adjudicate", "F.VS")
    feeder.ingest(A, feeder.weight(A, 70), feeder.sysbp(A, 120))
    # DM (auto) went; every VS item is held, one discrepancy each, nothing of VS in the state or the outbox
    (row,) = feeder.outbox()
    assert {p.split("/")[1] for p in odm_items(row.odm)} == {"F.DM"}
    held = feeder.queue(kinds=("review_required",))
    assert len(held) == 10 and {r.discrepancy.item_oid for r in held} == set(VS_ITEMS)
    assert not any(k.form_oid == "F.VS" for k in feeder.state(A))
    # a data manager approves the form in bulk: one transaction with every VS item
    result = recon.bulk(DiscrepancyFilter(STUDY, kinds=("review_required",), form_oid="F.VS"), "accept",
                        actor=ACTOR, reason="reviewed against the source")
    assert (result.matched, result.succeeded) == (10, 10)
    (tx,) = [e for e in feeder.outbox() if e.id != row.id]
    assert tx.item_count == 10 and {r.outbox_id for r in result.results} == {tx.id}
    assert_valid_odm(tx.odm)
    assert odm_items(tx.odm)["SE.BASELINE/F.VS/IG.VS[SYSBP]/IT.VS.VSORRES"] == ("Insert", "120")
    assert feeder.state(A)[vs_key("WEIGHT", "IT.VS.VSORRES")].value == "70.0"
    # the same facts again: nothing held again, nothing sent again
    rows = len(feeder.outbox())
    feeder.ingest(A, feeder.weight(A, 70), feeder.sysbp(A, 120))
    assert len(feeder.outbox()) == rows
    assert {r.status for r in feeder.queue(kinds=("review_required",))} == {"resolved"}
    # a new version changes the weight: that cell is held again (the same discrepancy, re-opened)
    weight = next(r for r in held if r.discrepancy.item_group_repeat_key == "WEIGHT"
                  and r.discrepancy.item_oid == "IT.VS.VSORRES")
    feeder.ingest(A, feeder.weight(A, 71, version=2), feeder.sysbp(A, 120))
    assert len(feeder.outbox()) == rows
    again = feeder.queue(ids=(weight.id,))[0]
    assert (again.status, again.discrepancy.held_value) == ("open", "71.0")
    assert [r.id for r in feeder.queue(kinds=("review_required",), statuses=("open",))] == [weight.id]
    recon.accept(STUDY, weight.id, actor=ACTOR, reason="weighed again")
    last = feeder.outbox()[-1]
    assert odm_items(last.odm) == {"SE.BASELINE/F.VS/IG.VS[WEIGHT]/IT.VS.VSORRES": ("Update", "71.0")}


def test_dismissed_and_overridden_holds_stay_so_while_the_facts_do(feeder, recon):
    adjudicate_vs(recon)
    feeder.ingest(A, feeder.weight(A, 70))
    result = feeder.queue(kinds=("review_required",), item_oid="IT.VS.VSORRES")[0]
    time = feeder.queue(kinds=("review_required",), item_oid="IT.VS.VSTIM")[0]
    recon.override(STUDY, result.id, actor=ACTOR, reason="scale miscalibrated", value="69.5")
    recon.dismiss(STUDY, time.id, actor=ACTOR, reason="time not collected at this site")
    assert odm_items(feeder.outbox()[-1].odm) == {"SE.BASELINE/F.VS/IG.VS[WEIGHT]/IT.VS.VSORRES": ("Insert", "69.5")}
    rows = len(feeder.outbox())
    feeder.ingest(A, feeder.weight(A, 70))
    assert len(feeder.outbox()) == rows  # the map's 70.0 is held again, silently: the decision stands
    assert [feeder.queue(ids=(i,))[0].status for i in (result.id, time.id)] == ["resolved", "dismissed"]
    assert feeder.state(A)[vs_key("WEIGHT", "IT.VS.VSORRES")].value == "69.5"


def test_a_hold_is_not_accepted_once_the_source_moved_on(feeder, recon):
    adjudicate_vs(recon)
    feeder.ingest(A, feeder.weight(A, 70))
    rec = feeder.queue(kinds=("review_required",), item_oid="IT.VS.VSORRES")[0]
    from esource.domain.ports import StoredFact

    with feeder.store.uow() as uow:  # a newer version is stored, its message not yet re-mapped
        fact = next(f for f in uow.facts(STUDY, A) if f.resource_id == f"wt-{A}")
        newer = dict(fact.resource, valueQuantity={**fact.resource["valueQuantity"], "value": 72})
        uow.upsert_fact(STUDY, A, StoredFact(fact.identity, fact.resource_type, fact.resource_id, "2", fact.full_url,
                                             newer, fact.first_seen))
        uow.commit()
    with pytest.raises(ReconciliationError, match="no longer produces"):
        recon.accept(STUDY, rec.id, actor=ACTOR, reason="ok")


def test_an_unscheduled_hold_carries_its_repeat_key_and_accept_sends_it(feeder, recon):
    adjudicate_vs(recon)
    feeder.ingest(A, feeder.sysbp(A, 118, when=UNSCHEDULED))
    rec = feeder.queue(kinds=("review_required",), item_oid="IT.VS.VSORRES")[0]
    assert (rec.discrepancy.study_event_oid, rec.discrepancy.study_event_repeat_key) == ("SE.UNSCHED", "2024-06-10")
    recon.accept(STUDY, rec.id, actor=ACTOR, reason="ok")
    row = feeder.outbox()[-1]
    assert_valid_odm(row.odm)
    assert odm_items(row.odm) == {"SE.UNSCHED[2024-06-10]/F.VS/IG.VS[SYSBP]/IT.VS.VSORRES": ("Insert", "118")}


def test_back_to_auto_the_next_message_sends_and_a_remap_closes_the_holds(feeder, recon):
    adjudicate_vs(recon)
    feeder.ingest(A, feeder.weight(A, 70))
    holds = [r.id for r in feeder.queue(kinds=("review_required",))]
    assert len(holds) == 5
    recon.set_review_policy(STUDY, {"F.VS": None}, actor=ACTOR, reason="back to the map's setting")
    assert all(f["source"] == "map" for f in recon.review_policy(STUDY)["forms"])
    results = recon.remap(STUDY, holds, actor=ACTOR, reason="policy changed")
    assert all(r.ok for r in results)
    assert {r.resolution for r in feeder.queue(kinds=("review_required",))} == {"remapped"}
    assert feeder.state(A)[vs_key("WEIGHT", "IT.VS.VSORRES")].value == "70.0"
    assert odm_items(feeder.outbox()[-1].odm)["SE.BASELINE/F.VS/IG.VS[WEIGHT]/IT.VS.VSORRES"] == ("Insert", "70.0")
