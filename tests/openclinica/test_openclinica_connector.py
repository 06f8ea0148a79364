"""OpenClinicaConnector against the OpenClinica 4 emulator over real HTTP on loopback: submit + poll with
capped exponential backoff, per-item results -> receipts (partial success visible), "No Change" as the
only de-duplication (re-sending after an ambiguous failure is safe), every fault mode, jobs that do
not finish in time (followed again, never re-submitted), read-back in esource's keys, refusals before
anything is sent, and credentials kept out of messages."""

from __future__ import annotations

import datetime as dt
import time

import httpx
import pytest
from openclinica_helpers import A, B
from openclinica_helpers import MDV, STUDY, TOKEN, Feeder, odm_values, replace_value, tx

from esource.connectors.openclinica import OpenClinicaConnector, parse_import_log, transaction_key
from esource.domain.model import (
    DiscrepancyKind,
    ItemChange,
    ItemKey,
    ItemValue,
    SourceRef,
    SubjectTransaction,
    TransactionType,
)
from esource.odm.writer import write_clinical_data
from esource.odm.xsd import validate_odm
from esource.privacy import Pseudonymizer
from esource.services.conflicts import edc_values, item_path, odm_items, strip_items
from esource.services.dispatch import Dispatcher, EdcAuthenticationError, TransientDeliveryError


def send(c: OpenClinicaConnector, row, odm: bytes | None = None):
    return c.send(tx(row), row.odm if odm is None else odm)


def expected(*rows) -> dict[str, str | None]:
    """{item path: value} after applying the rows' ODM in order (esource's keys)."""
    state: dict[str, str | None] = {}
    for row in rows:
        for item in odm_items(row.odm):
            state[item.path] = item.value
    return state


class Sleeps:
    """A sleep that records what was asked and sleeps at most `cap` seconds for real."""

    def __init__(self, cap: float = 0.0) -> None:
        self.cap = cap
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        if self.cap:
            time.sleep(min(seconds, self.cap))


# ------------------------------------------------------------------------------------------ delivery


def test_capabilities_and_key(oc, make_connector, rows):
    c = make_connector(oc)
    caps = c.capabilities()
    assert (caps.name, caps.read_back, caps.idempotency_key, caps.integer_repeat_keys) == \
        ("openclinica", True, False, False)
    assert transaction_key(tx(rows[(A, 2)])) == f"{STUDY}/{A}/2"
    assert repr(c) == f"OpenClinicaConnector({oc.url!r})"
    with pytest.raises(ValueError):
        OpenClinicaConnector(oc.url, TOKEN, poll_initial=1, poll_max=0.5)


def test_delivery_read_back_and_no_change_on_resend(oc, make_connector, rows):
    c = make_connector(oc)
    r1 = send(c, rows[(A, 1)])
    assert r1.accepted and not r1.permanent and r1.code == "COMPLETED" and "7 inserted" in r1.message
    listed = {j["uuid"]: j for j in httpx.get(f"{oc.url}/pages/auth/api/studies/{STUDY}/jobs",
                                              headers={"Authorization": f"Bearer {TOKEN}"}).json()}
    assert listed[r1.reference]["sourceFileName"] == "esource_CV01_001-0001_000001.xml"
    assert {i["subject"] for i in oc.edc.items(STUDY)} == {A}  # found by OpenClinica:StudySubjectID
    r2 = send(c, rows[(A, 2)])
    assert r2.accepted and "1 updated" in r2.message
    assert send(c, rows[(A, 3)]).accepted
    assert oc.edc.write_count() == 3

    again = send(c, rows[(A, 3)])  # e.g. the answer was lost: OC has no idempotency key
    assert again.accepted and again.code == "duplicate" and again.reference != r1.reference
    assert "No Change" in again.message
    assert oc.edc.write_count() == 3 and len(oc.edc.items(STUDY, A)) == 12  # nothing applied twice

    snapshot = c.read_back(STUDY, A)
    assert snapshot is not None and validate_odm(snapshot) == []
    assert edc_values(snapshot, A) == expected(rows[(A, 1)], rows[(A, 2)], rows[(A, 3)])
    assert b'ItemGroupRepeatKey="1"' not in snapshot and b"StudyEventRepeatKey" not in snapshot
    assert c.read_back(STUDY, B) is None
    assert c.pending_jobs() == {}


