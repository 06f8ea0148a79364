"""esource.odm.writer: ODM 1.3.2 (and 2.0) ClinicalData from SubjectTransactions."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from lxml import etree

import esource
from esource.domain.model import TransactionType
from esource.odm.writer import write_clinical_data
from esource.odm.xsd import validate_odm
from odm_helpers import CREATION, ODM13, ODM20, change, source, transaction

N13 = {"odm": ODM13}
N20 = {"odm": ODM20}
PATIENT = source("Patient", "MRN-4711-PAT", "3", identity="urn:oid:1.2.250.1.213.1.4.8|1234567890123")
OBS_BP = source("Observation", "bp-9981", "2", full_url="https://ehr.example/fhir/Observation/bp-9981")
OBS_GLU = source("Observation", "glu-0042", "sha256:" + "ab" * 32)


def _write(txs, **kw):
    kw.setdefault("file_type", "Snapshot")
    kw.setdefault("file_oid", "ODM.TEST.1")
    kw.setdefault("creation", CREATION)
    return write_clinical_data(txs, **kw)


def _sample_changes(tt: TransactionType = TransactionType.INSERT):
    """A subject's changes given in scrambled order (the writer must reorder them)."""
    return [
        change("SE.COMMON", None, "F.CM", "IG.CM", "10", "IT.CM.CMTRT", "Aspirin", tt=tt),
        change("SE.WEEK4", None, "F.VS", "IG.VS", "SYSBP", "IT.VS.VSORRES", "132", src=OBS_BP, tt=tt),
        change("SE.UNSCHED", "2024-07-02", "F.LB", "IG.LB", "GLUC", "IT.LB.LBORRES", "101", src=OBS_GLU, tt=tt),
        change("SE.WEEK4", None, "F.VS", "IG.VS", "SYSBP", "IT.VS.VSTESTCD", "SYSBP", src=OBS_BP, tt=tt),
        change("SE.SCREEN", None, "F.VS", "IG.VS", "HR", "IT.VS.VSORRES", "71", tt=tt),
        change("SE.SCREEN", None, "F.DM", "IG.DM", None, "IT.DM.SEX", "F", src=PATIENT, tt=tt),
        change("SE.COMMON", None, "F.CM", "IG.CM", "2", "IT.CM.CMTRT", "Metformin", tt=tt),
        change("SE.UNSCHED", "2024-06-20", "F.VS", "IG.VS", "DIABP", "IT.VS.VSORRES", "80", tt=tt),
        change("SE.COMMON", None, "F.MH", "IG.MH", "1", "IT.MH.MHTERM", "Hypertension", tt=tt),
        change("SE.SCREEN", None, "F.DM", "IG.DM", None, "IT.DM.BRTHYR", "1961", src=PATIENT, tt=tt),
        change("SE.WEEK4", None, "F.VS", "IG.VS", "DIABP", "IT.VS.VSORRES", "84", src=OBS_BP, tt=tt),
    ]


def _root(data: bytes):
    return etree.fromstring(data)


def _events(root, ns=N13):
    return [(e.get("StudyEventOID"), e.get("StudyEventRepeatKey"))
            for e in root.iterfind(".//odm:StudyEventData", ns)]


# -- Snapshot


def test_snapshot_is_valid_and_has_no_transaction_type(cv01, pseudonymizer):
    data = _write([transaction(_sample_changes())], pseudonymizer=pseudonymizer, metadata=cv01)
    assert validate_odm(data, "1.3.2") == []
    assert b"TransactionType" not in data
    root = _root(data)
    assert {k: root.get(k) for k in ("FileOID", "FileType", "Granularity", "ODMVersion", "Originator",
                                      "SourceSystem", "SourceSystemVersion", "CreationDateTime")} == {
        "FileOID": "ODM.TEST.1", "FileType": "Snapshot", "Granularity": "All", "ODMVersion": "1.3.2",
        "Originator": "esource", "SourceSystem": "esource", "SourceSystemVersion": esource.__version__,
        "CreationDateTime": "2025-03-01T10:30:00Z"}
    sd = root.find(".//odm:SubjectData", N13)
    assert sd.get("SubjectKey") == "001-0007"
    assert sd.find("odm:SiteRef", N13).get("LocationOID") == "SITE.001"
    assert len(root.findall(".//odm:ItemData", N13)) == 11


