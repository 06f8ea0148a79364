"""The CV01 ODM metadata file and esource.study.metadata.load_metadata."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from lxml import etree

from esource.errors import StudyConfigError
from esource.odm.xsd import validate_odm
from esource.study.metadata import StudyMetadata, load_metadata
from odm_helpers import CV01_METADATA, ODM13, REPO

CT_DIR = REPO.parent / "shared" / "data" / "ct"
N = {"odm": ODM13}

PROTOCOL_EVENTS = {
    "SE.SCREEN": ("F.DM", "F.VS", "F.LB"),
    "SE.BASELINE": ("F.VS", "F.LB"),
    "SE.WEEK4": ("F.VS",),
    "SE.WEEK12": ("F.VS", "F.LB"),
    "SE.WEEK24": ("F.VS", "F.LB"),
    "SE.UNSCHED": ("F.VS", "F.LB"),
    "SE.COMMON": ("F.MH", "F.CM"),
}
PROTOCOL_ITEMS = {
    "IG.DM": ("IT.DM.BRTHYR", "IT.DM.SEX"),
    "IG.VS": ("IT.VS.VSTESTCD", "IT.VS.VSORRES", "IT.VS.VSORRESU", "IT.VS.VSDAT", "IT.VS.VSTIM"),
    "IG.LB": ("IT.LB.LBTESTCD", "IT.LB.LBORRES", "IT.LB.LBORRESU", "IT.LB.LBDAT", "IT.LB.LBORNRLO",
              "IT.LB.LBORNRHI", "IT.LB.LBNRIND"),
    "IG.MH": ("IT.MH.MHTERM", "IT.MH.MHCODE", "IT.MH.MHCODESYS", "IT.MH.MHCAT", "IT.MH.MHSTDAT",
              "IT.MH.MHENDAT", "IT.MH.MHONGO"),
    "IG.CM": ("IT.CM.CMTRT", "IT.CM.CMCODE", "IT.CM.CMCODESYS", "IT.CM.CMDOSE", "IT.CM.CMDOSU",
              "IT.CM.CMROUTE", "IT.CM.CMDOSFRQ", "IT.CM.CMSTDAT", "IT.CM.CMENDAT", "IT.CM.CMONGO"),
}
CODELIST_VALUES = {
    "CL.SEX": ["M", "F", "U"],
    "CL.NY": ["Y", "N", "U"],
    "CL.VSTESTCD": "SYSBP DIABP HR RESP TEMP WEIGHT HEIGHT BMI OXYSAT".split(),
    "CL.VSRESU": ["mmHg", "beats/min", "breaths/min", "C", "kg", "cm", "kg/m2", "%"],
    "CL.LBTESTCD": "HBA1C GLUC CREAT ALT AST HGB K SODIUM CHOL LDL UREAN".split(),
    "CL.LBRESU": ["%", "mg/dL", "U/L", "g/dL", "mmol/L"],
    "CL.NRIND": ["LOW", "NORMAL", "HIGH"],
    "CL.MHCAT": ["GENERAL", "ALLERGY"],
    "CL.CMDOSU": ["mg", "g", "ug", "mL", "IU", "TABLET", "CAPSULE", "PUFF", "DROP", "PATCH"],
    "CL.ROUTE": ["ORAL", "INTRAVENOUS", "SUBCUTANEOUS", "INTRAMUSCULAR", "NASAL", "TRANSDERMAL"],
    "CL.FREQ": ["QD", "BID", "TID", "QID", "QOD", "EVERY WEEK", "QAM", "QPM", "PRN"],
}


# -- the file itself


def test_cv01_metadata_is_valid_odm_132():
    data = CV01_METADATA.read_bytes()
    assert validate_odm(data, "1.3.2") == []
    root = etree.fromstring(data)
    assert root.get("FileType") == "Snapshot" and root.get("ODMVersion") == "1.3.2"
    assert data.lstrip().startswith(b"<?xml") and b"<!--" in data.split(b"<ODM", 1)[0]  # comment at the top


def test_every_item_has_a_cdash_alias_and_english_and_french_questions():
    root = etree.parse(str(CV01_METADATA)).getroot()
    items = root.findall(".//odm:ItemDef", N)
    assert len(items) == sum(len(v) for v in PROTOCOL_ITEMS.values())
    for it in items:
        langs = {t.get("{http://www.w3.org/XML/1998/namespace}lang") for t in it.findall("odm:Question/odm:TranslatedText", N)}
        assert langs == {"en", "fr"}, it.get("OID")
        aliases = [a.get("Name") for a in it.findall("odm:Alias[@Context='CDASH']", N)]
        assert aliases == [it.get("Name")], it.get("OID")


@pytest.mark.skipif(not CT_DIR.is_dir(), reason="shared CDISC CT files not available")
def test_every_nci_code_exists_in_the_cdisc_ct_files(cv01: StudyMetadata):
    rows = []
    for name in ("SEND_CT_2025-09-26.csv", "CDASH_CT_2025-03-28.csv"):
        with open(CT_DIR / name, encoding="utf-8-sig", newline="") as fh:
            rows.extend(csv.DictReader(fh))
    codelists = {r["Code"] for r in rows if not r["Codelist Code"]}
    terms = {(r["Codelist Code"], r["Code"], r["CDISC Submission Value"]) for r in rows if r["Codelist Code"]}
    checked = 0
    for cl in cv01.codelists.values():
        if cl.nci_code is None:
            assert all(i.nci_code is None for i in cl.items.values()), cl.oid
            continue
        assert cl.nci_code in codelists, cl.oid
        for item in cl.items.values():
            assert (cl.nci_code, item.nci_code, item.coded_value) in terms, (cl.oid, item)
            checked += 1
    assert checked == 64  # every coded term of the 9 codelists that have an NCI code
    # units in BasicDefinitions: real C71620 terms
    root = etree.parse(str(CV01_METADATA)).getroot()
    for mu in root.findall(".//odm:MeasurementUnit", N):
        code = mu.find("odm:Alias[@Context='nci:ExtCodeID']", N).get("Name")
        assert ("C71620", code, mu.get("Name")) in terms


# -- loading


def test_load_gives_the_protocol_structure(cv01: StudyMetadata):
    assert cv01.study_oid == "CV01"
    assert cv01.metadata_version_oid == "MDV.CV01.1"
    assert cv01.source_file == str(CV01_METADATA)
    assert list(cv01.study_events) == list(PROTOCOL_EVENTS)
    assert cv01.event_order() == tuple(PROTOCOL_EVENTS)
    for oid, forms in PROTOCOL_EVENTS.items():
        assert cv01.study_events[oid].form_oids == forms
        assert tuple(f.oid for f in cv01.forms_of_event(oid)) == forms
    unsched, common = cv01.study_events["SE.UNSCHED"], cv01.study_events["SE.COMMON"]
    assert (unsched.repeating, unsched.type) == (True, "Unscheduled")
    assert (common.repeating, common.type) == (False, "Common")
    assert all(cv01.study_events[o].type == "Scheduled" and not cv01.study_events[o].repeating
               for o in ("SE.SCREEN", "SE.BASELINE", "SE.WEEK4", "SE.WEEK12", "SE.WEEK24"))
    assert list(cv01.forms) == ["F.DM", "F.VS", "F.LB", "F.MH", "F.CM"]
    for form in ("DM", "VS", "LB", "MH", "CM"):
        group = cv01.item_group_of_form(f"F.{form}")
        assert group.oid == f"IG.{form}"
        assert group.repeating is (form != "DM")
        assert group.item_oids == PROTOCOL_ITEMS[group.oid]


def test_items_have_the_protocol_types(cv01: StudyMetadata):
    brthyr = cv01.items["IT.DM.BRTHYR"]
    assert (brthyr.data_type, brthyr.length) == ("integer", 4)
    assert [(r.comparator, r.soft_hard, r.values) for r in brthyr.range_checks] == [
        ("GE", "Hard", ("1900",)), ("LE", "Hard", ("2030",))]
    for oid in ("IT.VS.VSORRES", "IT.LB.LBORRES"):
        assert (cv01.items[oid].data_type, cv01.items[oid].length, cv01.items[oid].significant_digits) == ("float", 8, 2)
    for oid in ("IT.VS.VSDAT", "IT.LB.LBDAT", "IT.MH.MHSTDAT", "IT.MH.MHENDAT", "IT.CM.CMSTDAT", "IT.CM.CMENDAT"):
        assert cv01.items[oid].data_type == "partialDate"
    assert cv01.items["IT.VS.VSTIM"].data_type == "partialTime"
    assert cv01.items["IT.LB.LBORNRLO"].data_type == cv01.items["IT.LB.LBORNRHI"].data_type == "float"
    assert cv01.items["IT.MH.MHTERM"].length == 200
    assert cv01.items["IT.DM.SEX"].cdash_alias == "SEX"


def test_codelists_hold_exactly_the_protocol_values(cv01: StudyMetadata):
    assert set(cv01.codelists) == set(CODELIST_VALUES)
    for oid, values in CODELIST_VALUES.items():
        assert list(cv01.codelists[oid].items) == values, oid
    sex = cv01.codelist_for("IT.DM.SEX")
    assert sex is not None and sex.oid == "CL.SEX" and sex.nci_code == "C66731"
    assert {v: (i.decode, i.nci_code) for v, i in sex.items.items()} == {
        "M": ("Male", "C20197"), "F": ("Female", "C16576"), "U": ("Unknown", "C17998")}
    assert cv01.codelist_for("IT.MH.MHONGO") is cv01.codelist_for("IT.CM.CMONGO") is cv01.codelists["CL.NY"]
    assert cv01.codelists["CL.NY"].nci_code == "C66742"
    assert cv01.codelists["CL.ROUTE"].nci_code == "C66729"
    assert cv01.codelists["CL.FREQ"].nci_code == "C71113"
    assert cv01.codelists["CL.FREQ"].items["EVERY WEEK"].nci_code == "C67069"
    assert cv01.codelists["CL.NRIND"].nci_code is None  # not in the CT files: no invented code
    assert cv01.codelist_for("IT.VS.VSORRES") is None
    with pytest.raises(KeyError):
        cv01.codelist_for("IT.XX.NOPE")


def test_helpers_reject_unknown_oids(cv01: StudyMetadata):
    with pytest.raises(KeyError):
        cv01.forms_of_event("SE.NOPE")
    with pytest.raises(KeyError):
        cv01.item_group_of_form("F.NOPE")


# -- broken copies


def _copy(tmp_path: Path, old: str, new: str, name: str = "metadata.xml") -> tuple[Path, int]:
    """Copy the CV01 metadata with one edit; returns the path and the (1-based) line of the edit."""
    text = CV01_METADATA.read_text(encoding="utf-8")
    assert text.count(old) == 1, old
    line = text[: text.index(old)].count("\n") + 1
    path = tmp_path / name
    path.write_text(text.replace(old, new), encoding="utf-8")
    return path, line


def test_dangling_codelist_ref_names_file_line_and_oid(tmp_path):
    path, line = _copy(tmp_path, '<CodeListRef CodeListOID="CL.SEX"/>', '<CodeListRef CodeListOID="CL.GENDER"/>')
    with pytest.raises(StudyConfigError) as info:
        load_metadata(path)
    err = info.value
    assert err.file == str(path)
    assert err.key == "CL.GENDER"
    assert err.line == line
    assert "IT.DM.SEX" in err.problem and "CodeList" in err.problem
    assert str(err).startswith(f"{path}:{line} [CL.GENDER]: ")


def test_dangling_item_ref_is_reported(tmp_path):
    path, line = _copy(tmp_path, '<ItemRef ItemOID="IT.VS.VSTIM"', '<ItemRef ItemOID="IT.VS.VSTIME"')
    with pytest.raises(StudyConfigError) as info:
        load_metadata(path)
    assert (info.value.key, info.value.line) == ("IT.VS.VSTIME", line)
    assert "IG.VS" in info.value.problem


def test_the_first_dangling_reference_in_file_order_is_reported(tmp_path):
    text = CV01_METADATA.read_text(encoding="utf-8")
    text = text.replace('<CodeListRef CodeListOID="CL.FREQ"/>', '<CodeListRef CodeListOID="CL.FREQUENCY"/>')
    text = text.replace('<FormRef FormOID="F.CM"', '<FormRef FormOID="F.CONMEDS"')
    path = tmp_path / "m.xml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(StudyConfigError) as info:
        load_metadata(path)
    assert info.value.key == "F.CONMEDS"


def test_xsd_error_names_file_and_line(tmp_path):
    path, line = _copy(tmp_path, '<ItemGroupDef OID="IG.LB" Name="Laboratory Test Results" Repeating="Yes"',
                       '<ItemGroupDef OID="IG.LB" Name="Laboratory Test Results"')
    with pytest.raises(StudyConfigError) as info:
        load_metadata(path)
    assert info.value.file == str(path)
    assert info.value.line == line
    assert "Repeating" in info.value.problem and "not valid ODM 1.3.2" in info.value.problem


def test_duplicate_oid_is_an_xsd_error(tmp_path):
    path, line = _copy(tmp_path, '<ItemDef OID="IT.VS.VSTIM"', '<ItemDef OID="IT.VS.VSDAT"')
    with pytest.raises(StudyConfigError) as info:
        load_metadata(path)
    assert info.value.line == line and "IT.VS.VSDAT" in info.value.problem


def test_not_well_formed_file_names_the_line(tmp_path):
    path, line = _copy(tmp_path, "<ProtocolName>CV01</ProtocolName>", "<ProtocolName>CV01</Protocol>")
    with pytest.raises(StudyConfigError) as info:
        load_metadata(path)
    assert info.value.line == line and "not well-formed" in info.value.problem


def test_doctype_in_metadata_is_refused(tmp_path):
    path, _ = _copy(tmp_path, '<?xml version="1.0" encoding="UTF-8"?>',
                    '<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE ODM [<!ENTITY x "y">]>')
    with pytest.raises(StudyConfigError) as info:
        load_metadata(path)
    assert "DOCTYPE" in info.value.problem and info.value.line == 2


def test_missing_file_and_unknown_metadata_version(tmp_path):
    with pytest.raises(StudyConfigError) as info:
        load_metadata(tmp_path / "nope.xml")
    assert info.value.file == str(tmp_path / "nope.xml")
    with pytest.raises(StudyConfigError) as info:
        load_metadata(CV01_METADATA, "MDV.CV01.2")
    assert info.value.key == "MDV.CV01.2" and "MDV.CV01.1" in info.value.problem
    assert load_metadata(CV01_METADATA, "MDV.CV01.1").metadata_version_oid == "MDV.CV01.1"


def test_two_metadata_versions_need_a_choice(tmp_path):
    text = CV01_METADATA.read_text(encoding="utf-8")
    start, end = text.index("<MetaDataVersion "), text.index("</MetaDataVersion>") + len("</MetaDataVersion>")
    second = text[start:end].replace('OID="MDV.CV01.1" Name="CV01 eCRF version 1"', 'OID="MDV.CV01.2" Name="v2"')
    second = second.replace('<ItemRef ItemOID="IT.VS.VSTIM" OrderNumber="5" Mandatory="No"/>', "")
    path = tmp_path / "two.xml"
    path.write_text(text[:end] + "\n" + second + text[end:], encoding="utf-8")
    with pytest.raises(StudyConfigError) as info:
        load_metadata(path)
    assert "MDV.CV01.1" in info.value.problem and "MDV.CV01.2" in info.value.problem
    v2 = load_metadata(path, "MDV.CV01.2")
    assert v2.metadata_version_oid == "MDV.CV01.2"
    assert "IT.VS.VSTIM" not in v2.item_groups["IG.VS"].item_oids
    assert "IT.VS.VSTIM" in load_metadata(path, "MDV.CV01.1").item_groups["IG.VS"].item_oids


def test_refs_follow_order_number_not_file_order(tmp_path):
    text = CV01_METADATA.read_text(encoding="utf-8")
    text = text.replace('<ItemRef ItemOID="IT.DM.BRTHYR" OrderNumber="1"', '<ItemRef ItemOID="IT.DM.BRTHYR" OrderNumber="3"')
    text = text.replace('<FormRef FormOID="F.DM" OrderNumber="1"', '<FormRef FormOID="F.DM" OrderNumber="9"')
    text = text.replace('<StudyEventRef StudyEventOID="SE.SCREEN" OrderNumber="1"',
                        '<StudyEventRef StudyEventOID="SE.SCREEN" OrderNumber="8"')
    path = tmp_path / "m.xml"
    path.write_text(text, encoding="utf-8")
    md = load_metadata(path)
    assert md.item_groups["IG.DM"].item_oids == ("IT.DM.SEX", "IT.DM.BRTHYR")
    assert md.study_events["SE.SCREEN"].form_oids == ("F.VS", "F.LB", "F.DM")
    assert md.event_order()[-1] == "SE.SCREEN"
    assert list(md.study_events)[0] == "SE.SCREEN"  # the dict keeps file order
