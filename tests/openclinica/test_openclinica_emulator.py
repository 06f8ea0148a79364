"""The OpenClinica 4 emulator over real HTTP on loopback: OC's import API shapes (multipart or raw
upload -> "job uuid: ...", the job poll and its CSV log, the job list), the job lifecycle, per-item
results (Inserted / Updated / No Change / Failed, partial success), OC's validation, read-back,
hostile and invalid files, strictness switches, fault injection and the test hooks."""

from __future__ import annotations

import csv
import io
import time

import httpx
import pytest
from openclinica_helpers import A, B
from lxml import etree
from openclinica_helpers import MDV, OC, ODM, STUDY, TOKEN, odm_values, replace_value

from esource.connectors.emulators.openclinica_odm import (
    LOG_COLUMNS,
    FaultRequest,
    _without_oc_extensions,
    check_value,
    create_openclinica_app,
)
from esource.odm.xsd import validate_odm

AUTH = {"Authorization": f"Bearer {TOKEN}"}
IMPORT = "/OpenClinica/pages/auth/api/clinicaldata/import"


def submit(oc, odm: bytes, *, name: str = "import.xml", headers: dict | None = None) -> httpx.Response:
    return httpx.post(oc.root + IMPORT, files={"file": (name, odm, "text/xml")},
                      headers=AUTH if headers is None else headers, timeout=5)


def job_of(r: httpx.Response) -> str:
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), (r.status_code, r.text)
    assert r.text.startswith("job uuid: ")
    return r.text.removeprefix("job uuid: ").strip()


def poll(oc, job: str) -> httpx.Response:
    return httpx.get(f"{oc.root}/OpenClinica/pages/auth/api/jobs/{job}/downloadFile", headers=AUTH, timeout=5)


def wait_log(oc, job: str, timeout: float = 5.0) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    while True:
        r = poll(oc, job)
        if r.text != "errorCode.jobInProgress":
            assert r.status_code == 200 and r.text.startswith("SubjectKey,"), r.text
            return list(csv.DictReader(io.StringIO(r.text.strip())))
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.01)


def import_and_wait(oc, odm: bytes) -> list[dict[str, str]]:
    return wait_log(oc, job_of(submit(oc, odm)))


def jobs(oc) -> list[dict]:
    r = httpx.get(f"{oc.root}/OpenClinica/pages/auth/api/studies/{STUDY}/jobs", headers=AUTH, timeout=5)
    assert r.status_code == 200
    return r.json()


def read(oc, subject: str, fmt: str = "xml", event: str = "*", form: str = "*") -> httpx.Response:
    return httpx.get(f"{oc.root}/OpenClinica/rest/clinicaldata/{fmt}/view/{STUDY}/{subject}/{event}/{form}",
                     params={"includeDNs": "n", "includeAudits": "n"}, headers=AUTH, timeout=5)


def statuses(log: list[dict[str, str]]) -> dict[str, str]:
    return {f"{r['ItemGroupOID']}[{r['ItemGroupRepeatKey']}]/{r['ItemOID']}": r["Status"] for r in log}


# ------------------------------------------------------------------------------------------ job lifecycle


