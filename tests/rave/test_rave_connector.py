"""RaveConnector (connectors/rave.py) against the RWS emulator over real HTTP, with ODM esource writes
(`write_clinical_data` for precise cases, the real `Processor` + `Dispatcher` end to end)."""

from __future__ import annotations

import datetime as dt

import httpx
import orjson
import pytest
from lxml import etree

from rave_helpers import (
    CONNECTOR_TIMEOUT,
    FAULT_DELAY,
    MDV,
    PASSWORD,
    STUDY,
    USER,
    change,
    free_port,
    odm_of,
    transaction,
    vs,
)
from esource.connectors.emulators.rave_rws import _strip_mdsol
from esource.connectors.rave import VALUE_EXISTS, RaveConnector
from esource.domain.model import Enrollment, TransactionType
from esource.domain.ports import InMemoryEdcKeyMap
from esource.intake.parse import parse_fhir
from esource.mapping.engine import MappingEngine
from esource.odm.xsd import validate_tree
from esource.privacy import Pseudonymizer
from esource.services.conflicts import edc_values, item_path
from esource.services.dispatch import Dispatcher, EdcAuthenticationError, TransientDeliveryError
from esource.services.process import Processor, content_key, enroll, intake_key_for
from esource.study.study import load_study

ODM_NS = "{http://www.cdisc.org/ns/odm/v1.3}"
MDSOL = "{http://www.mdsol.com/ns/odm/metadata}"
A, B = "001-0001", "002-0002"
UPDATE = TransactionType.UPDATE


def first_tx(subject: str = A) -> object:
    """A subject's first transaction: two vital-signs lines at baseline and one in an unscheduled visit."""
    return transaction(subject, [*vs(subject, "SYSBP", "120", unit="mmHg"), *vs(subject, "DIABP", "80"),
                                 *vs(subject, "SYSBP", "135", event="SE.UNSCHED", event_repeat="2024-05-10")],
                       sequence=1, new_subject=True, site="SITE.001" if subject.startswith("001") else "SITE.002")


def esource_values(odm: bytes, subject: str = A) -> dict[str, str | None]:
    return edc_values(odm, subject)


# ------------------------------------------------------------------------------------------ the rewrite


def test_capabilities(connector):
    caps = connector.capabilities()
    assert (caps.name, caps.read_back, caps.idempotency_key, caps.integer_repeat_keys) == ("rave", True, False, True)


def test_esource_odm_becomes_rave_odm_with_integer_keys_that_stay_stable(connector, key_map):
    tx = first_tx()
    rave = connector.to_rave(odm_of(tx), STUDY)
    assert rave.nsmap == {None: "http://www.cdisc.org/ns/odm/v1.3", "mdsol": "http://www.mdsol.com/ns/odm/metadata"}
    assert rave.get("ODMVersion") == "1.3" and rave.find(f"{ODM_NS}AdminData") is None
    assert rave.find(f"{ODM_NS}ClinicalData").get("StudyOID") == "CV01(PROD)"
    sd = rave.find(f"{ODM_NS}ClinicalData/{ODM_NS}SubjectData")
    assert sd.get(f"{MDSOL}SubjectKeyType") == "SubjectName" and sd.get("TransactionType") == "Insert"
    groups = [(se.get("StudyEventOID"), se.get("StudyEventRepeatKey"), ig.get("ItemGroupRepeatKey"),
               ig.get(f"{MDSOL}Submission"))
              for se in rave.iter(f"{ODM_NS}StudyEventData") for ig in se.iter(f"{ODM_NS}ItemGroupData")]
    # keys in the order esource writes the log lines (DIABP before SYSBP); SYSBP is the same line key in
    # every folder (scope IG.VS), the unscheduled date gets its own folder key (scope SE.UNSCHED)
    assert groups == [("SE.BASELINE", None, "1", "SpecifiedItemsOnly"),
                      ("SE.BASELINE", None, "2", "SpecifiedItemsOnly"),
                      ("SE.UNSCHED", "1", "2", "SpecifiedItemsOnly")]
    assert key_map.esource_key("rave", STUDY, A, "IG.VS", 1) == "DIABP"
    assert key_map.esource_key("rave", STUDY, A, "SE.UNSCHED", 1) == "2024-05-10"
    assert all(it.find(f"{ODM_NS}AuditRecord/{ODM_NS}SourceID") is not None for it in rave.iter(f"{ODM_NS}ItemData"))
    assert validate_tree(_strip_mdsol(rave)) == []  # still plain ODM 1.3.2 underneath the mdsol extensions
    # stable across transactions: known keys keep their integers, new ones get the next, per scope and subject
    later = transaction(A, [*vs(A, "DIABP", "82", tt=UPDATE, previous="80"), *vs(A, "HR", "70"),
                            *vs(A, "HR", "75", event="SE.UNSCHED", event_repeat="2024-06-02")], sequence=2)
    again = connector.to_rave(odm_of(later), STUDY)
    keys = [(ig.getparent().getparent().get("StudyEventRepeatKey"), ig.get("ItemGroupRepeatKey"))
            for ig in again.iter(f"{ODM_NS}ItemGroupData")]
    assert keys == [(None, "1"), (None, "3"), ("2", "3")]
    assert key_map.esource_key("rave", STUDY, A, "SE.UNSCHED", 2) == "2024-06-02"
    assert key_map.edc_key("rave", STUDY, B, "IG.VS", "HR") == 1  # another subject: its own numbering