def test_read_back_without_study_metadata_keeps_the_keys_as_sent(make_oc, make_connector, rows):
    oc = make_oc(metadata=None)  # no design: the metadata endpoint is 404, keys are stored as sent
    c = make_connector(oc)
    assert send(c, rows[(B, 1)]).accepted
    assert edc_values(c.read_back(STUDY, B), B) == expected(rows[(B, 1)])


def test_polls_with_capped_exponential_backoff(make_oc, make_connector, rows):
    oc = make_oc(job_seconds=0.3)
    sleeps = Sleeps(cap=1.0)
    c = make_connector(oc, poll_initial=0.01, poll_max=0.08, sleep=sleeps)
    assert send(c, rows[(A, 1)]).accepted
    assert sleeps.waits[:4] == [0.01, 0.02, 0.04, 0.08]
    assert len(sleeps.waits) >= 6 and set(sleeps.waits[3:]) == {0.08}


def test_a_job_not_finished_in_time_is_followed_again_never_resubmitted(oc, make_connector, rows):
    oc.faults(mode="job_stuck", delay=0.6)
    sleeps = Sleeps(cap=0.005)  # the connector's poll_timeout is spent in (mostly fake) sleeps
    c = make_connector(oc, poll_initial=0.05, poll_max=0.1, poll_timeout=0.3, sleep=sleeps)
    with pytest.raises(TransientDeliveryError) as exc:
        send(c, rows[(A, 1)])
    assert exc.value.ambiguous and "not finished within 0.3s" in str(exc.value)
    assert sum(sleeps.waits) == pytest.approx(0.3)
    [job] = c.pending_jobs().values()
    assert c.pending_jobs() == {f"{STUDY}/{A}/1": job}

    assert send(c, rows[(B, 1)]).accepted  # other subjects flow
    with pytest.raises(TransientDeliveryError, match="waits for it"):
        send(c, rows[(A, 2)])  # A's next transaction must not overtake the running job
    assert oc.job_count() == 2

    oc.edc.wait_idle()
    resumed = send(c, rows[(A, 1)])  # the dispatcher's retry: the same job is followed, no new import
    assert resumed.accepted and resumed.reference == job and "followed again" in resumed.message
    assert oc.job_count() == 2 and c.pending_jobs() == {}
    assert send(c, rows[(A, 2)]).accepted
    assert oc.edc.write_count() == 3


# ------------------------------------------------------------------------------------------ per-item failures


def test_item_failures_are_a_permanent_rejection_and_the_partial_success_is_visible(oc, make_connector, rows):
    c = make_connector(oc)
    bad = replace_value(replace_value(rows[(A, 1)].odm, "IT.VS.VSORRES", "seventy"), "IT.DM.BRTHYR", "1961.0")
    r = send(c, rows[(A, 1)], bad)
    assert not r.accepted and r.permanent and r.reference
    assert r.code == "errorCode.valueTypeMismatch"
    assert f"{A} SE.BASELINE[1]/F.VS/IG.VS[WEIGHT]/IT.VS.VSORRES: errorCode.valueTypeMismatch" in r.message
    assert f"{A} SE.SCREEN[1]/F.DM/IG.DM[1]/IT.DM.BRTHYR: errorCode.valueTypeMismatch" in r.message
    assert "completed with 2 failed row(s)" in r.message
    assert "PARTIAL SUCCESS: 5 item(s) of this transaction WERE applied" in r.message
    assert "IG.VS[WEIGHT]/IT.VS.VSTESTCD (Inserted)" in r.message and "IT.DM.SEX (Inserted)" in r.message
    held = {i["item"]: i["value"] for i in oc.edc.items(STUDY, A)}
    assert "IT.VS.VSORRES" not in held and held["IT.DM.SEX"] == "F"

    # a data manager fixes the cause and re-queues: what was applied answers No Change
    fixed = send(c, rows[(A, 1)])
    assert fixed.accepted and "2 inserted, 0 updated, 5 no change" in fixed.message
    assert edc_values(c.read_back(STUDY, A), A) == expected(rows[(A, 1)])


