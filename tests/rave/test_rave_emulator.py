"""The RWS emulator (connectors/emulators/rave_rws.py) over real HTTP, driven by rwslib's own client
(`RWSConnection` + its request and response classes) wherever rwslib has one: if rwslib reads the
answers right, the emulator speaks RWS as rwslib knows it."""

from __future__ import annotations

import base64
import sqlite3
from pathlib import Path

import httpx
import pytest
from lxml import etree
from rwslib import AuthorizationException, RWSConnection
from rwslib.builders import ODM, ClinicalData, FormData, ItemData, ItemGroupData, StudyEventData, SubjectData
from rwslib.rws_requests import (
    ClinicalStudiesRequest,
    PostDataRequest,
    StudyDatasetRequest,
    StudySubjectsRequest,
    SubjectDatasetRequest,
    VersionRequest,
)
from rwslib.rwsobjects import RWSError, RWSErrorResponse, RWSException, RWSPostErrorResponse, RWSPostResponse

from rave_helpers import PASSWORD, USER, RaveServer, odm_of, transaction, vs
from esource.connectors.emulators.rave_rws import RWS_VERSION
from esource.odm.xsd import safe_parse, validate_tree

ODM_NS = "{http://www.cdisc.org/ns/odm/v1.3}"
MDSOL = "{http://www.mdsol.com/ns/odm/metadata}"
EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "edc-api" / "medidata-rws"


def rws(rave: RaveServer, user: str | None = USER, password: str | None = PASSWORD) -> RWSConnection:
    return RWSConnection(rave.url, user, password)


def enrollment(subject: str = "New Subject", *, tt: str = "Insert", whole: bool = False,
               items: dict[str, str] | None = None) -> str:
    """The documented example (insert a subject, two fields of the EN form), built with rwslib."""
    group = ItemGroupData(whole_item_group=whole)
    for oid, value in (items or {"SUBJID": "1", "SUBJINIT": "AAA"}).items():
        group << ItemData(oid, value)
    return str(ODM("test system")(ClinicalData("Mediflex", "DEV")(
        SubjectData("MDSOL", subject, transaction_type=tt)(
            StudyEventData("SUBJECT")(FormData("EN", transaction_type="Update")(group))))))


def post_error(rave: RaveServer, body: str | bytes, conn: RWSConnection | None = None) -> RWSException:
    with pytest.raises(RWSException) as caught:
        (conn or rws(rave)).send_request(PostDataRequest(body))
    return caught.value


def raw_post(rave: RaveServer, body: bytes) -> httpx.Response:
    return rave.http.post("/RaveWebServices/webservice.aspx?PostODMClinicalData", content=body,
                          auth=(USER, PASSWORD), headers={"Content-Type": "text/xml"})


# ------------------------------------------------------------------------------------------ connection


def test_rwslib_builds_its_urls_from_an_http_domain_and_reads_the_version(rave):
    conn = rws(rave)
    assert conn.base_url == f"{rave.url}/RaveWebServices"  # a domain starting with http is kept as is
    version = conn.send_request(VersionRequest())
    assert version == RWS_VERSION and version.count(".") == 2 and version.startswith("1.")
    assert RWSConnection(rave.url).send_request(VersionRequest()) == RWS_VERSION  # no authentication needed


def test_credentials_are_checked_the_way_rwslib_expects(rave):
    with pytest.raises(RWSException) as caught:  # wrong password: the ODM error document, RWS00008
        rws(rave, USER, "wrong").send_request(SubjectDatasetRequest("Mediflex", "DEV", "1"))
    assert isinstance(caught.value.rws_error, RWSError)
    assert caught.value.rws_error.errordescription == "Incorrect login and password combination. [RWS00008]"
    with pytest.raises(AuthorizationException, match="Authorization Header not provided"):
        rws(rave, None, None).send_request(PostDataRequest(enrollment()))
    assert rave.writes() == 0


# ------------------------------------------------------------------------------------------ posting