def test_odm_that_cannot_be_rewritten_is_a_permanent_rejection(connector):
    tx = first_tx()
    receipt = connector.send(tx, b"<ODM><broken")
    assert not receipt.accepted and receipt.permanent and receipt.code == "ODM"
    other = transaction(B, vs(B, "HR", "70"), sequence=1, new_subject=True, site="SITE.002")
    receipt = connector.send(tx, odm_of(other))
    assert receipt.permanent and "other subjects" in receipt.message


# ------------------------------------------------------------------------------------------ delivery and read-back


def test_send_delivers_and_the_receipt_carries_the_reference_number(connector, rave):
    receipt = connector.send(first_tx(), odm_of(first_tx()))
    assert receipt.accepted and receipt.code == "200"
    [post] = rave.posts()
    assert receipt.reference == post["reference"] and post["file_oid"] == "ESOURCE.001-0001.1"
    assert receipt.message == ("Rave objects touched: Subjects=1; Folders=1; Forms=1; Fields=7; LogLines=3")
    assert rave.values(A) == {
        ("SE.BASELINE", None, "F.VS", "IG.VS", 1, "IT.VS.VSORRES"): "80",
        ("SE.BASELINE", None, "F.VS", "IG.VS", 1, "IT.VS.VSTESTCD"): "DIABP",
        ("SE.BASELINE", None, "F.VS", "IG.VS", 2, "IT.VS.VSORRES"): "120",
        ("SE.BASELINE", None, "F.VS", "IG.VS", 2, "IT.VS.VSTESTCD"): "SYSBP",
        ("SE.BASELINE", None, "F.VS", "IG.VS", 2, "IT.VS.VSORRESU"): "mmHg",
        ("SE.UNSCHED", 1, "F.VS", "IG.VS", 2, "IT.VS.VSORRES"): "135",
        ("SE.UNSCHED", 1, "F.VS", "IG.VS", 2, "IT.VS.VSTESTCD"): "SYSBP"}
    [audit] = [i for i in rave.items(A) if i["item"] == "IT.VS.VSORRES" and i["event"] == "SE.UNSCHED"]
    assert audit["user"] == "USR.ESOURCE" and audit["source_id"].startswith("Observation:")