def test_order_follows_the_metadata(cv01, pseudonymizer):
    root = _root(_write([transaction(_sample_changes())], pseudonymizer=pseudonymizer, metadata=cv01))
    assert _events(root) == [("SE.SCREEN", None), ("SE.WEEK4", None), ("SE.UNSCHED", "2024-06-20"),
                             ("SE.UNSCHED", "2024-07-02"), ("SE.COMMON", None)]
    screen = root.find(".//odm:StudyEventData[@StudyEventOID='SE.SCREEN']", N13)
    assert [f.get("FormOID") for f in screen.iterfind("odm:FormData", N13)] == ["F.DM", "F.VS"]
    dm = screen.find("odm:FormData[@FormOID='F.DM']/odm:ItemGroupData", N13)
    assert [i.get("ItemOID") for i in dm.iterfind("odm:ItemData", N13)] == ["IT.DM.BRTHYR", "IT.DM.SEX"]
    week4 = root.find(".//odm:StudyEventData[@StudyEventOID='SE.WEEK4']//odm:ItemGroupData[@ItemGroupRepeatKey='SYSBP']", N13)
    assert [i.get("ItemOID") for i in week4.iterfind("odm:ItemData", N13)] == ["IT.VS.VSTESTCD", "IT.VS.VSORRES"]
    common = root.find(".//odm:StudyEventData[@StudyEventOID='SE.COMMON']", N13)
    assert [f.get("FormOID") for f in common.iterfind("odm:FormData", N13)] == ["F.MH", "F.CM"]
    cm_keys = [g.get("ItemGroupRepeatKey") for g in common.iterfind("odm:FormData[@FormOID='F.CM']/odm:ItemGroupData", N13)]
    assert cm_keys == ["2", "10"]  # numeric repeat keys sort numerically


def test_without_metadata_order_is_first_appearance(pseudonymizer):
    root = _root(_write([transaction(_sample_changes())], pseudonymizer=pseudonymizer))
    assert [e for e, _ in _events(root)] == ["SE.COMMON", "SE.WEEK4", "SE.UNSCHED", "SE.UNSCHED", "SE.SCREEN"]
    unsched = [k for e, k in _events(root) if e == "SE.UNSCHED"]
    assert unsched == ["2024-06-20", "2024-07-02"]  # repeat keys still in natural order
    screen = root.find(".//odm:StudyEventData[@StudyEventOID='SE.SCREEN']", N13)
    assert [f.get("FormOID") for f in screen.iterfind("odm:FormData", N13)] == ["F.VS", "F.DM"]


def test_snapshot_merges_a_subjects_transactions_and_drops_removed_items(cv01, pseudonymizer):
    first = transaction([change("SE.SCREEN", None, "F.DM", "IG.DM", None, "IT.DM.SEX", "M", src=PATIENT),
                         change("SE.WEEK4", None, "F.VS", "IG.VS", "HR", "IT.VS.VSORRES", "70")])
    second = transaction([change("SE.SCREEN", None, "F.DM", "IG.DM", None, "IT.DM.SEX", "F", src=PATIENT,
                                 tt=TransactionType.UPDATE, reason="gender corrected"),
                          change("SE.WEEK4", None, "F.VS", "IG.VS", "HR", "IT.VS.VSORRES", "70",
                                 tt=TransactionType.REMOVE)], subject_tt=None)
    other = transaction([change("SE.SCREEN", None, "F.DM", "IG.DM", None, "IT.DM.SEX", "U", subject="002-0001")],
                        subject="002-0001", site="SITE.002")
    data = _write([first, other, second], pseudonymizer=pseudonymizer, metadata=cv01)
    assert validate_odm(data) == []
    root = _root(data)
    subjects = root.findall(".//odm:SubjectData", N13)
    assert [s.get("SubjectKey") for s in subjects] == ["001-0007", "002-0001"]
    sex = subjects[0].findall(".//odm:ItemData[@ItemOID='IT.DM.SEX']", N13)
    assert [i.get("Value") for i in sex] == ["F"]
    assert subjects[0].find(".//odm:ItemData[@ItemOID='IT.VS.VSORRES']", N13) is None
    assert subjects[0].find(".//odm:StudyEventData[@StudyEventOID='SE.WEEK4']", N13) is None
    assert b"TransactionType" not in data


