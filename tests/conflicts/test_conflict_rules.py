"""The conflict rules on their own (esource/services/conflicts.py): item paths, which Updated items
conflict with the EDC, withholding ItemData from an ODM transaction, and the discrepancies."""

from __future__ import annotations

import datetime as dt

import pytest

from esource.domain.model import (
    DiscrepancyKind,
    ItemChange,
    ItemKey,
    ItemValue,
    Severity,
    SourceRef,
    SubjectTransaction,
    TransactionType,
)
from esource.domain.ports import SentItem
from esource.errors import IntakeError
from esource.odm.writer import write_clinical_data
from esource.odm.xsd import validate_odm
from esource.privacy import Pseudonymizer
from esource.services.conflicts import (
    Conflict,
    conflict_discrepancy,
    conflict_followups,
    edc_values,
    find_conflicts,
    item_path,
    key_path,
    odm_items,
    previous_values_of,
    same_value,
    strip_items,
)

S = "001-0001"
WT = ItemKey("CV01", S, "SE.BASELINE", None, "F.VS", "IG.VS", "WEIGHT", "IT.VS.VSORRES")
WT_U = ItemKey("CV01", S, "SE.BASELINE", None, "F.VS", "IG.VS", "WEIGHT", "IT.VS.VSORRESU")
HT = ItemKey("CV01", S, "SE.BASELINE", None, "F.VS", "IG.VS", "HEIGHT", "IT.VS.VSORRES")
UNS = ItemKey("CV01", S, "SE.UNSCHED", "2024-06-03", "F.LB", "IG.LB", "GLUC", "IT.LB.LBORRES")
SRC = SourceRef("Observation", "wt-1", "2", "urn:h|wt-1")


def change(key: ItemKey, value: str, previous: str | None = None) -> ItemChange:
    iv = ItemValue(key, value, SRC, "F.VS/WEIGHT/result")
    if previous is None:
        return ItemChange(iv, TransactionType.INSERT)
    return ItemChange(iv, TransactionType.UPDATE, previous_value=previous, reason_for_change="source changed")


def odm(*changes: ItemChange, insert_subject: bool = False) -> bytes:
    tx = SubjectTransaction("CV01", "MDV.CV01.1", S, "SITE.001", TransactionType.INSERT if insert_subject else None,
                            list(changes), 3)
    return write_clinical_data([tx], file_type="Transactional", file_oid="F1",
                               creation=dt.datetime(2025, 3, 1, tzinfo=dt.timezone.utc),
                               pseudonymizer=Pseudonymizer(b"k" * 24))


def test_item_paths_put_repeat_keys_in_brackets():
    assert key_path(WT) == "SE.BASELINE/F.VS/IG.VS[WEIGHT]/IT.VS.VSORRES"
    assert key_path(UNS) == "SE.UNSCHED[2024-06-03]/F.LB/IG.LB[GLUC]/IT.LB.LBORRES"
    assert item_path("SE.SCREEN", None, "F.DM", "IG.DM", None, "IT.DM.SEX") == "SE.SCREEN/F.DM/IG.DM/IT.DM.SEX"


def test_previous_values_are_those_of_updates_only():
    changes = [change(WT, "71.0", "70.5"), change(HT, "170.0"), change(UNS, "101", "99")]
    assert previous_values_of(changes) == {key_path(WT): "70.5", key_path(UNS): "99"}


@pytest.mark.parametrize(("a", "b", "same"), [
    ("71.0", "71.0", True), ("71", "71.0", True), (" 71.0 ", "71.0", True), ("0.830", ".83", True),
    ("71.0", "71.1", False), ("2024-05-01", "2024-05-01", True), ("2024-05-01", "2024-5-1", False),
    ("NaN", "NaN", True), ("NaN", "nan", False), (None, None, True), (None, "", False), ("M", "F", False),
])
def test_same_value(a, b, same):
    assert same_value(a, b) is same


def test_which_updated_items_conflict():
    doc = odm(change(WT, "71.0", "70.5"), change(HT, "171.0", "170.0"), change(UNS, "101", "99"),
              change(WT_U, "kg"))
    previous = previous_values_of([change(WT, "71.0", "70.5"), change(HT, "171.0", "170.0"),
                                   change(UNS, "101", "99")])
    edc = {key_path(WT): "70.5",  # untouched: goes
           key_path(HT): "171",  # this row was applied already (its answer was lost): goes again
           key_path(UNS): "120",  # site staff changed it
           key_path(WT_U): "lb"}  # an Insert: never checked
    [c] = find_conflicts(doc, S, previous, edc)
    assert c == Conflict(("SE.UNSCHED", "2024-06-03", "F.LB", "IG.LB", "GLUC", "IT.LB.LBORRES"), "120", "99", "101")
    assert c.path == key_path(UNS)
    # a value cleared or removed in the EDC is a change too
    [gone] = find_conflicts(doc, S, previous, {key_path(WT): "70.5", key_path(HT): "170.0"})
    assert gone.edc_value is None and gone.path == key_path(UNS)
    # no previous value known (a row from before migration 0003): not checked
    assert find_conflicts(doc, S, {}, {}) == []
    # another subject's data is not this row's business
    assert find_conflicts(doc, "001-0002", previous, {}) == []