def test_read_back_is_in_esource_keys(connector, rave):
    tx = first_tx()
    connector.send(tx, odm_of(tx))
    snapshot = connector.read_back(STUDY, A)
    assert esource_values(snapshot) == {item_path(*(c.item.key.study_event_oid, c.item.key.study_event_repeat_key,
                                                    c.item.key.form_oid, c.item.key.item_group_oid,
                                                    c.item.key.item_group_repeat_key, c.item.key.item_oid)):
                                        c.item.value for c in tx.changes}
    root = etree.fromstring(snapshot)
    assert root.find(f"{ODM_NS}ClinicalData").get("StudyOID") == "CV01"
    assert root.find(f".//{ODM_NS}FormData").get("FormRepeatKey") is None
    assert connector.read_back(STUDY, "009-9999") is None
    # a log line site staff added in Rave has no esource key: it is shown as such, never taken for one of ours
    rave.site_edit(A, "SE.BASELINE", "F.VS", "IG.VS", "IT.VS.VSORRES", "99", group_repeat=7)
    assert esource_values(connector.read_back(STUDY, A))["SE.BASELINE/F.VS/IG.VS[rave:7]/IT.VS.VSORRES"] == "99"


def test_an_update_sends_only_the_changed_value(connector, rave):
    connector.send(first_tx(), odm_of(first_tx()))
    update = transaction(A, vs(A, "SYSBP", "125", tt=UPDATE, previous="120"), sequence=2)
    receipt = connector.send(update, odm_of(update))
    assert receipt.accepted and receipt.reference and "Fields=1; LogLines=0" in receipt.message
    assert rave.values(A)[("SE.BASELINE", None, "F.VS", "IG.VS", 2, "IT.VS.VSORRES")] == "125"
    assert rave.values(A)[("SE.BASELINE", None, "F.VS", "IG.VS", 2, "IT.VS.VSORRESU")] == "mmHg"  # not blanked
    assert rave.writes() == 2


# ------------------------------------------------------------------------------------------ no duplicates


@pytest.mark.parametrize("verify", [True, False], ids=["verify-always", "verify-after-failure"])
def test_no_duplicate_after_a_timeout_after_commit(rave, key_map, verify):
    connector = RaveConnector(rave.url, USER, PASSWORD, key_map=key_map, timeout=CONNECTOR_TIMEOUT,
                              verify_before_send=verify)
    tx = first_tx()
    rave.fault("timeout", delay=FAULT_DELAY, after_commit=True)
    with pytest.raises(TransientDeliveryError) as caught:
        connector.send(tx, odm_of(tx))
    assert caught.value.ambiguous and "may have been applied" in str(caught.value)
    assert rave.writes() == 1  # Rave committed; the answer never came
    receipt = connector.send(tx, odm_of(tx))  # the dispatcher's retry
    assert receipt.accepted and receipt.code == "duplicate" and receipt.reference is None
    assert rave.writes() == 1 and len(rave.values(A)) == 7
    # the same for an Update (which Rave would happily apply twice)
    update = transaction(A, vs(A, "SYSBP", "125", tt=UPDATE, previous="120"), sequence=2)
    rave.fault("reset", after_commit=True)
    with pytest.raises(TransientDeliveryError) as caught:
        connector.send(update, odm_of(update))
    assert caught.value.ambiguous
    assert connector.send(update, odm_of(update)).code == "duplicate"
    assert rave.writes() == 2
    connector.close()


@pytest.mark.parametrize("mode", ["500", "503", "429"])
def test_an_error_answer_after_commit_is_not_sent_twice(connector, rave, mode):
    update_first = first_tx()
    connector.send(update_first, odm_of(update_first))
    update = transaction(A, vs(A, "DIABP", "85", tt=UPDATE, previous="80"), sequence=2)
    rave.fault(mode, after_commit=True, retry_after=0)
    with pytest.raises(TransientDeliveryError):
        connector.send(update, odm_of(update))
    assert connector.send(update, odm_of(update)).code == "duplicate"
    assert rave.writes() == 2


def test_a_restarted_esource_does_not_apply_an_update_twice(rave, key_map):
    """The crash between Rave's commit and esource's bookkeeping: a new process (new connector, the
    same persisted key map) sends the row again; the default read-back before sending catches it."""
    first = RaveConnector(rave.url, USER, PASSWORD, key_map=key_map, timeout=CONNECTOR_TIMEOUT)
    tx = first_tx()
    first.send(tx, odm_of(tx))
    update = transaction(A, vs(A, "SYSBP", "125", tt=UPDATE, previous="120"), sequence=2)
    assert first.send(update, odm_of(update)).code == "200"
    first.close()
    restarted = RaveConnector(rave.url, USER, PASSWORD, key_map=key_map, timeout=CONNECTOR_TIMEOUT)
    assert restarted.send(update, odm_of(update)).code == "duplicate"
    assert rave.writes() == 2
    restarted.close()


