"""The reconciliation / SDV report against esource's sandbox EDC served on loopback (the store: SQLite, and
PostgreSQL when ESOURCE_TEST_POSTGRES_DSN is set): values delivered by the dispatcher, a value then
changed (or cleared) in the EDC by site staff, one entered only in the EDC, one still in the outbox; per
site, as JSON and CSV; a hostile read-back is reported for its subject and the report goes on."""

from __future__ import annotations

import csv
import io

from recon_helpers import STUDY, deliver, site_edit
from esource.connectors.sandbox import SandboxConnector
from esource.reconciliation.report import compare_subject, reconcile

A, B = "001-0001", "002-0001"
WEIGHT = "SE.BASELINE/F.VS/IG.VS[WEIGHT]/IT.VS.VSORRES"
HR = "SE.BASELINE/F.VS/IG.VS[HR]/IT.VS.VSORRES"
SYSBP_DATE = "SE.BASELINE/F.VS/IG.VS[SYSBP]/IT.VS.VSDAT"


def by_path(report, subject: str) -> dict:
    return {i.path: i for i in report.items() if i.subject_key == subject}


def test_the_report_sorts_every_item_into_its_category_per_site(feeder, store, clock, sandbox, connector):
    feeder.ingest(A, feeder.weight(A, 70), feeder.sysbp(A, 120))
    feeder.ingest(B, feeder.weight(B, 80))
    deliver(store, connector, clock)
    site_edit(sandbox, A, WEIGHT, "70.5")  # site staff corrected it in the EDC
    site_edit(sandbox, A, HR, "61")  # entered only in the EDC
    feeder.ingest(A, feeder.obs(A, "ht-1", "8302-2", 170, "cm"))  # queued, not delivered yet
    site_edit(sandbox, B, "SE.BASELINE/F.VS/IG.VS[WEIGHT]/IT.VS.VSDAT", None)  # cleared: an explicit null

    report = reconcile(store.uow, connector, STUDY, clock=clock)
    assert [s.site_oid for s in report.sites] == ["SITE.001", "SITE.002"]
    a = by_path(report, A)
    assert (a[WEIGHT].status, a[WEIGHT].esource_value, a[WEIGHT].edc_value) == ("changed_in_edc", "70.0", "70.5")
    assert (a[HR].status, a[HR].esource_value, a[HR].edc_value) == ("only_in_edc", None, "61")
    assert a[SYSBP_DATE].status == "matching" and a[SYSBP_DATE].edc_value == "2024-05-01"
    height = a["SE.BASELINE/F.VS/IG.VS[HEIGHT]/IT.VS.VSORRES"]
    assert (height.status, height.in_transit, height.esource_value) == ("missing_in_edc", True, "170.0")
    b = by_path(report, B)
    cleared = b["SE.BASELINE/F.VS/IG.VS[WEIGHT]/IT.VS.VSDAT"]
    assert (cleared.status, cleared.edc_value) == ("changed_in_edc", None)
    assert b[WEIGHT].status == "matching" and not b[WEIGHT].in_transit
    site_a = report.sites[0]
    assert site_a.counts == {"matching": 11, "changed_in_edc": 1, "missing_in_edc": 5, "only_in_edc": 1}
    assert report.counts["changed_in_edc"] == 2
    # JSON-ready, per site, and CSV with one line per item
    shown = report.to_json()
    assert shown["sites"][1]["site_oid"] == "SITE.002" and shown["sites"][1]["subjects"][0]["subject_key"] == B
    assert shown["counts"] == report.counts
    rows = list(csv.DictReader(io.StringIO(report.to_csv())))
    assert len(rows) == len(report.items())
    edited = next(r for r in rows if r["subject_key"] == A and r["item_group_repeat_key"] == "WEIGHT"
                  and r["item_oid"] == "IT.VS.VSORRES")
    assert (edited["status"], edited["esource_value"], edited["edc_value"], edited["site_oid"]) == (
        "changed_in_edc", "70.0", "70.5", "SITE.001")