def test_a_rejected_file_applies_nothing_and_says_so(oc, make_connector, rows):
    c = make_connector(oc)
    oc.faults(mode="reject")
    r = send(c, rows[(A, 1)])
    assert not r.accepted and r.permanent and r.code == "errorCode.formAlreadyComplete"
    assert "Nothing of this transaction was applied" in r.message and "PARTIAL" not in r.message
    assert oc.edc.items(STUDY, A) == []


def test_a_failed_job_is_a_permanent_rejection(oc, make_connector, rows):
    c = make_connector(oc)
    oc.faults(mode="job_failed", message="java.lang.IllegalStateException: transaction rolled back")
    r = send(c, rows[(A, 1)])
    assert (r.accepted, r.permanent, r.code) == (False, True, "error.jobFailed")
    assert "FAILED: java.lang.IllegalStateException" in r.message and "nothing of the file was applied" in r.message
    invalid = rows[(A, 1)].odm.replace(b'<FormData FormOID="F.VS"', b'<FormData Bogus="1" FormOID="F.VS"')
    r = send(c, rows[(A, 1)], invalid)
    assert r.code == "error.jobFailed" and "not valid against the ODM 1.3.2 schema" in r.message
    assert oc.edc.items(STUDY, A) == [] and c.pending_jobs() == {}


# ------------------------------------------------------------------------------------------ faults


@pytest.mark.parametrize("after_commit", [False, True], ids=["before-commit", "after-commit"])
@pytest.mark.parametrize("mode", ["500", "503", "429", "timeout", "reset"])
def test_every_transient_fault_raises_and_a_resend_is_safe(oc, make_connector, rows, mode, after_commit):
    c = make_connector(oc, timeout=0.4) if mode == "timeout" else make_connector(oc)
    oc.faults(mode=mode, retry_after=2, delay=1.5, after_commit=after_commit)
    with pytest.raises(TransientDeliveryError) as exc:
        send(c, rows[(A, 1)])
    err = exc.value
    assert err.retry_after == (2.0 if mode in ("503", "429") else None)
    assert err.ambiguous is (mode in ("timeout", "reset"))
    assert TOKEN not in str(err)
    again = send(make_connector(oc), rows[(A, 1)])  # what the dispatcher does next (no tight client timeout)
    assert again.accepted
    assert again.code == ("duplicate" if after_commit else "COMPLETED")  # the first job had applied it all
    oc.edc.wait_idle()
    assert oc.edc.write_count() == 1 and len(oc.edc.items(STUDY, A)) == 7
    assert odm_values(rows[(A, 1)].odm)  # the ODM esource produced went through unchanged


def test_failing_polls_are_ridden_out(oc, make_connector, rows):
    c = make_connector(oc, timeout=0.3)
    oc.faults(modes=["500", "503", "reset", "timeout"], target="poll", count=5, seed=3, retry_after=0.01, delay=0.5)
    r = send(c, rows[(A, 1)])
    assert r.accepted and r.code == "COMPLETED"
    assert sum(oc.faults(mode="500", target="poll", count=0)["injected"].values()) == 5


def test_authentication_failures_stop_the_endpoint_and_apply_nothing(oc, make_connector, rows):
    wrong = make_connector(oc, token="wrong-secret-4d2c")
    with pytest.raises(EdcAuthenticationError) as err:
        send(wrong, rows[(A, 1)])
    assert err.value.status == 401 and "authentication failed" in str(err.value)
    assert "wrong-secret-4d2c" not in str(err.value)
    c = make_connector(oc)
    oc.faults(mode="auth")
    with pytest.raises(EdcAuthenticationError):
        send(c, rows[(A, 1)])
    assert oc.job_count() == 0
    with pytest.raises(EdcAuthenticationError, match="HTTP 401"):
        wrong.read_back(STUDY, A)
    assert send(c, rows[(A, 1)]).accepted  # the fault is over: the same connector delivers