# -- Transactional


def test_transactional_insert_and_update_with_reason(cv01, pseudonymizer):
    insert = transaction(_sample_changes())
    update = transaction(
        [change("SE.WEEK4", None, "F.VS", "IG.VS", "SYSBP", "IT.VS.VSORRES", "128", src=OBS_BP,
                tt=TransactionType.UPDATE, previous="132",
                reason="Source Observation/bp-9981 changed from version 2 to 3"),
         change("SE.WEEK4", None, "F.VS", "IG.VS", "SYSBP", "IT.VS.VSORRESU", "mmHg", src=OBS_BP)],
        subject_tt=None)
    data = _write([insert, update], file_type="Transactional", pseudonymizer=pseudonymizer, metadata=cv01)
    assert validate_odm(data) == []
    root = _root(data)
    assert root.get("Granularity") is None  # only snapshots describe their breadth
    sds = root.findall(".//odm:SubjectData", N13)
    assert [s.get("TransactionType") for s in sds] == ["Insert", "Update"]  # one SubjectData per transaction
    for tag in ("StudyEventData", "FormData", "ItemGroupData"):
        assert {e.get("TransactionType") for e in root.iterfind(f".//odm:{tag}", N13)} == {"Upsert"}
    assert {i.get("TransactionType") for i in sds[0].iterfind(".//odm:ItemData", N13)} == {"Insert"}
    upd = sds[1].find(".//odm:ItemData[@ItemOID='IT.VS.VSORRES']", N13)
    assert (upd.get("TransactionType"), upd.get("Value")) == ("Update", "128")
    audit = upd.find("odm:AuditRecord", N13)
    assert [etree.QName(c).localname for c in audit] == ["UserRef", "LocationRef", "DateTimeStamp",
                                                          "ReasonForChange", "SourceID"]
    assert audit.find("odm:UserRef", N13).get("UserOID") == "USR.ESOURCE"
    assert audit.find("odm:LocationRef", N13).get("LocationOID") == "SITE.001"
    assert audit.findtext("odm:DateTimeStamp", namespaces=N13) == "2025-03-01T10:30:00Z"
    reason = audit.findtext("odm:ReasonForChange", namespaces=N13)
    assert reason == f"Source {pseudonymizer.reference(OBS_BP)} changed from version 2 to 3"
    # an item without a reason gets no ReasonForChange
    unit = sds[1].find(".//odm:ItemData[@ItemOID='IT.VS.VSORRESU']", N13)
    assert unit.find("odm:AuditRecord/odm:ReasonForChange", N13) is None
    assert unit.get("TransactionType") == "Insert"


def test_transactional_remove_has_no_value(cv01, pseudonymizer):
    tx = transaction([change("SE.WEEK4", None, "F.VS", "IG.VS", "HR", "IT.VS.VSORRES", "70",
                             tt=TransactionType.REMOVE, reason="data manager decision")], subject_tt=None)
    data = _write([tx], file_type="Transactional", pseudonymizer=pseudonymizer, metadata=cv01)
    assert validate_odm(data) == []
    item = _root(data).find(".//odm:ItemData", N13)
    assert item.get("TransactionType") == "Remove" and item.get("Value") is None


def test_same_item_twice_in_one_transaction_is_refused(pseudonymizer):
    tx = transaction([change("SE.WEEK4", None, "F.VS", "IG.VS", "HR", "IT.VS.VSORRES", "70"),
                      change("SE.WEEK4", None, "F.VS", "IG.VS", "HR", "IT.VS.VSORRES", "71")])
    with pytest.raises(ValueError, match="twice"):
        _write([tx], file_type="Transactional", pseudonymizer=pseudonymizer)


# -- privacy


