"""Decisions on frozen items (SQLite, and PostgreSQL when ESOURCE_TEST_POSTGRES_DSN is set): an EDC
conflict settled against the sandbox EDC on loopback (accept sends esource's value over the site's as an
Update the dispatcher's conflict check lets through; override keeps the item frozen), and a retracted
(entered-in-error) source whose frozen values are removed or corrected by a data manager."""

from __future__ import annotations

import pytest

from recon_helpers import ACTOR, STUDY, assert_valid_odm, deliver, odm_items, reasons_for_change, site_edit
from esource.domain.model import ItemKey
from esource.reconciliation.model import InvalidDecision
from esource.reconciliation.report import reconcile

A = "001-0001"
WEIGHT = "SE.BASELINE/F.VS/IG.VS[WEIGHT]/IT.VS.VSORRES"
WEIGHT_KEY = ItemKey(STUDY, A, "SE.BASELINE", None, "F.VS", "IG.VS", "WEIGHT", "IT.VS.VSORRES")


def conflict(feeder, store, clock, sandbox, connector):
    """Weight 70 delivered, changed to 75.0 by the site, then a new source version (71) withheld."""
    feeder.ingest(A, feeder.weight(A, 70))
    deliver(store, connector, clock)
    site_edit(sandbox, A, WEIGHT, "75.0")
    feeder.ingest(A, feeder.weight(A, 71, version=2))
    assert deliver(store, connector, clock).conflicts == 1
    assert feeder.state(A)[WEIGHT_KEY].frozen
    return feeder.one("edc_conflict")


def edc_value(store, connector, clock) -> str | None:
    report = reconcile(store.uow, connector, STUDY, subject=A, clock=clock)
    return next(i for i in report.items() if i.path == WEIGHT).edc_value


def test_accepting_a_conflict_sends_esources_value_over_the_sites_and_unfreezes(feeder, recon, store, clock, sandbox,
                                                                                 connector):
    rec = conflict(feeder, store, clock, sandbox, connector)
    assert rec.discrepancy.held_value == "71.0"
    detail = recon.detail(STUDY, rec.id)
    assert detail["edc"]["value"] == "75.0" and detail["proposed"]["value"] == "71.0" and detail["sent"]["frozen"]
    result = recon.accept(STUDY, rec.id, actor=ACTOR, reason="the EHR value is right; site informed")
    row = feeder.outbox()[-1]
    assert_valid_odm(row.odm)
    assert odm_items(row.odm) == {WEIGHT: ("Update", "71.0")}
    assert row.previous_values == {WEIGHT: "75.0"}  # what the EDC holds: the conflict check lets it through
    assert result.resolution == "accepted" and not feeder.state(A)[WEIGHT_KEY].frozen
    deliver(store, connector, clock)
    assert edc_value(store, connector, clock) == "71.0"
    # later source changes flow again
    feeder.ingest(A, feeder.weight(A, 72, version=3))
    deliver(store, connector, clock)
    assert edc_value(store, connector, clock) == "72.0"


def test_overriding_a_conflict_sends_the_decided_value_and_keeps_the_item_frozen(feeder, recon, store, clock, sandbox,
                                                                                  connector):
    rec = conflict(feeder, store, clock, sandbox, connector)
    with pytest.raises(InvalidDecision, match="not IT.VS.VSDAT"):
        recon.override(STUDY, rec.id, actor=ACTOR, reason="x", value="2024-05-01", item_oid="IT.VS.VSDAT")
    recon.override(STUDY, rec.id, actor=ACTOR, reason="re-weighed at the site visit", value="74.0")
    assert feeder.state(A)[WEIGHT_KEY].frozen and feeder.state(A)[WEIGHT_KEY].value == "74.0"
    deliver(store, connector, clock)
    assert edc_value(store, connector, clock) == "74.0"
    rows = len(feeder.outbox())
    feeder.ingest(A, feeder.weight(A, 71, version=2))  # the same facts: nothing goes over the decision
    assert len(feeder.outbox()) == rows


def test_dismissing_a_conflict_leaves_the_sites_value(feeder, recon, store, clock, sandbox, connector):
    rec = conflict(feeder, store, clock, sandbox, connector)
    recon.dismiss(STUDY, rec.id, actor=ACTOR, reason="the site's value is the right one")
    deliver(store, connector, clock)
    assert edc_value(store, connector, clock) == "75.0" and feeder.state(A)[WEIGHT_KEY].frozen


def retracted(feeder):
    feeder.ingest(A, feeder.weight(A, 70))
    wrong = dict(feeder.weight(A, 70, version=2), status="entered-in-error")
    feeder.ingest(A, wrong)
    assert all(s.frozen for k, s in feeder.state(A).items() if k.item_group_repeat_key == "WEIGHT")
    return feeder.one("entered_in_error")


def test_accepting_a_retraction_without_a_replacement_removes_the_values(feeder, recon):
    rec = retracted(feeder)
    result = recon.accept(STUDY, rec.id, actor=ACTOR, reason="the weighing never happened")
    row = feeder.outbox()[-1]
    assert_valid_odm(row.odm)
    items = odm_items(row.odm)
    assert items[WEIGHT] == ("Remove", None) and {t for t, _ in items.values()} == {"Remove"} and len(items) == 5
    assert "Data manager decision (accepted)" in reasons_for_change(row.odm)[0]
    assert not any(k.item_group_repeat_key == "WEIGHT" for k in feeder.state(A))
    assert "IT.VS.VSORRES: removed" in (feeder.one("entered_in_error").resolution_value or "")
    assert result.outbox_id == row.id
    rows = len(feeder.outbox())
    feeder.ingest(A, dict(feeder.weight(A, 70, version=2), status="entered-in-error"))
    assert len(feeder.outbox()) == rows and feeder.one("entered_in_error").status == "resolved"
    # a new, valid weighing later is a new value: an Insert
    feeder.ingest(A, feeder.obs(A, "wt-2", "29463-7", 69, "kg"))
    assert odm_items(feeder.outbox()[-1].odm)[WEIGHT] == ("Insert", "69.0")


def test_overriding_one_frozen_item_of_a_retraction(feeder, recon):
    rec = retracted(feeder)
    with pytest.raises(InvalidDecision, match="which item"):
        recon.override(STUDY, rec.id, actor=ACTOR, reason="x", value="69.0")
    with pytest.raises(InvalidDecision, match="not one of the frozen items"):
        recon.override(STUDY, rec.id, actor=ACTOR, reason="x", value="69.0", item_oid="IT.LB.LBORRES")
    recon.override(STUDY, rec.id, actor=ACTOR, reason="value from the paper record", value="69.0",
                   item_oid="IT.VS.VSORRES")
    assert odm_items(feeder.outbox()[-1].odm) == {WEIGHT: ("Update", "69.0")}
    assert feeder.state(A)[WEIGHT_KEY].value == "69.0" and feeder.state(A)[WEIGHT_KEY].frozen