def test_a_retry_sends_only_what_rave_does_not_hold(connector, rave):
    part = transaction(A, vs(A, "SYSBP", "120", unit="mmHg"), sequence=1, new_subject=True)
    connector.send(part, odm_of(part))  # as if an earlier attempt got only this far (or the site entered it)
    receipt = connector.send(first_tx(), odm_of(first_tx()))
    assert receipt.accepted and receipt.code == "200"
    assert [p["items"] for p in rave.posts()] == [3, 4]  # the second post carried only the 4 missing items
    assert len(rave.values(A)) == 7


def test_rws00024_means_an_earlier_attempt_created_the_subject(rave, key_map):
    blind = RaveConnector(rave.url, USER, PASSWORD, key_map=key_map, timeout=CONNECTOR_TIMEOUT,
                          verify_before_send=False)  # posts without reading first: Rave answers RWS00024
    tx = first_tx()
    assert blind.send(tx, odm_of(tx)).code == "200"
    receipt = blind.send(tx, odm_of(tx))
    assert receipt.accepted and receipt.code == "duplicate" and "RWS00024" in receipt.message
    assert rave.writes() == 1
    # the subject exists (created elsewhere) but holds only part of the transaction: the rest goes as an Update
    other = transaction(B, vs(B, "HR", "70"), sequence=1, new_subject=True, site="SITE.002")
    blind.send(other, odm_of(other))
    more = transaction(B, [*vs(B, "HR", "70"), *vs(B, "TEMP", "36.6")], sequence=1, new_subject=True,
                       site="SITE.002")
    receipt = blind.send(more, odm_of(more))
    assert receipt.accepted and receipt.code == "200" and receipt.reference
    assert rave.http.get("/_test/stats").json()["refusals"] == {"RWS00024": 2}
    assert rave.posts()[-1]["items"] == 2 and len(rave.values(B)) == 4
    blind.close()


def test_an_insert_over_a_value_rave_holds_from_the_site_is_refused_not_overwritten(connector, rave):
    connector.send(first_tx(), odm_of(first_tx()))
    rave.site_edit(A, "SE.BASELINE", "F.VS", "IG.VS", "IT.VS.VSORRES", "77", group_repeat=3)
    rave.site_edit(A, "SE.BASELINE", "F.VS", "IG.VS", "IT.VS.VSTESTCD", "HR", group_repeat=3)
    hr = transaction(A, vs(A, "HR", "72"), sequence=2)  # key 3 = HR: the site got there first
    receipt = connector.send(hr, odm_of(hr))
    assert not receipt.accepted and receipt.permanent and receipt.code == VALUE_EXISTS
    assert "'77'" in receipt.message and "'72'" in receipt.message
    assert rave.values(A)[("SE.BASELINE", None, "F.VS", "IG.VS", 3, "IT.VS.VSORRES")] == "77"
    assert rave.writes() == 1


# ------------------------------------------------------------------------------------------ refusals and faults


def test_an_authentication_failure_stops_the_endpoint_and_never_shows_the_password(rave, key_map):
    wrong = RaveConnector(rave.url, USER, "not-" + PASSWORD, key_map=key_map, timeout=CONNECTOR_TIMEOUT)
    tx = first_tx()
    with pytest.raises(EdcAuthenticationError) as caught:  # refused on the read-back before the POST
        wrong.send(tx, odm_of(tx))
    assert (caught.value.status, caught.value.code) == (401, "RWS00008")
    assert "Incorrect login and password combination. [RWS00008]" in str(caught.value)
    assert PASSWORD not in repr(wrong) and PASSWORD not in str(caught.value)
    with pytest.raises(EdcAuthenticationError) as caught:
        wrong.read_back(STUDY, A)
    assert caught.value.code == "RWS00008" and PASSWORD not in str(caught.value)
    wrong.close()
    right = RaveConnector(rave.url, USER, PASSWORD, key_map=key_map, timeout=CONNECTOR_TIMEOUT)
    rave.fault("auth")  # credentials refused on the POST itself
    with pytest.raises(EdcAuthenticationError) as caught:
        right.send(tx, odm_of(tx))
    assert caught.value.code == "RWS00008" and PASSWORD not in str(caught.value)
    assert rave.writes() == 0
    right.close()