def test_import_is_a_job_that_runs_later_and_logs_every_item(make_oc, rows):
    oc = make_oc(job_seconds=0.3)
    job = job_of(submit(oc, rows[(A, 1)].odm, name="esource_CV01_001-0001_000001.xml"))
    r = poll(oc, job)
    assert (r.status_code, r.text) == (200, "errorCode.jobInProgress")
    [listed] = jobs(oc)
    assert listed["uuid"] == job and listed["status"] == "IN_PROGRESS" and listed["type"] == "XML_IMPORT"
    assert listed["sourceFileName"] == "esource_CV01_001-0001_000001.xml" and listed["dateCompleted"] is None
    assert oc.edc.items(STUDY, A) == []  # nothing applied while the job waits

    log = wait_log(oc, job)
    r = poll(oc, job)
    assert r.headers["content-type"].startswith("application/force-download")
    assert "attachment; filename=" in r.headers["content-disposition"]
    assert r.text.splitlines()[0] == ",".join(LOG_COLUMNS)
    assert {row["Status"] for row in log} == {"Inserted"} and len(log) == 7
    first = log[0]
    assert (first["SubjectKey"], first["ParticipantID"], first["StudyEventOID"], first["StudyEventRepeatKey"]) == \
        ("SS_0010001", A, "SE.SCREEN", "1")
    assert first["Timestamp"].endswith("Z") and first["Message"] == ""
    weight = next(row for row in log if row["ItemOID"] == "IT.VS.VSORRES")
    assert (weight["FormOID"], weight["ItemGroupOID"], weight["ItemGroupRepeatKey"]) == ("F.VS", "IG.VS", "WEIGHT")
    [done] = jobs(oc)
    assert done["status"] == "COMPLETED" and done["dateCompleted"]
    assert oc.edc.write_count() == 1

    # the log can be opened in the browser too (?open=true), and a job can be deleted
    r = httpx.get(f"{oc.root}/OpenClinica/pages/auth/api/jobs/{job}/downloadFile", params={"open": "true"},
                  headers=AUTH, timeout=5)
    assert r.headers["content-type"].startswith("text/plain") and "content-disposition" not in r.headers
    assert httpx.delete(f"{oc.root}/OpenClinica/pages/auth/api/jobs/{job}", headers=AUTH, timeout=5).status_code == 200
    r = poll(oc, job)
    assert (r.status_code, r.text) == (404, "errorCode.invalidUuid")
    assert (poll(oc, "no-such-job").status_code, poll(oc, "no-such-job").text) == (404, "errorCode.invalidUuid")


def test_raw_xml_body_is_accepted_and_jobs_run_in_order(oc, rows):
    """OC reads the request content when no file is attached; jobs apply in submission order."""
    j1 = job_of(httpx.post(oc.root + IMPORT, content=rows[(A, 1)].odm,
                           headers={**AUTH, "Content-Type": "application/xml"}, timeout=5))
    j2 = job_of(submit(oc, rows[(A, 2)].odm))
    wait_log(oc, j1)
    assert statuses(wait_log(oc, j2)) == {"IG.VS[WEIGHT]/IT.VS.VSORRES": "Updated"}
    assert odm_values(read(oc, A).content)[("SE.BASELINE", "1", "F.VS", "IG.VS", "WEIGHT", "IT.VS.VSORRES")] == "71.0"


def test_reimporting_the_same_values_answers_no_change_and_changes_nothing(oc, rows):
    first = import_and_wait(oc, rows[(A, 1)].odm)
    again = import_and_wait(oc, rows[(A, 1)].odm)
    assert {r["Status"] for r in first} == {"Inserted"}
    assert {r["Status"] for r in again} == {"No Change"} and all(r["Timestamp"] == "" for r in again)
    assert len(oc.edc.items(STUDY, A)) == 7  # no duplicate values
    assert oc.edc.write_count() == 1  # the No Change job changed nothing
    assert [a["action"] for a in oc.edc.audit(STUDY)] == ["Inserted"] * 7
    update = import_and_wait(oc, rows[(A, 2)].odm)
    assert statuses(update) == {"IG.VS[WEIGHT]/IT.VS.VSORRES": "Updated"}
    assert oc.edc.write_count() == 2


# ------------------------------------------------------------------------------------------ per-item results


def test_a_value_failing_its_type_fails_that_item_only_partial_success(oc, rows):
    odm = replace_value(rows[(A, 1)].odm, "IT.VS.VSORRES", "seventy")
    log = import_and_wait(oc, odm)
    by_item = {r["ItemOID"]: r for r in log}
    assert by_item["IT.VS.VSORRES"]["Status"] == "Failed"
    assert by_item["IT.VS.VSORRES"]["Message"] == "errorCode.valueTypeMismatch"
    assert {r["Status"] for oid, r in by_item.items() if oid != "IT.VS.VSORRES"} == {"Inserted"}
    held = {i["item"] for i in oc.edc.items(STUDY, A)}
    assert "IT.VS.VSORRES" not in held and {"IT.VS.VSTESTCD", "IT.DM.SEX"} <= held
    assert oc.edc.write_count() == 1  # the job applied the other items


