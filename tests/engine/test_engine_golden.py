"""Golden tests on real sample files (tests/data, see tests/data/SOURCES.md): concrete items checked by
hand against the JSON, and every IPS and Synthea file maps without exception."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import orjson
import pytest
from lxml import etree

from engine_helpers import DATA, enrollment
from esource.odm.xsd import validate_odm
from esource.privacy import Pseudonymizer
from esource.services.dry_run import dry_run, lineage, snapshot_odm

ODM = "{http://www.cdisc.org/ns/odm/v1.3}"
TODAY = dt.date(2024, 9, 1)
CREATION = dt.datetime(2024, 9, 1, 12, 0, tzinfo=dt.timezone.utc)
PSEUDO = Pseudonymizer(b"golden-test-key-0123456789abcdef")

ARLA = DATA / "synthea" / "Arla_Lang_0c89b627-646b-40ff-a620-c8509a10912c.json"
IOSEFA = DATA / "ips" / "Bundle-IosefaFuimaono-Bundle.json"
NL = DATA / "ips" / "NL_core_patient_01.json"


def _map(study, engine, path: Path, day1: dt.date):
    run = dry_run(study, engine, enrollment(day1=day1), [path], today=TODAY)
    return run


def _items(run) -> dict[tuple, str]:
    out = {}
    for iv in run.result.items:
        k = (iv.key.study_event_oid, iv.key.study_event_repeat_key, iv.key.item_group_repeat_key, iv.key.item_oid)
        assert k not in out
        out[k] = iv.value
    return out


def _group(items, event, repeat):
    return {k[3]: v for k, v in items.items() if k[0] == event and k[2] == repeat}


def _valid_odm(study, run) -> bytes:
    odm = snapshot_odm(study, run, PSEUDO, creation=CREATION)
    assert validate_odm(odm) == []
    return odm


# ---------------------------------------------------------------- Synthea: Arla Lang, Day 1 = 2019-03-26


@pytest.fixture(scope="module")
def arla(study, engine):
    return _map(study, engine, ARLA, dt.date(2019, 3, 26))


def test_arla_dm(arla):
    items = _items(arla)
    assert _group(items, "SE.SCREEN", None) == {"IT.DM.BRTHYR": "1938", "IT.DM.SEX": "F"}


def test_arla_baseline_vitals(arla):
    # Observations of 2019-03-26T00:56:59+00:00 (the only encounter within days -28..183)
    items = _items(arla)
    v = lambda t: _group(items, "SE.BASELINE", t)  # noqa: E731
    base = {"IT.VS.VSDAT": "2019-03-26", "IT.VS.VSTIM": "00:56"}
    assert v("HEIGHT") == {**base, "IT.VS.VSTESTCD": "HEIGHT", "IT.VS.VSORRES": "161.7", "IT.VS.VSORRESU": "cm"}
    assert v("WEIGHT") == {**base, "IT.VS.VSTESTCD": "WEIGHT", "IT.VS.VSORRES": "78.4", "IT.VS.VSORRESU": "kg"}
    assert v("BMI") == {**base, "IT.VS.VSTESTCD": "BMI", "IT.VS.VSORRES": "30.0", "IT.VS.VSORRESU": "kg/m2"}
    assert v("SYSBP")["IT.VS.VSORRES"] == "134"   # 133.97991335702838 (component of 55284-4)
    assert v("DIABP")["IT.VS.VSORRES"] == "80"    # 79.8670388788944


def test_arla_baseline_labs(arla):
    items = _items(arla)
    lb = {t: _group(items, "SE.BASELINE", t).get("IT.LB.LBORRES") for t in
          ("GLUC", "UREAN", "CREAT", "SODIUM", "K", "HBA1C", "CHOL", "LDL", "HGB")}
    assert lb == {"GLUC": "85",        # 2339-0: 85.23694656696716 mg/dL
                  "UREAN": "12",       # 6299-2: 11.91001759829442 mg/dL
                  "CREAT": "0.56",     # 38483-4: 0.5553735538719906 mg/dL
                  "SODIUM": "140",     # 2947-0: 139.64317267136184 mmol/L
                  "K": "5.1",          # 6298-4: 5.123427099277624 mmol/L
                  "HBA1C": "6.3",      # 4548-4: 6.294823186442308 %
                  "CHOL": None, "LDL": None, "HGB": None}  # not measured on 2019-03-26


def test_arla_only_baseline_visits(arla):
    assert {k[0] for k in _items(arla)} == {"SE.SCREEN", "SE.BASELINE", "SE.COMMON"}


def test_arla_medical_history(arla):
    items = _items(arla)
    terms = [_group(items, "SE.COMMON", str(i)).get("IT.MH.MHTERM") for i in range(1, 11)]
    assert terms == ["Chronic sinusitis (disorder)", "Brain damage - traumatic", "Body mass index 30+ - obesity (finding)",
                     "Prediabetes", "Osteoarthritis of knee", "Coronary Heart Disease",
                     "Acute viral pharyngitis (disorder)", "Polyp of colon", "Viral sinusitis (disorder)", None]
    polyp = {k: v for k, v in _group(items, "SE.COMMON", "8").items() if k.startswith("IT.MH")}
    assert polyp == {"IT.MH.MHTERM": "Polyp of colon", "IT.MH.MHCODE": "68496003", "IT.MH.MHCODESYS": "SNOMED CT",
                     "IT.MH.MHCAT": "GENERAL", "IT.MH.MHSTDAT": "2014-10-27", "IT.MH.MHENDAT": "2016-01-20",
                     "IT.MH.MHONGO": "N"}
    # acute bronchitis, onset 2019-08-15, is after consent (2019-02-26): a possible adverse event
    (ae,) = [d for d in arla.result.discrepancies if d.kind == "possible_adverse_event"]
    assert ae.source.id == "23a56955-37c4-4f20-bf30-bca3c251f7d5"


def test_arla_medications_from_requests(arla):
    items = _items(arla)
    cms = [{k: v for k, v in _group(items, "SE.COMMON", str(i)).items() if k.startswith("IT.CM")} for i in range(1, 7)]
    assert [c["IT.CM.CMTRT"] for c in cms] == [
        "Naproxen sodium 220 MG Oral Tablet", "Clopidogrel 75 MG Oral Tablet",
        "Nitroglycerin 0.4 MG/ACTUAT Mucosal Spray", "Simvastatin 20 MG Oral Tablet", "Amlodipine 5 MG Oral Tablet",
        "Acetaminophen 21.7 MG/ML / Dextromethorphan Hydrobromide 1 MG/ML / doxylamine succinate 0.417 MG/ML Oral Solution"]
    assert cms[1] == {"IT.CM.CMTRT": "Clopidogrel 75 MG Oral Tablet", "IT.CM.CMCODE": "309362",
                      "IT.CM.CMCODESYS": "RxNorm", "IT.CM.CMSTDAT": "2006-05-02", "IT.CM.CMONGO": "Y"}
    # stopped, authored 2019-08-15 (after consent - 30 days): included, not ongoing
    assert (cms[5]["IT.CM.CMSTDAT"], cms[5]["IT.CM.CMONGO"]) == ("2019-08-15", "N")


def test_arla_odm_is_valid_and_matches_lineage(study, arla):
    odm = _valid_odm(study, arla)
    root = etree.fromstring(odm)
    assert len(list(root.iter(f"{ODM}ItemData"))) == len(arla.result.items)
    lin = lineage(arla, PSEUDO)
    assert len(lin["items"]) == len(arla.result.items)


# ---------------------------------------------------------------- IPS: Iosefa Fuimaono (NZ)


def test_iosefa_labs_converted_day1_2023_03_05(study, engine):
    run = _map(study, engine, IOSEFA, dt.date(2023, 3, 5))
    items = _items(run)
    assert _group(items, "SE.BASELINE", "HBA1C") == {   # 60 mmol/mol: 0.09148 × 60 + 2.152 = 7.6408
        "IT.LB.LBTESTCD": "HBA1C", "IT.LB.LBORRES": "7.6", "IT.LB.LBORRESU": "%", "IT.LB.LBDAT": "2023-03-05"}
    assert _group(items, "SE.BASELINE", "LDL")["IT.LB.LBORRES"] == "131"     # 3.4 × 38.67 = 131.478
    assert _group(items, "SE.BASELINE", "CHOL")["IT.LB.LBORRES"] == "197"    # 5.1 × 38.67 = 197.217
    assert _group(items, "SE.SCREEN", None) == {"IT.DM.BRTHYR": "1950", "IT.DM.SEX": "M"}
    # six problem-list Conditions before consent (2023-02-05), in bundle order
    terms = [_group(items, "SE.COMMON", str(i)).get("IT.MH.MHTERM") for i in range(1, 7)]
    assert terms[:4] == ["Fracture of neck of femur", "Type 2 diabetes mellitus", "Gout", "Benign essential hypertension"]
    assert _group(items, "SE.COMMON", "5")["IT.MH.MHONGO"] == "N"   # HipFractureRepair: resolved
    # medications: route only (no dose quantity, no timing); CMCODE only for SNOMED (NZMT codes are not used)
    metformin = {k: v for k, v in _group(items, "SE.COMMON", "4").items() if k.startswith("IT.CM")}
    assert metformin == {"IT.CM.CMTRT": "Metformin", "IT.CM.CMCODE": "372567009", "IT.CM.CMCODESYS": "SNOMED CT",
                         "IT.CM.CMROUTE": "ORAL", "IT.CM.CMONGO": "Y"}
    assert _group(items, "SE.COMMON", "2")["IT.CM.CMROUTE"] == "SUBCUTANEOUS"
    assert "IT.CM.CMCODE" not in _group(items, "SE.COMMON", "1")
    # the diazepam allergy (onset 2023-11-26) is after consent: a possible adverse event
    assert [d.kind.value for d in run.result.discrepancies] == ["possible_adverse_event"]
    _valid_odm(study, run)


def test_iosefa_vitals_day1_2023_11_25(study, engine):
    run = _map(study, engine, IOSEFA, dt.date(2023, 11, 25))
    items = _items(run)
    # 14:20:33+13:00 is kept as written: 2023-11-25, 14:20 (no shift to UTC, which would be the 24th)
    assert _group(items, "SE.BASELINE", "SYSBP") == {"IT.VS.VSTESTCD": "SYSBP", "IT.VS.VSORRES": "136",
                                                     "IT.VS.VSORRESU": "mmHg", "IT.VS.VSDAT": "2023-11-25",
                                                     "IT.VS.VSTIM": "14:20"}
    assert _group(items, "SE.BASELINE", "DIABP")["IT.VS.VSORRES"] == "88"
    assert _group(items, "SE.BASELINE", "HR")["IT.VS.VSORRES"] == "84"       # code /min (unit text beats/minute)
    assert _group(items, "SE.BASELINE", "HEIGHT")["IT.VS.VSORRES"] == "184.0"
    assert _group(items, "SE.BASELINE", "HEIGHT")["IT.VS.VSTIM"] == "14:21"
    # weight of 2023-09-29 is day -57: not sent
    assert _group(items, "SE.SCREEN", "WEIGHT") == {} and _group(items, "SE.BASELINE", "WEIGHT") == {}
    _valid_odm(study, run)


# ---------------------------------------------------------------- IPS: NL core patient (mmol/l, reference range)


def test_nl_hemoglobin_mmol_per_l_with_reference_range(study, engine):
    run = _map(study, engine, NL, dt.date(2022, 1, 2))
    items = _items(run)
    # 11.5 mmol/l (UCUM code "mmol/l") × 1.611 = 18.5265; range 12.0–16.0 mmol/l -> 19.332 / 25.776
    assert _group(items, "SE.BASELINE", "HGB") == {
        "IT.LB.LBTESTCD": "HGB", "IT.LB.LBORRES": "18.5", "IT.LB.LBORRESU": "g/dL", "IT.LB.LBDAT": "2022-01-02",
        "IT.LB.LBORNRLO": "19.3", "IT.LB.LBORNRHI": "25.8", "IT.LB.LBNRIND": "LOW"}
    allergy = _group(items, "SE.COMMON", "1")
    assert {k: v for k, v in allergy.items() if k.startswith("IT.MH")} == {
        "IT.MH.MHTERM": "Penicilline", "IT.MH.MHCODE": "764146007", "IT.MH.MHCODESYS": "SNOMED CT",
        "IT.MH.MHCAT": "ALLERGY", "IT.MH.MHSTDAT": "1995-01-01", "IT.MH.MHONGO": "Y"}
    pantoprazol = {k: v for k, v in _group(items, "SE.COMMON", "1").items() if k.startswith("IT.CM")}
    assert pantoprazol == {"IT.CM.CMTRT": "PANTOPRAZOL 40MG INJPDR", "IT.CM.CMDOSE": "40", "IT.CM.CMDOSU": "mg",
                           "IT.CM.CMDOSFRQ": "QD", "IT.CM.CMONGO": "Y"}
    _valid_odm(study, run)


# ---------------------------------------------------------------- every sample file maps


def _all_files():
    return sorted((DATA / "ips").glob("*.json")) + sorted((DATA / "synthea").glob("*.json"))


def _latest_observation_date(path: Path) -> dt.date:
    doc = orjson.loads(path.read_bytes())
    dates = []
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("resourceType") == "Observation":
                v = node.get("effectiveDateTime") or (node.get("effectivePeriod") or {}).get("start")
                if isinstance(v, str) and len(v) >= 10:
                    dates.append(dt.date.fromisoformat(v[:10]))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return max(dates) if dates else dt.date(2024, 1, 1)


def test_sample_set_is_complete():
    files = _all_files()
    assert len([f for f in files if f.parent.name == "ips"]) == 20
    assert len([f for f in files if f.parent.name == "synthea"]) == 8


@pytest.mark.parametrize("path", _all_files(), ids=lambda p: p.name[:40])
def test_every_sample_file_maps(study, engine, path):
    day1 = _latest_observation_date(path)
    run = _map(study, engine, path, day1)
    odm = _valid_odm(study, run)
    lin = lineage(run, PSEUDO)
    json.dumps(lin)
    root = etree.fromstring(odm)
    assert len(list(root.iter(f"{ODM}ItemData"))) == len(run.result.items) == len(lin["items"])
    # the Patient's logical id never leaves
    doc = orjson.loads(path.read_bytes())
    pids = set()
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("resourceType") == "Patient" and isinstance(node.get("id"), str) and len(node["id"]) >= 4:
                pids.add(node["id"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    # ODM: only pseudonymous SourceIDs (their "|v=<versionId>" part may coincide with a short id, as in
    # HK_IPS where Patient 00001 has versionId 00001)
    odm_text = re.sub(r"\|v=[^<]*", "", odm.decode())
    strings = list(_strings(lin))
    for pid in pids:
        assert pid not in odm_text
        # lineage: no value is the Patient id or a reference to it (other resources' own ids may embed it,
        # e.g. Condition/eumfh-39-02-1-1 of Patient/eumfh-39-02-1: see the report)
        assert all(s != pid and f"Patient/{pid}" not in s for s in strings)


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            if k in ("versionId", "source_id"):  # versions may coincide with a short id (see above)
                continue
            yield k
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