def test_a_403_with_an_rws_reason_is_a_rejection_but_without_one_the_credentials(connector, rave):
    tx = first_tx()
    rave.fault("reject", status=403, message="Field not authorised.")  # about this data: RWS00042
    receipt = connector.send(tx, odm_of(tx))
    assert receipt.permanent and receipt.code == "RWS00042"  # a rejection of this transaction only
    # a gateway in front of RWS refusing the account: a bare 403 is about the credentials
    gateway = httpx.Client(transport=httpx.MockTransport(
        lambda req: httpx.Response(403, text="<html><body>403 Forbidden</body></html>",
                                   headers={"content-type": "text/html"})))
    behind = RaveConnector("https://rave.example", USER, PASSWORD, key_map=InMemoryEdcKeyMap(), client=gateway)
    with pytest.raises(EdcAuthenticationError) as caught:
        behind.send(tx, odm_of(tx))
    assert caught.value.status == 403 and PASSWORD not in str(caught.value)
    gateway.close()


def test_rws_refusals_are_permanent_with_reason_code_and_message(connector, rave, key_map):
    rave.fault("reject", message="Field not authorised. Form F.VS is locked.")
    receipt = connector.send(first_tx(), odm_of(first_tx()))
    assert (receipt.accepted, receipt.permanent, receipt.code) == (False, True, "RWS00042")
    assert receipt.message.startswith("Field not authorised. Form F.VS is locked.")
    assert "ErrorOriginLocation /ODM/ClinicalData[1]/SubjectData[1]" in receipt.message
    bad = transaction(A, [change(A, "SE.BASELINE", None, "F.VS", "IG.VS", "SYSBP", "IT.VS.VSORRES", "high")],
                      sequence=1, new_subject=True)
    receipt = connector.send(bad, odm_of(bad))
    assert receipt.permanent and receipt.code == "RWS00905" and "'high'" in receipt.message
    uat = RaveConnector(rave.url, USER, PASSWORD, environment="TRAINING", key_map=key_map, timeout=CONNECTOR_TIMEOUT)
    receipt = uat.send(first_tx(), odm_of(first_tx()))
    assert receipt.permanent and receipt.code == "RWS00014" and "CV01(TRAINING)" in receipt.message
    assert uat.read_back(STUDY, A) is None
    uat.close()
    unknown_site = first_tx()
    unknown_site.site_oid = "SITE.999"
    receipt = connector.send(unknown_site, odm_of(unknown_site))
    assert receipt.permanent and receipt.code == "RWS00903"
    assert rave.writes() == 0


@pytest.mark.parametrize(("mode", "retry_after"), [("503", 2.0), ("429", 3.0), ("500", None)])
def test_overload_and_server_errors_are_transient_with_retry_after(connector, rave, mode, retry_after):
    rave.fault(mode, retry_after=retry_after or 1)
    with pytest.raises(TransientDeliveryError) as caught:
        connector.send(first_tx(), odm_of(first_tx()))
    assert caught.value.code == mode and caught.value.retry_after == retry_after and not caught.value.ambiguous
    assert rave.writes() == 0
    assert connector.send(first_tx(), odm_of(first_tx())).code == "200"  # the retry goes through


def test_a_connection_that_cannot_be_made_is_transient_and_not_ambiguous(key_map):
    nowhere = RaveConnector(f"http://127.0.0.1:{free_port()}", USER, PASSWORD, key_map=key_map, timeout=0.5,
                            verify_before_send=False)
    with pytest.raises(TransientDeliveryError) as caught:
        nowhere.send(first_tx(), odm_of(first_tx()))
    assert not caught.value.ambiguous and PASSWORD not in str(caught.value)
    nowhere.close()


