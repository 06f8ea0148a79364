"""`esource map` contract: the lineage JSON shape, lineage items == ODM ItemData, and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from lxml import etree

from engine_helpers import (GLUC, HR, REPO, TEMP, bp, bundle_bytes, condition, day, med_statement, obs, patient)
from esource.odm.xsd import validate_odm

ESOURCE = Path(sys.executable).parent / "esource"
ODM = "{http://www.cdisc.org/ns/odm/v1.3}"
ARGS = ["map", "--study", "CV01", "--subject-key", "001-0007", "--site", "SITE.001", "--day1", "2024-01-01"]


def esource(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ESOURCE_PSEUDONYM_KEY": "cli-test-key-0123456789abcdef"}
    return subprocess.run([str(ESOURCE), *map(str, args)], capture_output=True, env=env, cwd=REPO, timeout=120)


def _resources():
    return [
        patient("MRN-777", birth="1961-02-03", gender="male",
                identifier=[{"system": "urn:hospital:mrn", "value": "MRN-777"}]),
        bp(132, 84, day(1, "08:05")),
        obs(HR, 70, "/min", day(29)),
        obs(TEMP, 99.05, "[degF]", day(29)),
        obs(GLUC, 5.5, "mmol/L", day(40)),
        obs(GLUC, 6.0, "mmol/L", day(85), meta={"versionId": "3"}),
        obs(HR, 71, "/min", day(30)),                     # not selected
        obs(HR, "abc", "/min", day(85)),                  # held: invalid
        condition(),
        condition(onset=day(3), text="Cough"),             # possible AE
        med_statement(dose=500, start="2023-06-01"),
    ]


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("cli") / "sample.json"
    f.write_bytes(bundle_bytes(_resources()))
    return f


@pytest.fixture(scope="module")
def lineage_json(sample):
    p = esource(*ARGS, "--format", "lineage", sample)
    assert p.returncode == 0, p.stderr.decode()
    return json.loads(p.stdout)


@pytest.fixture(scope="module")
def odm_bytes(sample):
    p = esource(*ARGS, sample)
    assert p.returncode == 0, p.stderr.decode()
    return p.stdout


def test_lineage_shape(lineage_json):
    assert lineage_json["study_oid"] == "CV01" and lineage_json["subject_key"] == "001-0007"
    assert lineage_json["site_oid"] == "SITE.001"
    assert lineage_json["items"]
    for it in lineage_json["items"]:
        assert {"study_event_oid", "study_event_repeat_key", "form_oid", "item_group_oid", "item_group_repeat_key",
                "item_oid", "value", "source"} <= set(it)
        src = it["source"]
        assert {"resourceType", "versionId"} <= set(src)
        if src["resourceType"] == "Patient":
            assert "id" not in src
        else:
            assert isinstance(src["id"], str) and src["id"]
        assert isinstance(it["value"], str)
    for ns in lineage_json["not_sent"]:
        assert {"reason", "source"} <= set(ns) and ns["source"]["resourceType"]
    assert lineage_json["discrepancies"]
    for d in lineage_json["discrepancies"]:
        assert {"kind", "message", "item_oid", "source"} <= set(d)
    kinds = sorted(d["kind"] for d in lineage_json["discrepancies"])
    assert kinds == ["invalid_source", "possible_adverse_event"]
    assert "MRN-777" not in json.dumps(lineage_json)


def test_lineage_concrete_values(lineage_json):
    got = {(i["study_event_oid"], i["study_event_repeat_key"], i["item_group_repeat_key"], i["item_oid"]): i["value"]
           for i in lineage_json["items"]}
    assert got[("SE.BASELINE", None, "SYSBP", "IT.VS.VSORRES")] == "132"
    assert got[("SE.BASELINE", None, "DIABP", "IT.VS.VSTIM")] == "08:05"
    assert got[("SE.WEEK4", None, "TEMP", "IT.VS.VSORRES")] == "37.3"
    assert got[("SE.UNSCHED", day(40), "GLUC", "IT.LB.LBORRES")] == "99"
    assert got[("SE.WEEK12", None, "GLUC", "IT.LB.LBORRES")] == "108"
    assert got[("SE.SCREEN", None, None, "IT.DM.BRTHYR")] == "1961"
    assert ("SE.WEEK12", None, "HR", "IT.VS.VSORRES") not in got
    ns_reasons = [n["reason"] for n in lineage_json["not_sent"]]
    assert any(r.startswith("not selected for SE.WEEK4") for r in ns_reasons)


def _odm_items(odm: bytes) -> set[tuple]:
    root = etree.fromstring(odm)
    out = set()
    for se in root.iter(f"{ODM}StudyEventData"):
        for fd in se.iter(f"{ODM}FormData"):
            for ig in fd.iter(f"{ODM}ItemGroupData"):
                for it in ig.iter(f"{ODM}ItemData"):
                    sid = it.find(f"{ODM}AuditRecord/{ODM}SourceID").text
                    out.add((se.get("StudyEventOID"), se.get("StudyEventRepeatKey"), fd.get("FormOID"),
                             ig.get("ItemGroupOID"), ig.get("ItemGroupRepeatKey"), it.get("ItemOID"), it.get("Value"),
                             sid))
    return out


def test_lineage_items_are_exactly_the_odm_item_data(lineage_json, odm_bytes):
    assert validate_odm(odm_bytes) == []
    root = etree.fromstring(odm_bytes)
    assert root.get("FileType") == "Snapshot"
    from_odm = _odm_items(odm_bytes)
    from_lineage = {(i["study_event_oid"], i["study_event_repeat_key"], i["form_oid"], i["item_group_oid"],
                     i["item_group_repeat_key"], i["item_oid"], i["value"], i["source_id"])
                    for i in lineage_json["items"]}
    assert len(from_lineage) == len(lineage_json["items"])
    assert len(from_odm) == sum(1 for _ in root.iter(f"{ODM}ItemData"))
    assert from_odm == from_lineage


def test_demo_update_file_lineage_matches_odm():
    f = REPO / "config" / "demo_data" / "updates" / "03_arla_week12_labs.json"
    base = ["map", "--study", "CV01", "--subject-key", "002-0001", "--site", "SITE.002", "--day1", "2019-03-26"]
    lin = esource(*base, "--format", "lineage", f)
    odm = esource(*base, f)
    assert lin.returncode == odm.returncode == 0
    items = json.loads(lin.stdout)["items"]
    assert items
    assert _odm_items(odm.stdout) == {(i["study_event_oid"], i["study_event_repeat_key"], i["form_oid"],
                                       i["item_group_oid"], i["item_group_repeat_key"], i["item_oid"], i["value"],
                                       i["source_id"]) for i in items}


# ---------------------------------------------------------------- errors


def _deep(n: int) -> bytes:
    return b'{"resourceType":"Observation","extension":' + b"[" * n + b"]" * n + b"}"


@pytest.mark.parametrize("name,content,phrase", [
    ("latin1.json", '{"resourceType":"Patient","name":[{"family":"Müller"}]}'.encode("latin-1"), "UTF-8"),
    ("broken.json", b'{"resourceType": "Patient", ', "JSON"),
    ("norestype.json", b'{"id": "x", "status": "final"}', "resourceType"),
    ("array.json", b'[{"resourceType": "Patient"}]', "JSON object"),
    ("deep.json", _deep(200), "nested deeper"),
    ("empty.json", b"", "empty"),
])
def test_unusable_input_exits_2_with_one_line_naming_the_file(tmp_path, name, content, phrase):
    f = tmp_path / name
    f.write_bytes(content)
    p = esource(*ARGS, f)
    assert p.returncode == 2
    assert p.stdout == b""
    err = p.stderr.decode()
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert str(f) in err
    assert phrase in err
    assert "Traceback" not in err


def test_missing_file_exits_2(tmp_path):
    p = esource(*ARGS, tmp_path / "nope.json")
    assert p.returncode == 2 and p.stderr.decode().count("\n") == 1 and "nope.json" in p.stderr.decode()


def test_one_bad_file_among_good_ones_names_the_bad_one(tmp_path, sample):
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff\xfe garbage")
    p = esource(*ARGS, sample, bad)
    assert p.returncode == 2 and "bad.json" in p.stderr.decode() and "sample.json" not in p.stderr.decode()


def test_an_invalid_resource_in_a_bundle_is_a_discrepancy_and_exit_0(tmp_path):
    good = obs(HR, 70, "/min", day(29))
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": good},
        {"resource": {"id": "no-type", "status": "final"}},
        {"resource": obs(GLUC, "abc", "mmol/L", day(1))},
        {"resource": {"resourceType": "NotAType"}},
        "not an object",
    ]}
    f = tmp_path / "mixed.json"
    f.write_bytes(orjson.dumps(bundle))
    p = esource(*ARGS, "--format", "lineage", f)
    assert p.returncode == 0, p.stderr.decode()
    data = json.loads(p.stdout)
    got = {(i["study_event_oid"], i["item_group_repeat_key"], i["item_oid"]): i["value"] for i in data["items"]}
    assert got[("SE.WEEK4", "HR", "IT.VS.VSORRES")] == "70"
    kinds = sorted(d["kind"] for d in data["discrepancies"])
    assert kinds == ["invalid_source"] * 4
    assert sum("mixed.json" in d["message"] for d in data["discrepancies"]) == 3


@pytest.mark.parametrize("extra,phrase", [
    (["--day1", "2024-13-01"], "--day1"),
    (["--subject-key", "7"], "SubjectKey"),
    (["--site", "SITE.999"], "SITE.999"),
    (["--consent", "2024-02-01"], "consent"),
])
def test_bad_options_exit_2(sample, extra, phrase):
    args = list(ARGS)
    for i in range(0, len(extra), 2):
        if extra[i] in args:
            args[args.index(extra[i]) + 1] = extra[i + 1]
        else:
            args += extra[i:i + 2]
    p = esource(*args, sample)
    assert p.returncode == 2 and phrase in p.stderr.decode() and p.stderr.decode().count("\n") == 1