@pytest.mark.parametrize("item, value, code", [
    ("IT.VS.VSORRES", "-1.5", "errorCode.valueTypeMismatch"),  # OC 4's REAL check: \d+(\.\d+)? (no sign)
    ("IT.VS.VSORRES", "1e3", "errorCode.valueTypeMismatch"),
    ("IT.DM.BRTHYR", "1961.5", "errorCode.valueTypeMismatch"),  # integer
    ("IT.DM.SEX", "X", "errorCode.valueChoiceCodeNotFound"),  # code list
    ("IT.VS.VSORRES", None, "errorCode.missingValue"),  # IsNull: OC cannot import "no value"
    ("IT.VS.VSORRES", "9" * 4000, "errorCode.valueTooLong"),
])
def test_ocs_item_checks(oc, rows, item, value, code):
    log = import_and_wait(oc, replace_value(rows[(A, 1)].odm, item, value))
    [failed] = [r for r in log if r["Status"] == "Failed"]
    assert (failed["ItemOID"], failed["Message"]) == (item, code)
    assert sum(r["Status"] == "Inserted" for r in log) == 6


def test_check_value_follows_oc4():
    assert check_value("REAL", "70.5") is None and check_value("REAL", "72") is None
    assert check_value("REAL", "-1") == "errorCode.valueTypeMismatch"
    assert check_value("INT", "-12") is None and check_value("INT", "2147483648") == "errorCode.valueTypeMismatch"
    assert check_value("DATE", "2024-05-01") is None
    assert check_value("DATE", "2024-02-30") == "errorCode.invalidDateFormat"
    assert check_value("DATE", "2024-5-1") == "errorCode.invalidDateFormat"
    assert check_value("BL", "true") is None and check_value("BL", "yes") == "errorCode.valueTypeMismatch"
    assert check_value("ST", "anything") is None


def test_oids_outside_the_design_fail_their_level_and_skip_what_is_below(oc, rows):
    odm = rows[(A, 1)].odm.replace(b'ItemOID="IT.VS.VSTIM"', b'ItemOID="IT.VS.NOPE"')
    odm = odm.replace(b'StudyEventOID="SE.SCREEN"', b'StudyEventOID="SE.NOPE"')
    log = import_and_wait(oc, odm)
    failed = {(r["StudyEventOID"], r["ItemOID"]): r["Message"] for r in log if r["Status"] == "Failed"}
    assert failed == {("SE.NOPE", ""): "errorCode.invalidStudyEventOID", ("SE.BASELINE", "IT.VS.NOPE"):
                      "errorCode.itemNotFound"}
    assert sum(r["Status"] == "Inserted" for r in log) == 4  # the weight group's other items


def test_oids_are_upper_cased_as_oc_does(oc, rows):
    log = import_and_wait(oc, rows[(A, 2)].odm.replace(b'ItemOID="IT.VS.VSORRES"', b'ItemOID="it.vs.vsorres"'))
    assert [(r["ItemOID"], r["Status"]) for r in log] == [("IT.VS.VSORRES", "Inserted")]


# ------------------------------------------------------------------------------------------ invalid and hostile files


def test_hostile_and_broken_xml_are_refused_before_any_job(oc, rows):
    bomb = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
            b'<ODM xmlns="http://www.cdisc.org/ns/odm/v1.3">&lol2;</ODM>')
    for body in (bomb, b"<ODM><ClinicalData", b"not xml at all"):
        r = submit(oc, body)
        assert r.status_code == 415 and r.text.startswith("errorCode.invalidXMLFile"), r.text
    assert "DOCTYPE" in submit(oc, bomb).text
    assert oc.job_count() == 0


def test_a_file_oc_cannot_use(oc, rows):
    r = submit(oc, rows[(A, 1)].odm, name="import.txt")
    assert (r.status_code, r.text) == (415, "errorCode.fileFormatNotSupported")
    r = httpx.post(oc.root + IMPORT, files={"other": ("a.xml", rows[(A, 1)].odm, "text/xml")}, headers=AUTH, timeout=5)
    assert r.status_code == 400
    r = submit(oc, rows[(A, 1)].odm.replace(b'StudyOID="CV01"', b'StudyOID="XX99"'))
    assert (r.status_code, r.text) == (404, "errorCode.studyNotExist")
    assert oc.job_count() == 0


