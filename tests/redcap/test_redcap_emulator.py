"""The REDCap API emulator over real HTTP on loopback, driven by PyCap's own client (and by plain form
posts where PyCap does not expose a status): the project description, record import/export rules,
REDCap's error answers, fault injection, persistence and thread safety."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
import redcap as pycap
import semantic_version
from lxml import etree

from redcap_helpers import STUDY, RedcapServer
from esource.connectors.emulators.redcap_api import (
    DEFAULT_TOKEN,
    NO_PERMISSION,
    REDCAP_VERSION,
    create_redcap_app,
)

R1, R2 = "001-0001", "002-0002"


@pytest.fixture
def proj(redcap) -> pycap.Project:
    return pycap.Project(redcap.api, DEFAULT_TOKEN, timeout=5)


def vs(record: str, instance: int, test: str, value: str, event: str = "se_baseline_arm_1", **more) -> dict:
    return {"record_id": record, "redcap_event_name": event, "redcap_repeat_instrument": "vs",
            "redcap_repeat_instance": instance, "vs_vstestcd": test, "vs_vsorres": value, **more}


def dm(record: str, **values) -> dict:
    return {"record_id": record, "redcap_event_name": "se_screen_arm_1", "redcap_repeat_instrument": "",
            "redcap_repeat_instance": "", **values}


# ------------------------------------------------------------------------------------------ the project


def test_pycap_reads_the_project_description(proj, mapping):
    assert proj.export_version() == semantic_version.Version(REDCAP_VERSION)
    info = proj.export_project_info()
    assert info["is_longitudinal"] == 1 and info["has_repeating_instruments_or_events"] == 1
    assert info["record_autonumbering_enabled"] == 0
    assert proj.def_field == "record_id" and proj.is_longitudinal
    assert {"vs_vsorres", "vs_vstestcd", "dm_sex", "lb_lborres", "cm_cmtrt"} <= set(proj.field_names)
    assert set(proj.forms) == {"dm", "vs", "lb", "mh", "cm"}
    by_name = {f["field_name"]: f for f in proj.export_metadata()}
    assert by_name["vs_vsorres"]["text_validation_type_or_show_slider_number"] == "number"
    assert by_name["dm_brthyr"]["text_validation_type_or_show_slider_number"] == "integer"
    assert by_name["dm_sex"]["field_type"] == "dropdown"
    assert by_name["dm_sex"]["select_choices_or_calculations"].startswith("M, Male | F, Female")
    assert by_name["vs_vsorresu"]["field_type"] == "text"  # "beats/min" is not a REDCap choice code
    assert by_name["vs_vsorres"]["field_annotation"] == "@ODM-OID=IT.VS.VSORRES"
    assert [f["field_name"] for f in proj.export_metadata(forms=["dm"])] == ["record_id", "dm_brthyr", "dm_sex"]

    events = proj.export_events()
    assert [e["unique_event_name"] for e in events] == [
        "se_screen_arm_1", "se_baseline_arm_1", "se_week4_arm_1", "se_week12_arm_1", "se_week24_arm_1",
        "se_unsched_arm_1", "se_common_arm_1"]
    assert events[1]["event_name"] == "Baseline" and events[1]["arm_num"] == 1
    fem = {(m["unique_event_name"], m["form"]) for m in proj.export_instrument_event_mappings()}
    assert ("se_screen_arm_1", "dm") in fem and ("se_baseline_arm_1", "dm") not in fem
    assert ("se_week4_arm_1", "vs") in fem and ("se_week4_arm_1", "lb") not in fem
    repeating = {(r["event_name"], r["form_name"]) for r in proj.export_repeating_instruments_events()}
    assert ("se_baseline_arm_1", "vs") in repeating and ("se_common_arm_1", "cm") in repeating
    assert ("se_screen_arm_1", "dm") not in repeating
    assert {i["instrument_name"] for i in proj.export_instruments()} == {"dm", "vs", "lb", "mh", "cm"}
    assert proj.export_arms() == [{"arm_num": 1, "name": "Arm 1"}]
    assert proj.export_field_names(field="vs_vsorres") == [
        {"original_field_name": "vs_vsorres", "choice_value": "", "export_field_name": "vs_vsorres"}]
    assert proj.export_metadata(format_type="csv").startswith("field_name,form_name,")


def test_a_wrong_token_is_403_with_redcaps_message(redcap):
    r = redcap.post(token="0" * 32, content="version")
    assert r.status_code == 403 and NO_PERMISSION in r.text
    r = redcap.post(token="0" * 32, content="record", format="json", data="[]", returnFormat="json")
    assert r.status_code == 403 and r.json() == {"error": NO_PERMISSION}
    with pytest.raises(redcap_error()) as err:
        redcap_project(redcap, "F" * 32).export_records()
    assert NO_PERMISSION in str(err.value)
    r = redcap.post(content="nonsense", format="json")
    assert r.status_code == 400 and "content" in r.json()["error"]


def redcap_error():
    return pycap.RedcapError


def redcap_project(server: RedcapServer, token: str) -> pycap.Project:
    return pycap.Project(server.api, token, timeout=5)


# ------------------------------------------------------------------------------------------ records


def test_pycap_imports_and_exports_records(proj, redcap):
    rows = [dm(R1, dm_brthyr=1961, dm_sex="F"), vs(R1, 1, "WEIGHT", "70.5", vs_vsorresu="kg"),
            vs(R1, 2, "HEIGHT", "170.0"), dm(R2, dm_sex="M")]
    assert proj.import_records(rows) == {"count": 2}
    assert proj.import_records([vs(R2, 1, "HR", "72")], return_content="ids") == [R2]

    exported = proj.export_records(records=[R1])
    assert [(r["redcap_event_name"], r["redcap_repeat_instrument"], r["redcap_repeat_instance"]) for r in exported] == [
        ("se_screen_arm_1", "", ""), ("se_baseline_arm_1", "vs", 1), ("se_baseline_arm_1", "vs", 2)]
    screen, weight, height = exported
    assert screen["record_id"] == R1 and screen["dm_brthyr"] == "1961" and screen["dm_sex"] == "F"
    assert screen["dm_complete"] == "0" and screen["vs_vsorres"] == ""
    assert weight["vs_vsorres"] == "70.5" and weight["vs_vsorresu"] == "kg" and weight["vs_complete"] == "0"
    assert height["vs_vstestcd"] == "HEIGHT" and height["vs_vsorres"] == "170.0"  # text kept as sent

    only = proj.export_records(records=[R1], fields=["record_id", "vs_vsorres"], events=["se_baseline_arm_1"])
    assert [(r["redcap_repeat_instance"], r["vs_vsorres"]) for r in only] == [(1, "70.5"), (2, "170.0")]
    assert set(only[0]) == {"record_id", "redcap_event_name", "redcap_repeat_instrument", "redcap_repeat_instance",
                            "vs_vsorres"}
    assert {r["record_id"] for r in proj.export_records()} == {R1, R2}
    assert proj.export_records(records=["999-9999"]) == []

    eav = proj.export_records(records=[R2], record_type="eav")
    assert {(e["field_name"], e["value"], e["redcap_repeat_instance"]) for e in eav} >= {
        ("dm_sex", "M", ""), ("vs_vstestcd", "HR", 1), ("vs_vsorres", "72", 1)}
    text = proj.export_records(records=[R1], format_type="csv", fields=["record_id", "vs_vsorres"])
    assert text.splitlines()[0] == "record_id,redcap_event_name,redcap_repeat_instrument,redcap_repeat_instance,vs_vsorres"
    assert "001-0001,se_baseline_arm_1,vs,1,70.5" in text.splitlines()
    labelled = proj.export_records(records=[R1], fields=["record_id", "dm_sex"], raw_or_label="label")
    assert labelled[0]["dm_sex"] == "Female"


def test_csv_eav_and_new_instances(proj, redcap):
    csv_data = "record_id,redcap_event_name,redcap_repeat_instrument,redcap_repeat_instance,vs_vstestcd,vs_vsorres\n" \
               f"{R1},se_week4_arm_1,vs,1,SYSBP,120\n"
    assert proj.import_records(csv_data, import_format="csv") == {"count": 1}
    eav = [{"record": R1, "redcap_event_name": "se_week4_arm_1", "redcap_repeat_instrument": "vs",
            "redcap_repeat_instance": "new", "field_name": "vs_vstestcd", "value": "DIABP"},
           {"record": R1, "redcap_event_name": "se_week4_arm_1", "redcap_repeat_instrument": "vs",
            "redcap_repeat_instance": "new", "field_name": "vs_vsorres", "value": "80"}]
    r = redcap.post(content="record", format="json", type="eav", data=json.dumps(eav), returnFormat="json")
    assert r.status_code == 200 and r.json() == {"count": 1}
    values = redcap.values(R1)
    assert values[("se_week4_arm_1", "vs", 1, "vs_vstestcd")] == "SYSBP"
    assert values[("se_week4_arm_1", "vs", 2, "vs_vstestcd")] == "DIABP"
    assert values[("se_week4_arm_1", "vs", 2, "vs_vsorres")] == "80"
    r = redcap.post(content="record", format="json", data=json.dumps([vs(R1, 1, "SYSBP", "121", "se_week4_arm_1")]),
                    returnContent="count", returnFormat="csv")
    assert r.status_code == 200 and r.text == "count\n1\n"


def test_normal_never_blanks_and_overwrite_does(proj, redcap):
    proj.import_records([dm(R1, dm_brthyr="1961", dm_sex="F"), vs(R1, 1, "WEIGHT", "70.5")])
    proj.import_records([dm(R1, dm_brthyr="", dm_sex="M"), vs(R1, 1, "WEIGHT", "")])  # normal
    values = redcap.values(R1)
    assert values[("se_screen_arm_1", "", None, "dm_brthyr")] == "1961"
    assert values[("se_screen_arm_1", "", None, "dm_sex")] == "M"
    assert values[("se_baseline_arm_1", "vs", 1, "vs_vsorres")] == "70.5"
    proj.import_records([dm(R1, dm_brthyr=""), vs(R1, 1, "WEIGHT", "")], overwrite="overwrite")
    values = redcap.values(R1)
    assert ("se_screen_arm_1", "", None, "dm_brthyr") not in values
    assert ("se_baseline_arm_1", "vs", 1, "vs_vsorres") not in values
    assert values[("se_screen_arm_1", "", None, "dm_sex")] == "M"  # not in the import: untouched
    assert [i["overwrite_behavior"] for i in redcap.imports()] == ["normal", "normal", "overwrite"]
    assert redcap.project.import_count() == 3


@pytest.mark.parametrize("row, field, value, words", [
    (vs(R1, 1, "WEIGHT", "seventy"), "vs_vsorres", "seventy", "does not follow the expected format"),
    (vs(R1, 1, "PULSE", "70"), "vs_vstestcd", "PULSE", "not a valid category for vs_vstestcd"),
    (dm(R1, dm_brthyr="1961.5"), "dm_brthyr", "1961.5", "(integer)"),
    (vs(R1, 1, "WEIGHT", "70", event="se_nowhere_arm_1"), "redcap_event_name", "se_nowhere_arm_1",
     "not a valid unique event name"),
    (vs(R1, 0, "WEIGHT", "70"), "redcap_repeat_instance", "0", "positive integer"),
    ({**dm(R1), "redcap_repeat_instrument": "dm", "redcap_repeat_instance": 1, "dm_sex": "F"},
     "redcap_repeat_instrument", "dm", "not set up as a repeating instrument"),
    ({**dm(R1), "redcap_event_name": "se_baseline_arm_1", "dm_sex": "F"}, "dm_sex", "F", "not designated"),
    ({**dm(R1), "redcap_event_name": "se_baseline_arm_1", "vs_vsorres": "70"}, "vs_vsorres", "70",
     "give redcap_repeat_instrument"),
    ({**vs(R1, 1, "WEIGHT", "70"), "lb_lborres": "5"}, "lb_lborres", "5", "not on the repeating instrument vs"),
])
def test_validation_errors_name_record_field_and_value_and_keep_nothing(proj, redcap, row, field, value, words):
    good = dm(R2, dm_sex="F")
    with pytest.raises(pycap.RedcapError) as err:
        proj.import_records([good, row])
    message = err.value.args[0]["error"]
    assert f'"{R1}","{field}","{value}"' in message and words in message
    r = redcap.post(content="record", format="json", data=json.dumps([good, row]), returnFormat="json")
    assert r.status_code == 400 and r.json()["error"] == message
    assert redcap.items() == [] and redcap.project.import_count() == 0  # all or nothing


def test_unknown_fields_and_bad_data(proj, redcap):
    with pytest.raises(pycap.RedcapError) as err:
        proj.import_records([dm(R1, dm_sex="F", dm_height="170")])
    assert "not found in the project as real data fields: dm_height" in err.value.args[0]["error"]
    r = redcap.post(content="record", format="json", data="[{not json", returnFormat="json")
    assert r.status_code == 400 and "not formatted correctly" in r.json()["error"]
    r = redcap.post(content="record", format="json", data="[]", overwriteBehavior="sometimes", returnFormat="json")
    assert r.status_code == 400 and "overwriteBehavior" in r.json()["error"]
    r = redcap.post(content="record", format="json", data=json.dumps([{"dm_sex": "F"}]), returnFormat="json")
    assert r.status_code == 400 and "record ID field (record_id) is missing" in r.json()["error"]
    r = redcap.post(content="record", format="json", data="[]", forceAutoNumber="true", returnFormat="json")
    assert r.status_code == 400 and "auto-numbering" in r.json()["error"]
    r = redcap.post(content="record", format="json", data="[]", returnFormat="xml")
    assert r.status_code == 200 and "<count>0</count>" in r.text


def test_delete_records(proj, redcap):
    proj.import_records([dm(R1, dm_sex="F"), dm(R2, dm_sex="M")])
    assert proj.delete_records([R1]) == 1
    assert {r["record_id"] for r in proj.export_records()} == {R2}
    with pytest.raises(pycap.RedcapError):
        proj.delete_records(["404-0404"])


def test_project_xml_exports_the_odm_flavour_and_odm_imports_it_back(proj, redcap, mapping):
    proj.import_records([dm(R1, dm_sex="F"), vs(R1, 1, "WEIGHT", "70.5"), vs(R1, 2, "HEIGHT", "170.0")])
    r = redcap.post(content="project_xml", returnMetadataOnly="false")
    assert r.status_code == 200
    root = etree.fromstring(r.content)
    ns = {"o": "http://www.cdisc.org/ns/odm/v1.3", "redcap": "https://projectredcap.org"}
    assert root.get("ODMVersion") == "1.3.1" and root.get("SourceSystem") == "REDCap"
    mdv = root.find("o:Study/o:MetaDataVersion", ns)
    assert mdv.get("{https://projectredcap.org}RecordIdField") == "record_id"
    uniq = [e.get("{https://projectredcap.org}UniqueEventName") for e in mdv.findall("o:StudyEventDef", ns)]
    assert uniq == list(mapping.events.values())
    item = mdv.find("o:ItemDef[@OID='vs_vsorres']", ns)
    assert item.get("{https://projectredcap.org}TextValidationType") == "float"
    forms = root.findall(".//o:SubjectData[@SubjectKey='001-0001']/o:StudyEventData/o:FormData", ns)
    assert [(f.get("FormOID"), f.get("FormRepeatKey")) for f in forms] == [("Form.dm", "1"), ("Form.vs", "1"),
                                                                          ("Form.vs", "2")]
    # the same ODM imported into another (empty) project gives the same data
    other = RedcapServer(create_redcap_app(None, project_xml_metadata=mapping)).start()
    try:
        answer = other.post(content="record", format="odm", data=r.text, returnFormat="json")
        assert answer.status_code == 200 and answer.json() == {"count": 1}
        assert other.values(R1) == redcap.values(R1)
    finally:
        other.stop()
        other.app.state.redcap.close()
    meta_only = redcap.post(content="project_xml", returnMetadataOnly="true").text
    assert "ClinicalData" not in meta_only


# ------------------------------------------------------------------------------------------ faults


def test_faults_hit_record_imports_with_redcaps_answers(redcap):
    data = json.dumps([dm(R1, dm_sex="F")])
    redcap.faults(mode="503", retry_after=7, count=1)
    assert redcap.post(content="version").status_code == 200  # not a write: no fault
    r = redcap.post(content="record", format="json", data=data, returnFormat="json")
    assert r.status_code == 503 and r.headers["retry-after"] == "7"
    redcap.faults(mode="reject", count=1)
    r = redcap.post(content="record", format="json", data=data, returnFormat="json")
    assert r.status_code == 400
    assert r.json()["error"].startswith(f'"{R1}","dm_sex","F","This field is located on a form that is locked')
    redcap.faults(mode="auth", count=1)
    r = redcap.post(content="record", format="json", data=data, returnFormat="json")
    assert r.status_code == 403 and r.json() == {"error": NO_PERMISSION}
    assert redcap.items() == [] and redcap.project.import_count() == 0
    redcap.faults(mode="500", after_commit=True, count=1)
    r = redcap.post(content="record", format="json", data=data, returnFormat="json")
    assert r.status_code == 500 and "WAS applied" in r.json()["error"]
    assert redcap.values(R1) == {("se_screen_arm_1", "", None, "dm_sex"): "F"}
    redcap.faults(mode="reset", count=1)
    with pytest.raises(httpx.TransportError):
        redcap.post(content="record", format="json", data=data, returnFormat="json")
    redcap.faults(mode="429", scope="export", count=1, retry_after=0.5)
    r = redcap.post(content="record", format="json", returnFormat="json")
    assert r.status_code == 429 and r.headers["retry-after"] == "0.5"
    state = httpx.get(redcap.url + "/_faults").json()
    assert state["injected"] == {"503": 1, "reject": 1, "auth": 1, "500+after_commit": 1, "reset": 1, "429": 1}
    redcap.clear_faults()
    assert httpx.get(redcap.url + "/_faults").json()["active"] is None


def test_a_timeout_fault_answers_late(redcap):
    redcap.faults(mode="timeout", delay=0.6, after_commit=True)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(redcap.api, data={"token": DEFAULT_TOKEN, "content": "record", "format": "json",
                                     "data": json.dumps([dm(R1, dm_sex="F")])}, timeout=0.3)
    assert redcap.values(R1) == {("se_screen_arm_1", "", None, "dm_sex"): "F"}  # applied before the late answer


# ------------------------------------------------------------------------------------------ site edits, storage


def test_site_edits_are_logged_but_not_api_writes(proj, redcap):
    proj.import_records([vs(R1, 1, "WEIGHT", "70.5")])
    redcap.site_edit(record=R1, redcap_event_name="se_baseline_arm_1", redcap_repeat_instrument="vs",
                     redcap_repeat_instance=1, field_name="vs_vsorres", value="99.9")
    assert redcap.values(R1)[("se_baseline_arm_1", "vs", 1, "vs_vsorres")] == "99.9"
    assert redcap.project.import_count() == 1
    log = httpx.get(redcap.url + "/_test/log", params={"record": R1}).json()
    assert [(e["username"], e["field"], e["old_value"], e["new_value"]) for e in log if e["field"] == "vs_vsorres"] == [
        ("api_user", "vs_vsorres", None, "70.5"), ("site_user", "vs_vsorres", "70.5", "99.9")]
    r = httpx.post(redcap.url + "/_test/site_edit", json={"record": R1, "redcap_event_name": "se_baseline_arm_1",
                                                          "field_name": "vs_vsorres", "value": "1"})
    assert r.status_code == 400 and "give redcap_repeat_instrument" in r.json()["error"]


def test_sqlite_storage_persists_in_wal_mode(tmp_path, mapping):
    db = tmp_path / "redcap.sqlite"
    server = RedcapServer(create_redcap_app(db, project_xml_metadata=mapping)).start()
    try:
        proj = pycap.Project(server.api, DEFAULT_TOKEN, timeout=5)
        proj.import_records([dm(R1, dm_sex="F")])
    finally:
        server.stop()
        server.app.state.redcap.close()
    import sqlite3

    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = create_redcap_app(db, project_xml_metadata=mapping)
    try:
        assert again.state.redcap.export_rows(records=[R1])[0]["dm_sex"] == "F"
        assert again.state.redcap.import_count() == 1
    finally:
        again.state.redcap.close()


def test_concurrent_imports_are_all_applied(redcap):
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            proj = redcap_project(redcap, DEFAULT_TOKEN)
            for i in range(10):
                proj.import_records([vs(f"{n:03d}-{i:04d}", 1, "WEIGHT", f"{70 + i}.5")])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert redcap.project.import_count() == 40 and len(redcap.project.record_ids()) == 40


def test_tokens_must_name_the_projects_study(mapping):
    with pytest.raises(ValueError, match="holds 'CV01'"):
        create_redcap_app(None, tokens={DEFAULT_TOKEN: "OTHER"}, project_xml_metadata=mapping)
    app = create_redcap_app(None, tokens={DEFAULT_TOKEN: STUDY})  # CV01's metadata by default
    try:
        assert app.state.mapping.events["SE.BASELINE"] == "se_baseline_arm_1"
    finally:
        app.state.redcap.close()