def test_withholding_items_keeps_the_rest_and_stays_valid_odm():
    doc = odm(change(WT, "71.0", "70.5"), change(WT_U, "kg", "kg "), change(HT, "171.0", "170.0"),
              change(UNS, "101", "99"))
    reduced, n = strip_items(doc, S, [key_path(WT), key_path(UNS)])
    assert n == 2
    assert sorted(i.key for i in odm_items(reduced)) == [
        ("SE.BASELINE", None, "F.VS", "IG.VS", "HEIGHT", "IT.VS.VSORRES"),
        ("SE.BASELINE", None, "F.VS", "IG.VS", "WEIGHT", "IT.VS.VSORRESU")]
    assert validate_odm(reduced) == []
    assert b"SE.UNSCHED" not in reduced  # the event left empty went too
    assert reduced.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<ODM ')
    assert b"\">\n            <ItemData ItemOID=\"IT.VS.VSORRESU\"" in reduced  # indentation kept
    # the rest of the document is untouched: AdminData, AuditRecords, SubjectData attributes
    assert reduced.count(b"<AuditRecord>") == 2 and b"<AdminData" in reduced
    # withholding everything leaves a SubjectData without data: still valid ODM
    empty, n = strip_items(doc, S, [key_path(k) for k in (WT, WT_U, HT, UNS)])
    assert n == 0 and odm_items(empty) == [] and validate_odm(empty) == []
    assert b'<SubjectData SubjectKey="001-0001" TransactionType="Update">' in empty
    assert b"<SiteRef" in empty


def test_a_hostile_read_back_is_refused():
    evil = (b'<?xml version="1.0"?><!DOCTYPE ODM [<!ENTITY x "boom">]>'
            b'<ODM xmlns="http://www.cdisc.org/ns/odm/v1.3"><ClinicalData StudyOID="CV01" MetaDataVersionOID="M">'
            b'<SubjectData SubjectKey="001-0001"/></ClinicalData></ODM>')
    with pytest.raises(IntakeError):
        edc_values(evil, S)
    with pytest.raises(IntakeError):
        edc_values(b"<ODM", S)


def test_the_conflict_discrepancy_names_both_values_and_the_source():
    state = SentItem(WT, "71.0", "urn:h|wt-1", "2", "Observation", "wt-1", "F.VS/WEIGHT/result")
    c = Conflict(("SE.BASELINE", None, "F.VS", "IG.VS", "WEIGHT", "IT.VS.VSORRES"), "99.9", "70.5", "71.0")
    d = conflict_discrepancy(c, "CV01", S, state, connector="sandbox", outbox_id=7, sequence=3)
    assert d.kind is DiscrepancyKind.EDC_CONFLICT and d.severity is Severity.ERROR
    assert (d.item_oid, d.study_event_oid, d.form_oid, d.item_group_repeat_key) == (
        "IT.VS.VSORRES", "SE.BASELINE", "F.VS", "WEIGHT")
    assert d.held_value == "71.0" and d.source == SourceRef("Observation", "wt-1", "2", "urn:h|wt-1")
    assert d.candidates == ({"item": key_path(WT), "edc_value": "99.9", "last_sent_value": "70.5",
                             "proposed_value": "71.0", "connector": "sandbox", "outbox_id": 7, "sequence": 3},)
    assert "holds '99.9'" in d.message and "last sent ('70.5')" in d.message and "'71.0'" in d.message
    assert "wt-1" not in d.message  # resource ids stay out of messages
    cleared = conflict_discrepancy(Conflict(c.key, None, "70.5", "71.0"), "CV01", S, None, connector="x")
    assert "holds no value" in cleared.message and cleared.source is None


def test_followups_refresh_the_conflict_of_a_frozen_item_whose_source_changed_again():
    frozen = SentItem(WT, "71.0", "urn:h|wt-1", "2", "Observation", "wt-1", "r", frozen=True)
    c = Conflict(("SE.BASELINE", None, "F.VS", "IG.VS", "WEIGHT", "IT.VS.VSORRES"), "99.9", "70.5", "71.0")
    open_ = [conflict_discrepancy(c, "CV01", S, frozen, connector="sandbox")]
    v3 = ItemValue(WT, "71.5", SourceRef("Observation", "wt-1", "3", "urn:h|wt-1"), "r")
    [d] = conflict_followups([v3], {WT: frozen}, open_)
    assert d.key == open_[0].key  # the same discrepancy, refreshed
    assert d.held_value == "71.5" and d.candidates[0]["proposed_value"] == "71.5"
    assert d.candidates[0]["edc_value"] == "99.9" and "'71.5'" in d.message and "'99.9'" in d.message
    # nothing new: same proposed value, not frozen, or frozen for another reason (no conflict open)
    assert conflict_followups([ItemValue(WT, "71.0", SRC, "r")], {WT: frozen}, open_) == []
    assert conflict_followups([v3], {WT: SentItem(WT, "71.0", "i", "2", "Observation", "x", "r")}, open_) == []
    assert conflict_followups([v3], {WT: frozen}, []) == []