def test_a_medidata_url_name_becomes_the_mdsol_host_like_rwslib_does(key_map):
    c = RaveConnector("innovate", USER, PASSWORD, key_map=key_map)
    assert c.base_url == "https://innovate.mdsol.com" and c._url("version") == \
        "https://innovate.mdsol.com/RaveWebServices/version"
    c.close()


def test_version(connector):
    assert connector.version().startswith("1.")


# ------------------------------------------------------------------------------------------ end to end


def test_processor_output_goes_to_rave_through_the_dispatcher(rave, store, clock, key_map):
    """The real use case: FHIR in, outbox rows out, the Dispatcher delivers them with the Rave
    connector (conflict check on, so read-back runs too); Rave holds integer keys, read-back shows
    esource's (test codes, unscheduled dates) again."""
    study = load_study(STUDY)
    mrn = "http://hospital.example/mrn"
    enroll(store.uow, [Enrollment(STUDY, A, "SITE.001", ((mrn, "MRN-1"),), dt.date(2024, 4, 15), dt.date(2024, 5, 1))])
    processor = Processor(study, MappingEngine(study), store.uow, Pseudonymizer(b"rave-e2e-key-0123456789"), clock)

    def obs(oid: str, code: str, value: float, unit: str, when: str, version: int = 1) -> dict:
        return {"resourceType": "Observation", "id": oid, "meta": {"versionId": str(version)},
                "status": "final" if version == 1 else "amended",
                "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                "subject": {"reference": "Patient/p1"}, "effectiveDateTime": when,
                "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}}

    def ingest(n: int, *resources: dict) -> None:
        patient = {"resourceType": "Patient", "id": "p1", "identifier": [{"system": mrn, "value": "MRN-1"}],
                   "gender": "female", "birthDate": "1961-07-14"}
        data = orjson.dumps({"resourceType": "Bundle", "type": "collection",
                             "entry": [{"fullUrl": f"http://ehr.example/fhir/{r['resourceType']}/{r['id']}",
                                        "resource": r} for r in (patient, *resources)]})
        processor.ingest(parse_fhir(data, "rave-e2e"), intake_key_for("rave-e2e", n, content_key(data)))

    ingest(1, obs("wt", "29463-7", 70.5, "kg", "2024-05-01T09:00:00+02:00"),
           obs("glu", "2345-7", 101, "mg/dL", "2024-05-01T08:00:00+02:00"),
           obs("sbp", "8480-6", 141, "mm[Hg]", "2024-05-10T10:00:00+02:00"))  # day 10: an unscheduled visit
    ingest(2, obs("wt", "29463-7", 71.0, "kg", "2024-05-01T09:00:00+02:00", version=2))
    connector = RaveConnector(rave.url, USER, PASSWORD, key_map=key_map, timeout=CONNECTOR_TIMEOUT)
    report = Dispatcher(store.uow, {STUDY: connector}, {STUDY: MDV}, workers=1, clock=clock,
                        sleep=lambda s: None).drain()
    assert (report.sent, report.rejected, report.failed, report.conflicts) == (2, 0, 0, 0)
    with store.uow(read_only=True) as uow:
        sent = {item_path(k.study_event_oid, k.study_event_repeat_key, k.form_oid, k.item_group_oid,
                          k.item_group_repeat_key, k.item_oid): s.value for k, s in uow.sent_items(STUDY, A).items()}
    assert esource_values(connector.read_back(STUDY, A)) == sent
    assert sent["SE.BASELINE/F.VS/IG.VS[WEIGHT]/IT.VS.VSORRES"] == "71.0"
    assert sent["SE.UNSCHED[2024-05-10]/F.VS/IG.VS[SYSBP]/IT.VS.VSORRES"] == "141"
    rave_keys = {(k[0], k[1], k[3], k[4]) for k in rave.values(A)}
    assert rave_keys == {("SE.SCREEN", None, "IG.DM", None), ("SE.BASELINE", None, "IG.VS", 1),
                         ("SE.BASELINE", None, "IG.LB", 1), ("SE.UNSCHED", 1, "IG.VS", 2)}
    assert key_map.esource_key("rave", STUDY, A, "IG.VS", 2) == "SYSBP"
    assert rave.writes() == 2
    connector.close()