def test_an_xsd_invalid_file_fails_its_job_and_applies_nothing(oc, rows):
    odm = rows[(A, 1)].odm.replace(b'<FormData FormOID="F.VS"', b'<FormData Bogus="1" FormOID="F.VS"')
    assert validate_odm(odm)
    job = job_of(submit(oc, odm))
    assert oc.edc.wait_idle()
    r = poll(oc, job)
    assert (r.status_code, r.text) == (200, "errorCode.noLogFileFound")
    [listed] = jobs(oc)
    assert listed["status"] == "FAILED" and "Bogus" in listed["failureMessage"]
    assert oc.edc.items(STUDY, A) == [] and oc.edc.write_count() == 0


def test_openclinica_extension_attributes_are_part_of_the_dialect(oc, rows):
    odm = rows[(A, 1)].odm.replace(b'<SubjectData SubjectKey="001-0001"',
                                   b'<SubjectData xmlns:OpenClinica="http://www.openclinica.org/ns/odm_ext_v130/v3.1" '
                                   b'SubjectKey="SS_0010001" OpenClinica:StudySubjectID="001-0001"')
    assert validate_odm(odm) and validate_odm(_without_oc_extensions(odm)) == []
    log = import_and_wait(oc, odm)
    assert {r["Status"] for r in log} == {"Inserted"} and {r["ParticipantID"] for r in log} == {A}


# ------------------------------------------------------------------------------------------ strictness switches


def test_strict_repeat_keys_refuse_esources_text_keys_as_oc4_does(make_oc, rows):
    """OC 4 wants integer ItemGroupRepeatKeys: esource's "WEIGHT" is refused (errorCode.invalidRepeatKey)."""
    oc = make_oc(strict_repeat_keys=True)
    log = import_and_wait(oc, rows[(A, 1)].odm)
    vs = [r for r in log if r["ItemGroupOID"] == "IG.VS"]
    assert [(r["Status"], r["Message"], r["ItemOID"]) for r in vs] == [("Failed", "errorCode.invalidRepeatKey", "")]
    assert {r["Status"] for r in log if r["ItemGroupOID"] == "IG.DM"} == {"Inserted"}
    assert {r["Status"] for r in import_and_wait(
        oc, rows[(A, 1)].odm.replace(b'ItemGroupRepeatKey="WEIGHT"', b'ItemGroupRepeatKey="1"'))} == \
        {"Inserted", "No Change"}
    log = import_and_wait(oc, rows[(A, 1)].odm.replace(b'ItemGroupRepeatKey="WEIGHT"', b'ItemGroupRepeatKey="5"'))
    assert [r["Message"] for r in log if r["ItemGroupOID"] == "IG.VS"] == ["errorCode.repeatKeyTooLarge"]


def test_participants_must_exist_without_auto_enrolment(make_oc, rows):
    oc = make_oc(auto_enroll=False)
    log = import_and_wait(oc, rows[(A, 1)].odm)
    assert [(r["SubjectKey"], r["Status"], r["Message"]) for r in log] == \
        [("001-0001", "Failed", "errorCode.participantNotFound")]
    r = httpx.post(f"{oc.root}/_test/participants", json={"study": STUDY, "subject": A, "site": "SITE.001"}, timeout=5)
    assert r.json() == {"subject": A, "oid": "SS_0010001"}
    assert {r["Status"] for r in import_and_wait(oc, rows[(A, 1)].odm)} == {"Inserted"}


# ------------------------------------------------------------------------------------------ read-back


def test_read_back_shows_ocs_view_of_the_subject(oc, rows):
    import_and_wait(oc, rows[(A, 1)].odm)
    import_and_wait(oc, rows[(A, 3)].odm)
    r = read(oc, A)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/xml")
    root = etree.fromstring(r.content)
    sd = root.find(f"{ODM}ClinicalData/{ODM}SubjectData")
    assert (sd.get("SubjectKey"), sd.get(f"{OC}StudySubjectID")) == ("SS_0010001", A)
    assert root.find(f"{ODM}ClinicalData").get("MetaDataVersionOID") == MDV
    values = odm_values(r.content)
    assert values[("SE.BASELINE", "1", "F.VS", "IG.VS", "HEIGHT", "IT.VS.VSORRES")] == "170.0"
    assert values[("SE.SCREEN", "1", "F.DM", "IG.DM", "1", "IT.DM.SEX")] == "F"  # OC's ordinal 1
    assert validate_odm(_without_oc_extensions(r.content)) == []
    assert read(oc, "SS_0010001").content.count(b"<ItemData") == 12  # by participant OID too
    assert set(odm_values(read(oc, A, event="SE.SCREEN").content)) == {k for k in values if k[0] == "SE.SCREEN"}
    as_json = read(oc, A, "json").json()
    subject = as_json["ClinicalData"]["SubjectData"]
    assert subject["@OpenClinica:StudySubjectID"] == A and len(subject["StudyEventData"]) == 2
    r = read(oc, B)
    assert r.status_code == 404 and r.json()["error"] == "NotFound"
    r = httpx.get(f"{oc.root}/OpenClinica/rest/metadata/xml/view/{STUDY}/*/*", headers=AUTH, timeout=5)
    assert r.status_code == 200 and b"<StudyEventDef" in r.content