def test_source_id_is_the_pseudonym_and_raw_ids_never_leave(cv01, pseudonymizer):
    changes = _sample_changes(TransactionType.UPDATE)
    changes[5] = change("SE.SCREEN", None, "F.DM", "IG.DM", None, "IT.DM.SEX", "F", src=PATIENT,
                        tt=TransactionType.UPDATE,
                        reason="Patient/MRN-4711-PAT version 3 (urn:oid:1.2.250.1.213.1.4.8|1234567890123); "
                               "was MRN-4711-PAT v2")
    changes[1] = change("SE.WEEK4", None, "F.VS", "IG.VS", "SYSBP", "IT.VS.VSORRES", "132", src=OBS_BP,
                        tt=TransactionType.UPDATE, reason="https://ehr.example/fhir/Observation/bp-9981 is newer")
    for file_type in ("Snapshot", "Transactional"):
        for version in ("1.3.2", "2.0"):
            data = _write([transaction(changes)], file_type=file_type, pseudonymizer=pseudonymizer,
                          metadata=cv01, odm_version=version)
            for secret in (b"MRN-4711-PAT", b"1234567890123", b"bp-9981", b"glu-0042", b"ehr.example"):
                assert secret not in data, (file_type, version, secret)
            ns = N20 if version == "2.0" else N13
            root = _root(data)
            sex = root.find(".//odm:ItemData[@ItemOID='IT.DM.SEX']", ns)
            assert sex.findtext("odm:AuditRecord/odm:SourceID", namespaces=ns) == pseudonymizer.source_id(PATIENT)
            assert pseudonymizer.reference(PATIENT) in sex.findtext("odm:AuditRecord/odm:ReasonForChange", namespaces=ns)
            glu = root.find(".//odm:ItemData[@ItemOID='IT.LB.LBORRES']", ns)
            assert glu.findtext("odm:AuditRecord/odm:SourceID", namespaces=ns) == pseudonymizer.source_id(OBS_GLU)
            assert all(re.fullmatch(r"[A-Za-z]+:[0-9a-f]{32}\|v=[^|]+", s.text) for s in root.iterfind(".//odm:SourceID", ns))


# -- admin data, timestamps, options


def test_admin_data_declares_user_and_sites(cv01, pseudonymizer):
    txs = [transaction(_sample_changes()),
           transaction([change("SE.SCREEN", None, "F.DM", "IG.DM", None, "IT.DM.SEX", "M", subject="002-0003")],
                       subject="002-0003", site="SITE.002")]
    root = _root(_write(txs, pseudonymizer=pseudonymizer, metadata=cv01, user_oid="USR.ESRC.2"))
    admin = root.find("odm:AdminData", N13)
    assert admin.getnext().tag == f"{{{ODM13}}}ClinicalData"  # AdminData comes before ClinicalData
    user = admin.find("odm:User", N13)
    assert (user.get("OID"), user.get("UserType"), user.findtext("odm:FullName", namespaces=N13)) == (
        "USR.ESRC.2", "Other", "esource integration")
    locs = admin.findall("odm:Location", N13)
    assert [(loc.get("OID"), loc.get("LocationType")) for loc in locs] == [("SITE.001", "Site"), ("SITE.002", "Site")]
    ref = locs[1].find("odm:MetaDataVersionRef", N13)
    assert (ref.get("StudyOID"), ref.get("MetaDataVersionOID")) == ("CV01", "MDV.CV01.1")
    assert {u.get("UserOID") for u in root.iterfind(".//odm:UserRef", N13)} == {"USR.ESRC.2"}
    site2 = root.find(".//odm:SubjectData[@SubjectKey='002-0003']", N13)
    assert {r.get("LocationOID") for r in site2.iterfind(".//odm:LocationRef", N13)} == {"SITE.002"}

    bare = _root(_write(txs, pseudonymizer=pseudonymizer, include_admin_data=False))
    assert bare.find("odm:AdminData", N13) is None


def test_timestamps_are_utc(pseudonymizer):
    paris = dt.timezone(dt.timedelta(hours=2))
    data = _write([transaction(_sample_changes()[:1])], pseudonymizer=pseudonymizer,
                  creation=dt.datetime(2025, 6, 1, 12, 0, 0, tzinfo=paris))
    root = _root(data)
    assert root.get("CreationDateTime") == "2025-06-01T10:00:00Z"
    assert root.findtext(".//odm:DateTimeStamp", namespaces=N13) == "2025-06-01T10:00:00Z"