def test_a_job_whose_poll_is_refused_is_followed_after_the_credentials_are_back(rows):
    """The import was submitted, then the token expired: the job is remembered, not submitted twice."""
    calls: list[str] = []
    refuse = {"poll": True}

    def handler(req: httpx.Request) -> httpx.Response:
        calls.append(req.url.path)
        if req.url.path.endswith("/clinicaldata/import"):
            return httpx.Response(200, text="job uuid: job-1")
        if refuse["poll"]:
            return httpx.Response(401, json={"error": "invalid_token"}, headers={"content-type": "application/json"})
        return httpx.Response(200, text="SubjectKey,ParticipantID,EventOID,EventRepeatKey,FormOID,ItemGroupOID,"
                                        "ItemGroupRepeatKey,ItemOID,Status,Timestamp,Message\n"
                                        "SS_1,001-0001,SE.BASELINE,1,F.VS,IG.VS,1,IT.VS.VSORRES,Inserted,t,\n")

    c = _mock(handler)
    with pytest.raises(EdcAuthenticationError) as err:
        send(c, rows[(A, 1)])
    assert err.value.status == 401 and c.pending_jobs() == {f"{STUDY}/{A}/1": "job-1"}
    refuse["poll"] = False
    r = send(c, rows[(A, 1)])
    assert r.accepted and r.reference == "job-1"
    assert sum(1 for p in calls if p.endswith("/clinicaldata/import")) == 1


def test_read_back_faults_are_transient(oc, make_connector, rows):
    c = make_connector(oc)
    assert send(c, rows[(A, 1)]).accepted
    oc.faults(mode="503", target="read", retry_after=3)
    with pytest.raises(TransientDeliveryError) as exc:
        c.read_back(STUDY, A)
    assert exc.value.retry_after == 3.0
    oc.faults(mode="reset", target="read")
    with pytest.raises(TransientDeliveryError, match="read-back"):
        c.read_back(STUDY, A)
    assert c.read_back(STUDY, A) is not None


# ------------------------------------------------------------------------------------------ refusals


def test_refusals_before_anything_is_sent(oc, make_connector, rows):
    c = make_connector(oc)
    bomb = (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]>'
            b'<ODM xmlns="http://www.cdisc.org/ns/odm/v1.3">&a;</ODM>')
    r = send(c, rows[(A, 1)], bomb)
    assert (r.accepted, r.permanent, r.code) == (False, True, "INVALID_ODM") and "DOCTYPE" in r.message

    # an ItemData Remove (written by esource's ODM writer): OC's import cannot remove a value
    key = ItemKey(STUDY, A, "SE.BASELINE", None, "F.VS", "IG.VS", "WEIGHT", "IT.VS.VSORRES")
    ref = SourceRef("Observation", "wt-1", "2", "urn:wt-1")
    removal = SubjectTransaction(STUDY, MDV, A, "SITE.001", None,
                                 [ItemChange(ItemValue(key, "70.5", ref, "test"), TransactionType.REMOVE)], 4)
    odm = write_clinical_data([removal], file_type="Transactional", file_oid="T.REMOVE",
                              creation=dt.datetime(2025, 3, 1, tzinfo=dt.timezone.utc),
                              pseudonymizer=Pseudonymizer(b"oc-test-key-0123456789abc"))
    r = c.send(removal, odm)
    assert (r.accepted, r.permanent, r.code) == (False, True, "REMOVE_NOT_SUPPORTED")
    assert "SE.BASELINE/F.VS/IG.VS/IT.VS.VSORRES" in r.message

    # every item withheld for a conflict: a SubjectData without data is a no-op
    empty, remaining = strip_items(rows[(A, 2)].odm, A, [item_path(*("SE.BASELINE", None, "F.VS", "IG.VS", "WEIGHT",
                                                                      "IT.VS.VSORRES"))])
    assert remaining == 0
    r = send(c, rows[(A, 2)], empty)
    assert r.accepted and r.code == "no-op"
    assert oc.job_count() == 0


def test_an_unknown_study_is_refused(oc, make_connector, rows):
    c = make_connector(oc)
    r = send(c, rows[(A, 1)], rows[(A, 1)].odm.replace(b'StudyOID="CV01"', b'StudyOID="XX99"'))
    assert (r.accepted, r.permanent, r.code) == (False, True, "errorCode.studyNotExist")


# ------------------------------------------------------------------------------------------ answers not emulated


def _mock(handler) -> OpenClinicaConnector:
    return OpenClinicaConnector("https://oc.example/OpenClinica", TOKEN, poll_initial=0.001, poll_max=0.002,
                                poll_timeout=0.05, client=httpx.Client(transport=httpx.MockTransport(handler)),
                                sleep=lambda s: None)