# ------------------------------------------------------------------------------------------ authentication


def test_every_api_wants_the_bearer_token(oc, rows):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        assert submit(oc, rows[(A, 1)].odm, headers=headers).status_code == 401
        api = f"{oc.root}/OpenClinica/pages/auth/api"
        assert httpx.get(f"{api}/jobs/x/downloadFile", headers=headers).status_code == 401
        assert httpx.get(f"{api}/studies/{STUDY}/jobs", headers=headers).status_code == 401
        r = httpx.get(f"{oc.root}/OpenClinica/rest/clinicaldata/xml/view/{STUDY}/{A}/*/*", headers=headers)
        assert (r.status_code, r.json()) == (401, {"error": "NoAccessRight"})
    assert oc.job_count() == 0


# ------------------------------------------------------------------------------------------ faults


@pytest.mark.parametrize("mode, status", [("500", 500), ("503", 503), ("429", 429), ("auth", 401)])
def test_http_faults_before_and_after_commit(oc, rows, mode, status):
    oc.faults(mode=mode, retry_after=2)
    r = submit(oc, rows[(A, 1)].odm)
    assert r.status_code == status and oc.job_count() == 0
    if mode in ("503", "429"):
        assert r.headers["retry-after"] == "2"
    oc.faults(mode=mode, after_commit=True)
    r = submit(oc, rows[(A, 1)].odm)
    assert r.status_code == status and "WAS created" in r.text
    assert oc.edc.wait_idle() and oc.edc.write_count() == 1  # the job ran all the same
    assert job_of(submit(oc, rows[(A, 1)].odm))  # the plan is used up


def test_timeout_reset_and_slow(oc, rows):
    oc.faults(mode="timeout", delay=0.6)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(oc.root + IMPORT, files={"file": ("a.xml", rows[(A, 1)].odm, "text/xml")}, headers=AUTH, timeout=0.3)
    oc.faults(mode="reset", after_commit=True)
    with pytest.raises(httpx.TransportError):
        submit(oc, rows[(A, 1)].odm)
    assert oc.edc.wait_idle() and oc.edc.write_count() == 1
    oc.faults(mode="slow", delay=0.2)
    assert job_of(submit(oc, rows[(B, 1)].odm))  # answered, late
    assert httpx.get(f"{oc.root}/_faults").json()["injected"].get("import:slow") == 1
    time.sleep(0.65)  # the timed-out request finishes on the server: no job was created for it
    assert oc.edc.wait_idle() and oc.job_count() == 2


def test_job_level_faults(oc, rows):
    oc.faults(mode="job_stuck", delay=0.4)
    stuck = job_of(submit(oc, rows[(A, 1)].odm))
    time.sleep(0.1)
    assert poll(oc, stuck).text == "errorCode.jobInProgress"
    assert {r["Status"] for r in wait_log(oc, stuck)} == {"Inserted"}

    oc.faults(mode="job_failed", message="java.lang.NullPointerException")
    failed = job_of(submit(oc, rows[(A, 2)].odm))
    assert oc.edc.wait_idle()
    assert poll(oc, failed).text == "errorCode.noLogFileFound"
    assert {j["uuid"]: j.get("failureMessage") for j in jobs(oc)}[failed] == "java.lang.NullPointerException"
    assert oc.edc.items(STUDY, A)[3]["value"] == "70.5"  # the Update was not applied

    oc.faults(mode="reject")
    log = import_and_wait(oc, rows[(B, 1)].odm)
    assert [(r["FormOID"], r["Status"], r["Message"], r["ItemOID"]) for r in log] == [
        ("F.DM", "Failed", "errorCode.formAlreadyComplete", ""),
        ("F.VS", "Failed", "errorCode.formAlreadyComplete", "")]
    assert oc.edc.items(STUDY, B) == []