def test_a_post_is_answered_like_the_documented_response_and_read_back_like_the_dataset_example(rave):
    conn = rws(rave)
    response = conn.send_request(PostDataRequest(enrollment()))
    assert isinstance(response, RWSPostResponse) and response.istransactionsuccessful
    assert (response.subjects_touched, response.folders_touched, response.forms_touched, response.fields_touched,
            response.loglines_touched) == (1, 0, 0, 2, 0)
    assert response.new_records == "" and response.subjects_in_study == 1 and response.subjects_in_study_site == 1
    assert response.referencenumber and response.inboundodmfileoid
    raw = conn.last_result.text
    assert raw.startswith("<Response ReferenceNumber=") and 'SuccessStatistics="Rave objects touched: Subjects=1; ' \
                                                           'Folders=0; Forms=0; Fields=2; LogLines=0"' in raw
    assert conn.last_result.headers["content-type"].startswith("text/xml")

    for kind in ("regular", "raw"):
        text = conn.send_request(SubjectDatasetRequest("Mediflex", "DEV", "New Subject", dataset_type=kind))
        assert text.startswith("\ufeff<?xml")  # the BOM the RWS documentation mentions
        root = safe_parse(text.encode("utf-8"), "dataset")
        assert validate_tree(root) == []  # a Snapshot valid against ODM 1.3.2, like the example
        assert root.get("FileType") == "Snapshot" and root.get("ODMVersion") == "1.3"
        sd = root.find(f"{ODM_NS}ClinicalData/{ODM_NS}SubjectData")
        assert sd.get("SubjectKey") == "New Subject" and sd.find(f"{ODM_NS}SiteRef").get("LocationOID") == "MDSOL"
        fd = sd.find(f"{ODM_NS}StudyEventData/{ODM_NS}FormData")
        assert (fd.get("FormOID"), fd.get("FormRepeatKey")) == ("EN", "1")
        assert {i.get("ItemOID"): i.get("Value") for i in fd.iter(f"{ODM_NS}ItemData")} == {"SUBJID": "1",
                                                                                          "SUBJINIT": "AAA"}
    assert "FormData" not in conn.send_request(SubjectDatasetRequest("Mediflex", "DEV", "New Subject",
                                                                     formoid="AE"))
    nobody = safe_parse(conn.send_request(SubjectDatasetRequest("Mediflex", "DEV", "nobody")).encode(), "x")
    assert nobody.find(f"{ODM_NS}ClinicalData/{ODM_NS}SubjectData") is None  # unknown subject: no SubjectData
    study = conn.send_request(StudyDatasetRequest("Mediflex", "DEV"))
    assert "New Subject" in study and conn.last_result.headers["x-mws-cv-last-updated"]


def test_the_documented_request_payload_is_accepted_verbatim(rave):
    response = rws(rave).send_request(PostDataRequest((EXAMPLES / "rws_post_odm_clinicaldata_request.xml")
                                                      .read_bytes()))
    example = RWSPostResponse((EXAMPLES / "rws_post_odm_clinicaldata_response.xml").read_text())
    assert response.istransactionsuccessful and example.istransactionsuccessful
    assert (response.subjects_touched, response.fields_touched) == (example.subjects_touched, example.fields_touched)
    assert response.inboundodmfileoid == "45b854a7-e170-4ff6-8ce5-f511d72688cb"
    assert rave.values("New Subject", "Mediflex(DEV)") == {("SUBJECT", None, "EN", "EN", None, "SUBJID"): "1",
                                                           ("SUBJECT", None, "EN", "EN", None, "SUBJINIT"): "AAA"}


def test_inserting_a_subject_twice_is_rws00024_and_nothing_else_is_deduplicated(rave):
    conn = rws(rave)
    first = conn.send_request(PostDataRequest(enrollment()))
    error = post_error(rave, enrollment(), conn)
    assert isinstance(error.rws_error, RWSPostErrorResponse)
    assert (error.rws_error.reason_code, error.rws_error.error_client_response_message) == (
        "RWS00024", "Subject already exists.")
    assert error.rws_error.error_origin_location == "/ODM/ClinicalData[1]/SubjectData[1]"
    assert conn.last_result.status_code == 400
    # the same Update twice: two Rave transactions (no idempotency key), the second touching nothing
    update = enrollment(tt="Update", items={"SUBJINIT": "BBB"})
    second = conn.send_request(PostDataRequest(update))
    third = conn.send_request(PostDataRequest(update))
    assert len({first.referencenumber, second.referencenumber, third.referencenumber}) == 3
    assert (second.fields_touched, third.fields_touched, third.subjects_touched) == (1, 0, 0)
    assert rave.writes() == 3


def test_unknown_study_site_and_subject_are_refused_with_their_reason_codes(rave):
    wrong_study = enrollment().replace('StudyOID="Mediflex (DEV)"', 'StudyOID="Nowhere (DEV)"')
    assert post_error(rave, wrong_study).rws_error.reason_code == "RWS00014"
    wrong_site = enrollment().replace('LocationOID="MDSOL"', 'LocationOID="NOSITE"')
    error = post_error(rave, wrong_site)
    assert error.rws_error.reason_code == "RWS00903" and "NOSITE" in error.rws_error.error_client_response_message
    assert post_error(rave, enrollment(tt="Update")).rws_error.reason_code == "RWS00902"
    with pytest.raises(RWSException) as caught:  # a GET for an unknown study: RWSErrorResponse
        rws(rave).send_request(SubjectDatasetRequest("Nowhere", "DEV", "1"))
    assert isinstance(caught.value.rws_error, RWSErrorResponse) and caught.value.rws_error.reasoncode == "RWS00014"
    assert rave.writes() == 0