def test_a_200_without_a_job_is_ocs_refusal(rows):
    c = _mock(lambda req: httpx.Response(200, text="errorCode.noSufficientPrivileges"))
    r = send(c, rows[(A, 1)])
    assert (r.accepted, r.permanent, r.code) == (False, True, "errorCode.noSufficientPrivileges")


def test_a_job_oc_forgot_is_transient_and_resubmitted_next_time(rows):
    calls: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        calls.append(req.url.path)
        if req.url.path.endswith("/clinicaldata/import"):
            assert b'OpenClinica:StudySubjectID="001-0001"' in req.content and b'filename="esource_CV01_' in req.content
            return httpx.Response(200, text=f"job uuid: job-{len(calls)}")
        return httpx.Response(404, text="error.invalidUuid")  # e.g. a load balancer sent the poll elsewhere

    c = _mock(handler)
    with pytest.raises(TransientDeliveryError, match="no longer knows import job job-1"):
        send(c, rows[(A, 1)])
    assert c.pending_jobs() == {}
    with pytest.raises(TransientDeliveryError, match="job-3"):
        send(c, rows[(A, 1)])
    assert sum(p.endswith("/import") for p in calls) == 2


def test_secrets_never_appear_in_messages(rows):
    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(502, json={"message": f"bad gateway for {req.headers['authorization']}"})

    c = _mock(handler)
    with pytest.raises(TransientDeliveryError) as exc:
        send(c, rows[(A, 1)])
    assert TOKEN not in str(exc.value) and "Bearer ***" in str(exc.value)


def test_parse_import_log_reads_ocs_unquoted_csv():
    text = ("\ufeffSubjectKey,ParticipantID,StudyEventOID,StudyEventRepeatKey,FormOID,ItemGroupOID,ItemGroupRepeatKey,"
            "ItemOID,Status,Timestamp,Message\n"
            "SS_X,X-1,SE_A,1,F_A,IG_A,1,I_A,Inserted,2025-03-01T09:00:00.000Z,\n"
            "SS_X,X-1,SE_A,1,F_A,IG_A,1,I_B,Failed,,errorCode.valueTypeMismatch, expected a number\n"
            "SS_X,X-1,SE_A,1,F_B,,,,Failed,,errorCode.formOIDNotFound\n\n")
    rows = parse_import_log(text)
    assert [r.status for r in rows] == ["Inserted", "Failed", "Failed"]
    assert rows[1].message == "errorCode.valueTypeMismatch, expected a number" and rows[1].failed
    assert rows[2].path == "X-1 SE_A[1]/F_B" and not rows[0].failed


# ------------------------------------------------------------------------------------------ through the dispatcher


def test_the_dispatcher_turns_a_partial_import_into_an_edc_rejected_discrepancy(make_oc, make_connector, cv01, store,
                                                                                  clock):
    """OC 4 proper refuses esource's text repeat keys ("WEIGHT"): the demographics go in, the vital
    signs do not -- the data manager sees both in the discrepancy."""
    oc = make_oc(strict_repeat_keys=True)
    f = Feeder(cv01, store, [A])
    f.weight(A, 1)
    d = Dispatcher(store.uow, {STUDY: make_connector(oc)}, {STUDY: MDV}, clock=clock, sleep=lambda s: None,
                   workers=1, max_attempts=2)
    report = d.drain()
    assert (report.sent, report.rejected) == (0, 1)
    with store.uow(read_only=True) as uow:
        [disc] = uow.open_discrepancies(STUDY, A)
        [row] = uow.outbox_entries(statuses=("rejected",))
    assert disc.kind is DiscrepancyKind.EDC_REJECTED and row.status == "rejected"
    vendor = disc.candidates[0]
    assert vendor["code"] == "errorCode.invalidRepeatKey"
    assert "SE.BASELINE[1]/F.VS/IG.VS[WEIGHT]: errorCode.invalidRepeatKey" in vendor["edc_message"]
    assert "PARTIAL SUCCESS: 2 item(s)" in vendor["edc_message"] and "IT.DM.BRTHYR (Inserted)" in vendor["edc_message"]
    assert {i["item"] for i in oc.edc.items(STUDY, A)} == {"IT.DM.BRTHYR", "IT.DM.SEX"}