def test_faults_on_polls_and_reads(oc, rows):
    job = job_of(submit(oc, rows[(A, 1)].odm))
    oc.faults(mode="503", target="poll", count=2, retry_after=1)
    assert poll(oc, job).status_code == 503 and poll(oc, job).status_code == 503
    assert wait_log(oc, job)
    oc.faults(mode="500", target="read")
    assert read(oc, A).status_code == 500 and read(oc, A).status_code == 200
    state = httpx.get(f"{oc.root}/_faults", timeout=5).json()
    assert state["injected"] == {"poll:503": 2, "read:500": 1}
    with pytest.raises(ValueError, match="target 'import' only"):
        FaultRequest(mode="job_failed", target="poll")
    assert httpx.post(f"{oc.root}/_faults", json={"mode": "reject", "target": "read"}, timeout=5).status_code == 422


def test_fault_rate_and_seed_are_reproducible(oc, rows):
    oc.faults(mode="500", count=None, rate=0.5, seed=7)
    first = [submit(oc, rows[(A, 2)].odm).status_code for _ in range(8)]
    oc.faults(mode="500", count=None, rate=0.5, seed=7)
    assert [submit(oc, rows[(A, 2)].odm).status_code for _ in range(8)] == first
    assert set(first) == {200, 500}
    oc.clear_faults()
    assert submit(oc, rows[(A, 2)].odm).status_code == 200


# ------------------------------------------------------------------------------------------ test hooks and storage


def test_test_hooks(oc, rows):
    import_and_wait(oc, rows[(A, 1)].odm)
    r = httpx.post(f"{oc.root}/_test/site_edit", json={"study": STUDY, "subject": A, "event": "SE.BASELINE",
                                                         "form": "F.VS", "group": "IG.VS", "group_repeat": "WEIGHT",
                                                         "item": "IT.VS.VSORRES", "value": "99.9"}, timeout=5)
    assert r.status_code == 200 and (r.json()["previous_value"], r.json()["edited_by_site"]) == ("70.5", True)
    items = httpx.get(f"{oc.root}/_test/items", params={"study": STUDY, "subject": A}, timeout=5).json()
    edited = next(i for i in items if i["item"] == "IT.VS.VSORRES")
    assert (edited["value"], edited["edited_by_site"], edited["event_repeat"]) == ("99.9", True, "1")
    assert oc.stats() == {"jobs": {"COMPLETED": 1}, "writes": 1}
    log = import_and_wait(oc, rows[(A, 2)].odm)  # OC has no conflict check: the import overwrites
    assert statuses(log) == {"IG.VS[WEIGHT]/IT.VS.VSORRES": "Updated"}
    assert [a["action"] for a in oc.edc.audit(STUDY)][-2:] == ["SiteEdit", "Updated"]
    assert httpx.get(f"{oc.root}/health", timeout=5).json()["status"] == "ok"


def test_a_file_database_survives_a_restart_and_resumes_its_jobs(tmp_path, design, rows):
    db = tmp_path / "oc.sqlite"
    app = create_openclinica_app(db, token=TOKEN, metadata=design, job_seconds=60)
    edc = app.state.openclinica
    job = edc.submit(STUDY, "SITE.001", rows[(A, 1)].odm, "a.xml")
    edc.close()  # "crash" with the job still IN_PROGRESS
    app = create_openclinica_app(db, token=TOKEN, metadata=design, job_seconds=0)
    edc = app.state.openclinica
    try:
        with edc._lock:  # noqa: SLF001 - the job is due at once after the restart in this test
            edc._db.execute("UPDATE job SET due_at = 0 WHERE uuid = ?", (job,))  # noqa: SLF001
        assert edc.wait_idle()
        assert edc.job(job)["status"] == "COMPLETED" and len(edc.items(STUDY, A)) == 7
    finally:
        edc.close()
    assert (db.parent / "oc.sqlite-wal").exists() or db.exists()