def test_hostile_broken_and_schema_invalid_xml_get_odm_error_documents(rave):
    bomb = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
            b'<ODM xmlns="http://www.cdisc.org/ns/odm/v1.3">&lol2;</ODM>')
    xxe = (b'<?xml version="1.0"?><!DOCTYPE ODM [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
           b'<ODM xmlns="http://www.cdisc.org/ns/odm/v1.3">&x;</ODM>')
    broken = enrollment()[:-20].encode()
    invalid = enrollment().replace('<ItemData ItemOID="SUBJID" Value="1" />', '<ItemData Value="1" />')
    for body, says in ((bomb, "DOCTYPE"), (xxe, "DOCTYPE"), (broken, "well-formed"), (invalid, "ItemOID")):
        error = post_error(rave, body)
        assert isinstance(error.rws_error, RWSError), body
        assert "[RWS00901]" in error.rws_error.errordescription and says in error.rws_error.errordescription
    assert rave.writes() == 0


def test_rave_repeat_keys_are_integers_and_one_subject_per_request(rave, cv01_metadata):
    tx = transaction("001-0001", vs("001-0001", "SYSBP", "120"), sequence=1, new_subject=True)
    esource_odm = odm_of(tx)  # esource's own ODM: ItemGroupRepeatKey="SYSBP"
    error = post_error(rave, esource_odm)
    assert error.rws_error.reason_code == "RWS00904"
    assert "ItemGroupRepeatKey 'SYSBP'" in error.rws_error.error_client_response_message
    assert error.rws_error.error_origin_location.endswith("/FormData[1]/ItemGroupData[1]")
    two = enrollment().replace("</ClinicalData>", '<SubjectData SubjectKey="Other"><SiteRef LocationOID="MDSOL"/>'
                                                  "</SubjectData></ClinicalData>")
    assert post_error(rave, two).rws_error.reason_code == "RWS00907"
    assert rave.writes() == 0


def test_values_and_oids_are_checked_against_the_crf_version_and_nothing_is_half_applied(rave):
    def one(item: str, value: str, group_repeat: str = "1") -> bytes:
        return odm_of(transaction("001-0001", [*vs("001-0001", "SYSBP", "120"), *vs("001-0001", "DIABP", "80")],
                                  sequence=1, new_subject=True)).replace(b'"SYSBP"', b'"1"').replace(
            b'"DIABP"', b'"2"').replace(b'ItemOID="IT.VS.VSORRES" TransactionType="Insert" Value="80"',
                                        f'ItemOID="{item}" TransactionType="Insert" Value="{value}"'.encode())

    error = post_error(rave, one("IT.VS.VSORRES", "eighty"))  # IT.VS.VSORRES is a float
    assert error.rws_error.reason_code == "RWS00905" and "'eighty'" in error.rws_error.error_client_response_message
    assert post_error(rave, one("IT.VS.NOSUCH", "80")).rws_error.reason_code == "RWS00906"
    assert rave.values("001-0001") == {} and rave.writes() == 0  # the valid first line was not kept either
    response = rws(rave).send_request(PostDataRequest(one("IT.VS.VSORRES", "80")))
    assert response.loglines_touched == 2 and response.fields_touched == 4


def test_specified_items_only_keeps_the_other_fields_and_whole_item_group_blanks_them(rave):
    conn = rws(rave)
    conn.send_request(PostDataRequest(enrollment(items={"SUBJID": "1", "SUBJINIT": "AAA", "AGE": "50"})))
    conn.send_request(PostDataRequest(enrollment(tt="Update", items={"SUBJINIT": "BBB"})))
    held = rave.values("New Subject", "Mediflex(DEV)")
    assert {k[-1]: v for k, v in held.items()} == {"SUBJID": "1", "SUBJINIT": "BBB", "AGE": "50"}
    response = conn.send_request(PostDataRequest(enrollment(tt="Update", whole=True, items={"SUBJINIT": "CCC"})))
    assert response.fields_touched == 3  # one changed, two blanked
    held = rave.values("New Subject", "Mediflex(DEV)")
    assert {k[-1]: v for k, v in held.items()} == {"SUBJINIT": "CCC"}


