"""The study map is validated when it loads; errors name the file, the line or key, and the problem.
A second study is a second folder: no code change."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pytest

from esource.errors import StudyConfigError
from esource.mapping.engine import MappingEngine
from esource.services.dry_run import adhoc_enrollment, dry_run
from esource.study.study import builtin_maps_dir, load_study

CV01 = builtin_maps_dir() / "CV01"
DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture
def study_copy(tmp_path: Path):
    """A writable copy of CV01 (with the shared templates) to break or extend."""
    shutil.copytree(builtin_maps_dir() / "_cdash", tmp_path / "_cdash")
    shutil.copytree(CV01, tmp_path / "CV01")

    def edit(old: str, new: str, file: str = "map.yaml", count: int = 1) -> Path:
        p = tmp_path / "CV01" / file
        text = p.read_text()
        assert old in text, f"{old!r} not in {file}"
        p.write_text(text.replace(old, new, count))
        return tmp_path / "CV01"

    edit.root = tmp_path  # type: ignore[attr-defined]
    return edit


def line_of(path: Path, needle: str) -> int:
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError(needle)


def test_cv01_loads_and_indexes_every_test_code():
    study = load_study("CV01")
    assert study.oid == "CV01" and study.metadata_version_oid == "MDV.CV01.1"
    loinc = "http://loinc.org"
    assert study.test_index[(loinc, "8480-6")].test_code == "SYSBP"
    assert study.test_index[(loinc, "3091-6")].test_code == "UREAN"
    assert study.test_index[(loinc, "59408-5")].form_oid == "F.VS"
    assert [v.oid for v in study.scheduled_visits("F.LB")] == ["SE.SCREEN", "SE.BASELINE", "SE.WEEK12", "SE.WEEK24"]
    assert study.unscheduled_visit("F.VS").oid == "SE.UNSCHED"


def test_wrong_type_names_file_line_and_key(study_copy):
    d = study_copy("decimals: 2", "decimals: two")
    with pytest.raises(StudyConfigError) as e:
        load_study(d)
    err = e.value
    assert err.file.endswith("map.yaml") and err.key == "forms.F.LB.tests.CREAT.decimals"
    assert err.line == line_of(d / "map.yaml", "decimals: two")
    assert "integer" in str(err)


def test_unknown_key_is_refused(study_copy):
    d = study_copy("    lookback_days: 30", "    lookback_dayz: 30")
    with pytest.raises(StudyConfigError, match="unknown key") as e:
        load_study(d)
    assert e.value.key == "forms.F.CM.lookback_dayz"
    assert e.value.line == line_of(d / "map.yaml", "lookback_dayz")


def test_target_outside_window(study_copy):
    d = study_copy("target: 29", "target: 33")
    with pytest.raises(StudyConfigError, match=r"target day 33 is outside the window \[26, 32\]"):
        load_study(d)


def test_window_over_day_zero_is_refused(study_copy):
    d = study_copy("window: [1, 1],     target: 1", "window: [0, 1],     target: 1")
    with pytest.raises(StudyConfigError, match="day 0"):
        load_study(d)


def test_unknown_template_lists_available_ones(study_copy):
    d = study_copy("template: LB", "template: LAB")
    with pytest.raises(StudyConfigError, match="template 'LAB' not found .*available: CM, DM, LB, MH, VS"):
        load_study(d)


def test_error_in_template_names_the_template_file(study_copy):
    study_copy("  send: [final, amended, corrected]\n", "  send: final\n", file="../_cdash/VS.yaml")
    with pytest.raises(StudyConfigError) as e:
        load_study(study_copy.root / "CV01")
    assert e.value.file.endswith("VS.yaml") and e.value.key == "forms.F.VS.statuses.send"


def test_item_oid_missing_from_metadata(study_copy):
    d = study_copy("result: IT.VS.VSORRES", "result: IT.VS.VSRESULT")
    with pytest.raises(StudyConfigError, match="ItemOID IT.VS.VSRESULT is not defined in the metadata") as e:
        load_study(d)
    assert e.value.key == "forms.F.VS.items.result"


def test_item_in_the_wrong_group(study_copy):
    d = study_copy("result: IT.VS.VSORRES", "result: IT.LB.LBORRES")
    with pytest.raises(StudyConfigError, match="IT.LB.LBORRES is not in item group IG.VS"):
        load_study(d)


def test_data_type_must_fit_the_role(study_copy):
    d = study_copy("date: IT.VS.VSDAT", "date: IT.VS.VSORRES")
    with pytest.raises(StudyConfigError, match="DataType float; the date role writes"):
        load_study(d)


def test_test_code_not_in_codelist(study_copy):
    d = study_copy("      OXYSAT: {codes:", "      SPO2: {codes:")
    with pytest.raises(StudyConfigError, match=r"\['SPO2'\] for IT.VS.VSTESTCD are not in its codelist"):
        load_study(d)


def test_unit_label_not_in_codelist(study_copy):
    d = study_copy('label: "beats/min"', 'label: "bpm"')
    with pytest.raises(StudyConfigError, match=r"\['bpm'\] for IT.VS.VSORRESU are not in its codelist"):
        load_study(d)


def test_route_map_value_not_in_codelist(study_copy):
    study_copy('"26643006": ORAL', '"26643006": PER OS', file="../_cdash/CM.yaml")
    with pytest.raises(StudyConfigError, match=r"PER OS.*IT.CM.CMROUTE"):
        load_study(study_copy.root / "CV01")


def test_decimals_beyond_significant_digits(study_copy):
    d = study_copy("decimals: 2", "decimals: 3")
    with pytest.raises(StudyConfigError, match="CREAT has 3 decimals but IT.LB.LBORRES allows SignificantDigits=2"):
        load_study(d)


def test_visit_forms_must_match_metadata(study_copy):
    d = study_copy("target: 29,     forms: [F.VS]", "target: 29,     forms: [F.VS, F.LB]")
    with pytest.raises(StudyConfigError, match="SE.WEEK4 collects \\['F.VS'\\] in the metadata"):
        load_study(d)


def test_selector_may_not_read_what_never_leaves(study_copy):
    study_copy("  gender: gender", "  gender: name.family", file="../_cdash/DM.yaml")
    with pytest.raises(StudyConfigError, match="reads Patient.name, which never leaves the hospital"):
        load_study(study_copy.root / "CV01")


def test_invalid_fhirpath_is_reported(study_copy):
    study_copy("  interpretation: interpretation.coding.code", "  interpretation: interpretation.where(",
               file="../_cdash/LB.yaml")
    with pytest.raises(StudyConfigError, match="invalid FHIRPath") as e:
        load_study(study_copy.root / "CV01")
    assert e.value.key == "forms.F.LB.select.interpretation"


def test_not_yaml(study_copy):
    d = study_copy("visits:\n", "visits: [\n")
    with pytest.raises(StudyConfigError, match="not valid YAML") as e:
        load_study(d)
    assert e.value.line is not None


def test_a_second_study_needs_no_code_change(study_copy, tmp_path):
    """CV02: a copy of CV01 with a wider Week 4 window — only data files change."""
    root = study_copy.root
    shutil.copytree(root / "CV01", root / "CV02")
    m = root / "CV02" / "map.yaml"
    m.write_text(m.read_text().replace("oid: CV01", "oid: CV02").replace("window: [26, 32],   target: 29",
                                                                          "window: [22, 36],   target: 29"))
    md = root / "CV02" / "metadata.xml"
    md.write_text(md.read_text().replace('OID="CV01"', 'OID="CV02"').replace('StudyOID="CV01"', 'StudyOID="CV02"'))
    study = load_study(root / "CV02")
    assert study.oid == "CV02"
    # a reading on day 23 falls in the wider Week 4 window of CV02 only
    import orjson
    obs = {"resourceType": "Observation", "id": "o1", "status": "final",
           "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
           "effectiveDateTime": "2024-01-23T10:00:00Z",
           "valueQuantity": {"value": 71, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}}
    f = tmp_path / "obs.json"
    f.write_bytes(orjson.dumps(obs))
    # CV01: day 23 is outside Week 4 (26..32), so it is an unscheduled reading (repeat key = its date)
    for s, expected in ((study, {("SE.WEEK4", None, "71")}), (load_study("CV01"), {("SE.UNSCHED", "2024-01-23", "71")})):
        e = adhoc_enrollment(s, "001-0001", "SITE.001", dt.date(2024, 1, 1))
        run = dry_run(s, MappingEngine(s), e, [f])
        got = {(i.key.study_event_oid, i.key.study_event_repeat_key, i.value) for i in run.result.items
               if i.key.item_oid == "IT.VS.VSORRES"}
        assert got == expected