def test_empty_snapshot_with_metadata_is_valid(cv01, pseudonymizer):
    data = _write([], pseudonymizer=pseudonymizer, metadata=cv01)
    assert validate_odm(data) == []
    cd = _root(data).find("odm:ClinicalData", N13)
    assert (cd.get("StudyOID"), cd.get("MetaDataVersionOID"), len(cd)) == ("CV01", "MDV.CV01.1", 0)


@pytest.mark.parametrize("bad, message", [
    (change("SE.WEEK4", None, "F.LB", "IG.LB", "GLUC", "IT.LB.LBORRES", "90"), "not collected at SE.WEEK4"),
    (change("SE.SCREEN", None, "F.DM", "IG.DM", None, "IT.VS.VSORRES", "1"), "not part of item group IG.DM"),
    (change("SE.VISIT9", None, "F.VS", "IG.VS", "HR", "IT.VS.VSORRES", "1"), "SE.VISIT9"),
])
def test_metadata_rejects_misplaced_oids(cv01, pseudonymizer, bad, message):
    with pytest.raises(ValueError, match=message):
        _write([transaction([bad])], pseudonymizer=pseudonymizer, metadata=cv01)


def test_bad_arguments(pseudonymizer):
    with pytest.raises(ValueError):
        _write([], pseudonymizer=pseudonymizer, file_type="Delta")
    with pytest.raises(ValueError):
        _write([], pseudonymizer=pseudonymizer, odm_version="1.3")


# -- ODM 2.0


@pytest.mark.parametrize("file_type", ["Snapshot", "Transactional"])
def test_odm_20_output_is_valid(cv01, pseudonymizer, file_type):
    update = change("SE.WEEK4", None, "F.VS", "IG.VS", "SYSBP", "IT.VS.VSORRES", "128", src=OBS_BP,
                    tt=TransactionType.UPDATE, reason="newer version")
    data = _write([transaction(_sample_changes()), transaction([update], subject_tt=None)],
                  file_type=file_type, pseudonymizer=pseudonymizer, metadata=cv01, odm_version="2.0")
    assert validate_odm(data, "2.0") == []
    assert validate_odm(data, "1.3.2") != []
    root = _root(data)
    assert root.get("ODMVersion") == "2.0"
    assert root.find(".//odm:FormData", N20) is None
    # forms become form-level ItemGroupData holding the item groups
    screen = root.find(".//odm:StudyEventData[@StudyEventOID='SE.SCREEN']", N20)
    assert [g.get("ItemGroupOID") for g in screen.iterfind("odm:ItemGroupData", N20)] == ["F.DM", "F.VS"]
    dm = screen.find("odm:ItemGroupData[@ItemGroupOID='F.DM']/odm:ItemGroupData[@ItemGroupOID='IG.DM']", N20)
    sex = dm.find("odm:ItemData[@ItemOID='IT.DM.SEX']", N20)
    assert sex.findtext("odm:Value", namespaces=N20) == "F"
    assert [etree.QName(c).localname for c in sex] == ["Value", "AuditRecord"]
    assert root.find(".//odm:Location", N20).get("Role") == "Site"
    if file_type == "Snapshot":
        assert b"TransactionType" not in data
    else:
        assert {e.get("TransactionType") for e in root.iterfind(".//odm:ItemGroupData", N20)} == {"Upsert"}


def test_reason_rewriting_keeps_the_rest_of_the_text_intact(pseudonymizer):
    short = source("Observation", "1", "2")
    tx = transaction([change("SE.WEEK4", None, "F.VS", "IG.VS", "HR", "IT.VS.VSORRES", "70", src=short,
                             tt=TransactionType.UPDATE,
                             reason="Observation/1 changed from version 1 to 2 (value 1.5 -> 70; ref 1)")],
                     subject_tt=None)
    data = _write([tx], file_type="Transactional", pseudonymizer=pseudonymizer)
    reason = _root(data).findtext(".//odm:ReasonForChange", namespaces=N13)
    assert reason == f"{pseudonymizer.reference(short)} changed from version 1 to 2 (value 1.5 -> 70; ref 1)"