def test_site_subject_and_allowed_sites_narrow_the_report(feeder, store, clock, connector):
    feeder.ingest(A, feeder.weight(A, 70))
    feeder.ingest(B, feeder.weight(B, 80))
    deliver(store, connector, clock)
    only_b = reconcile(store.uow, connector, STUDY, site="SITE.002", clock=clock)
    assert [(s.site_oid, [x.subject_key for x in s.subjects]) for s in only_b.sites] == [("SITE.002", [B])]
    assert reconcile(store.uow, connector, STUDY, subject=A, clock=clock).sites[0].subjects[0].subject_key == A
    cra = reconcile(store.uow, connector, STUDY, sites_allowed=["SITE.001"], clock=clock)
    assert [s.site_oid for s in cra.sites] == ["SITE.001"]
    assert reconcile(store.uow, connector, STUDY, site="SITE.002", sites_allowed=["SITE.001"], clock=clock).sites == []


def test_a_subject_the_edc_does_not_know_is_all_missing(feeder, store, clock, connector):
    feeder.ingest(A, feeder.weight(A, 70))  # never delivered
    report = reconcile(store.uow, connector, STUDY, subject=A, clock=clock)
    (subject,) = report.sites[0].subjects
    assert subject.edc_has_subject is False and subject.error is None
    assert {i.status for i in subject.items} == {"missing_in_edc"} and all(i.in_transit for i in subject.items)


class HostileEdc:
    """Answers the read-back with an entity-expansion document for one subject."""

    def __init__(self, inner: SandboxConnector, bad_subject: str) -> None:
        self.inner, self.bad = inner, bad_subject

    def capabilities(self):
        return self.inner.capabilities()

    def read_back(self, study_oid: str, subject_key: str) -> bytes | None:
        if subject_key == self.bad:
            return (b'<?xml version="1.0"?><!DOCTYPE ODM [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]>'
                    b'<ODM xmlns="http://www.cdisc.org/ns/odm/v1.3">&b;</ODM>')
        return self.inner.read_back(study_oid, subject_key)


def test_a_hostile_read_back_is_reported_for_its_subject_and_the_rest_goes_on(feeder, store, clock, connector):
    feeder.ingest(A, feeder.weight(A, 70))
    feeder.ingest(B, feeder.weight(B, 80))
    deliver(store, connector, clock)
    report = reconcile(store.uow, HostileEdc(connector, A), STUDY, clock=clock)
    bad = report.sites[0].subjects[0]
    assert bad.subject_key == A and "DOCTYPE" in (bad.error or "") and bad.items == []
    assert {i.status for i in report.sites[1].subjects[0].items} == {"matching"}
    lines = list(csv.DictReader(io.StringIO(report.to_csv())))
    assert lines[0]["status"] == "error" and lines[0]["subject_key"] == A and "DOCTYPE" in lines[0]["note"]
    assert report.to_json()["sites"][0]["subjects_with_errors"] == 1


def test_numbers_compare_numerically_and_csv_cells_never_run_as_formulas():
    from esource.domain.model import ItemKey
    from esource.domain.ports import SentItem

    key = ItemKey(STUDY, A, "SE.BASELINE", None, "F.VS", "IG.VS", "WEIGHT", "IT.VS.VSORRES")
    sent = {key: SentItem(key, "71.0", "i", "1", "Observation", "x", "r")}
    t = ("SE.BASELINE", None, "F.VS", "IG.VS", "WEIGHT", "IT.VS.VSORRES")
    assert compare_subject("SITE.001", A, sent, {t: "71"}, set())[0].status == "matching"
    other = ("SE.BASELINE", None, "F.VS", "IG.VS", "HR", "IT.VS.VSORRES")
    items = compare_subject("SITE.001", A, {}, {other: "=HYPERLINK(\"x\")", t: "-5"}, set())
    from esource.reconciliation.report import ReconciliationReport, SiteReconciliation, SubjectReconciliation
    import datetime as dt

    report = ReconciliationReport(STUDY, dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc), "x",
                                  [SiteReconciliation("SITE.001", [SubjectReconciliation(A, "SITE.001", items)])])
    rows = list(csv.DictReader(io.StringIO(report.to_csv())))
    assert {r["edc_value"] for r in rows} == {"'=HYPERLINK(\"x\")", "-5"}