def test_subject_and_study_lists_parse_with_rwslib(rave):
    conn = rws(rave)
    conn.send_request(PostDataRequest(enrollment("S-1")))
    conn.send_request(PostDataRequest(enrollment("S-2")))
    subjects = conn.send_request(StudySubjectsRequest("Mediflex", "DEV"))
    assert [(s.subjectkey, s.locationoid, s.studyoid) for s in subjects] == [("S-1", "MDSOL", "Mediflex(DEV)"),
                                                                           ("S-2", "MDSOL", "Mediflex(DEV)")]
    studies = {s.oid: s for s in conn.send_request(ClinicalStudiesRequest())}
    assert studies["CV01(PROD)"].isProd() and studies["Mediflex(DEV)"].environment == "DEV"


# ------------------------------------------------------------------------------------------ faults


def test_faults_answer_like_an_overloaded_or_broken_rws(rave):
    conn = rws(rave)
    rave.fault("503", retry_after=7)
    r = raw_post(rave, enrollment().encode())
    assert (r.status_code, r.headers["retry-after"]) == (503, "7")
    rave.fault("429", retry_after=2)
    r = raw_post(rave, enrollment().encode())
    assert (r.status_code, r.headers["retry-after"]) == (429, "2")
    rave.fault("500")
    with pytest.raises(RWSException, match=r"Server Error \(500\)"):
        conn.send_request(PostDataRequest(enrollment()))
    rave.fault("auth")
    assert isinstance(post_error(rave, enrollment()).rws_error, RWSError)
    rave.fault("reject", message="Field not authorised. The form is locked.")
    error = post_error(rave, enrollment(), conn)
    assert (error.rws_error.reason_code, conn.last_result.status_code) == ("RWS00042", 403)
    assert error.rws_error.error_client_response_message.startswith("Field not authorised. The form is locked.")
    rave.fault("reset")
    with pytest.raises(httpx.TransportError):
        raw_post(rave, enrollment().encode())
    assert rave.writes() == 0
    # faults touch clinical-data POSTs only: reads go through
    assert conn.send_request(VersionRequest()) == RWS_VERSION


def test_an_after_commit_fault_applies_the_transaction_then_fails(rave):
    rave.fault("500", after_commit=True)
    r = raw_post(rave, enrollment().encode())
    assert r.status_code == 500
    assert rave.writes() == 1 and len(rave.values("New Subject", "Mediflex(DEV)")) == 2
    assert rave.http.get("/_faults").json()["injected"] == {"500+after_commit": 1}


def test_a_body_over_rws_maximum_request_size_is_refused(rave):
    r = raw_post(rave, b"<ODM>" + b" " * 1_000_001 + b"</ODM>")
    assert r.status_code == 413 and RWSPostErrorResponse(r.text).reason_code == "RWS00908"


def test_rws_unknown_urls_and_methods(rave):
    auth = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
    r = rave.http.get("/RaveWebServices/studies/CV01(PROD)/nothing", headers=auth)
    assert r.status_code == 404 and RWSErrorResponse(r.text).reasoncode == "RWS00055"
    r = rave.http.post("/RaveWebServices/webservice.aspx?postodmclinicaldata", content=enrollment(), headers=auth)
    assert r.status_code == 404  # PostODMClinicalData is case sensitive


# ------------------------------------------------------------------------------------------ storage


def test_sqlite_storage_keeps_everything_across_restarts(tmp_path):
    db = tmp_path / "rave.sqlite"
    first = RaveServer(db_path=db).start()
    try:
        rws(first).send_request(PostDataRequest(enrollment()))
    finally:
        first.stop()
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    second = RaveServer(db_path=db).start()
    try:
        assert second.writes() == 1
        assert len(second.values("New Subject", "Mediflex(DEV)")) == 2
        assert post_error(second, enrollment()).rws_error.reason_code == "RWS00024"
    finally:
        second.stop()


def test_site_edits_are_marked_and_shown_in_the_dataset(rave):
    rws(rave).send_request(PostDataRequest(enrollment()))
    rave.site_edit("New Subject", "SUBJECT", "EN", "EN", "SUBJINIT", "ZZZ", study="Mediflex(DEV)")
    [edited] = [i for i in rave.items("New Subject", "Mediflex(DEV)") if i["item"] == "SUBJINIT"]
    assert edited["value"] == "ZZZ" and edited["edited_by_site"] and edited["reference"] is None
    text = rws(rave).send_request(SubjectDatasetRequest("Mediflex", "DEV", "New Subject"))
    values = {i.get("ItemOID"): i.get("Value") for i in etree.fromstring(text.lstrip("\ufeff").encode()).iter(
        f"{ODM_NS}ItemData")}
    assert values["SUBJINIT"] == "ZZZ"
