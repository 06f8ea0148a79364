"""Inputs that look almost right: a decimal sent as a JSON string, and resource ids that embed the
Patient's id (which never leaves the hospital, not even in the lineage export)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import orjson

from engine_helpers import day, kinds, obs, patient

REPO = Path(__file__).resolve().parents[2]


def test_decimal_as_json_string_is_an_invalid_source_and_held(run):
    r = run([patient(), obs("8480-6", "120", "mm[Hg]", day(1, "09:00:00"))])
    assert "invalid_source" in kinds(r)
    assert not any(i.key.item_oid == "IT.VS.VSORRES" for i in r.items)
    (d,) = [d for d in r.discrepancies if d.kind.value == "invalid_source"]
    assert "not a JSON number" in d.message and d.study_event_oid == "SE.BASELINE"


def test_lineage_never_shows_a_patient_id_embedded_in_other_ids(tmp_path):
    p = patient(pid="MRN0042")
    o = obs("8867-4", 72, "/min", day(1, "09:00:00"))
    o["id"] = "MRN0042-hr-1"
    f = tmp_path / "b.json"
    f.write_bytes(orjson.dumps({"resourceType": "Bundle", "type": "collection",
                                "entry": [{"fullUrl": f"urn:uuid:{i}", "resource": r} for i, r in enumerate([p, o])]}))
    out = subprocess.run([str(Path(sys.executable).parent / "esource"), "map", "--study", "CV01", "--subject-key",
                          "001-0001", "--site", "SITE.001", "--day1", "2024-01-01", "--format", "lineage", str(f)],
                         capture_output=True, text=True, check=True).stdout
    assert "MRN0042" not in out
    doc = json.loads(out)
    hr = [i for i in doc["items"] if i["item_oid"] == "IT.VS.VSORRES"]
    assert hr and hr[0]["source"]["id"].startswith("Observation:") and hr[0]["source"]["id_pseudonymised"]
