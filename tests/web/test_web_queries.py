"""The dashboard's read-only aggregates (esource.web.queries) on SQLite and - when
ESOURCE_TEST_POSTGRES_DSN is set - on PostgreSQL: the same demo messages give the same numbers."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from esource.adapters.files import read_input_file

from esource.bootstrap import build
from esource.services.demo import builtin_config_dir, load_enrollment_file
from esource.services.ingest import Envelope
from esource.services.process import content_key, enroll
from esource.settings import load_settings
from esource.web import queries

DATA = builtin_config_dir() / "demo_data"
FILES = {"001-0001": DATA / "CY_249867.json", "002-0001": DATA / "Arla_Lang_0c89b627-646b-40ff-a620-c8509a10912c.json"}


def test_the_aggregates_agree_with_the_store_on_both_databases(store_url: str) -> None:
    settings = load_settings(mode="demo", database_url=store_url, studies=["CV01"], log={"level": "WARNING"})
    container = build(settings, connectors={})  # nothing is delivered: every transaction stays pending
    try:
        _, enrollments, _ = load_enrollment_file(builtin_config_dir() / "demo_enrollment.yaml")
        enroll(container.store.uow, enrollments)
        for path in FILES.values():
            data = read_input_file(Path(path), max_bytes=settings.http.max_body_bytes)
            assert container.ingest.ingest_bytes(data, Envelope("file", f"{path.name}:{content_key(data)}",
                                                                path.name)).accepted
        study = container.studies["CV01"]
        now = dt.datetime.now(dt.timezone.utc)
        with container.store.uow(read_only=True) as uow:
            rows = uow.outbox_entries(statuses=None, study_oid="CV01")
            open_d = uow.open_discrepancies("CV01")
            sites = {s.site_oid: s for s in queries.site_overview(uow, "CV01", study.spec.study.sites, None, now)}
            cra = queries.site_overview(uow, "CV01", study.spec.study.sites, frozenset({"SITE.001"}), now)
            series = queries.daily_series(uow, "CV01", None, now)
            activity = queries.edc_activity(uow, "CV01")
            coverage = {c.form_oid: c for c in queries.coverage(uow, study, None, now.date())}
            rules = {r.rule: r for r in queries.rule_stats(uow, "CV01", None)}
            lines = {s.subject_key: s for s in queries.subject_lines(uow, "CV01", None)}
            sent = {k: uow.sent_items("CV01", k) for k in FILES}
        assert set(sites) == {"SITE.001", "SITE.002"} and [s.site_oid for s in cra] == ["SITE.001"]
        for site in sites.values():
            mine = [r for r in rows if r.site_oid == site.site_oid]
            assert site.subjects == 2
            assert site.transfers_today == site.transfers_week == len(mine)
            assert site.items_pending == sum(r.item_count for r in mine) and site.items_sent == site.items_rejected == 0
        assert sum(s.open_discrepancies for s in sites.values()) == len(open_d)
        assert sum(sum(s.by_kind.values()) for s in sites.values()) == len(open_d)
        assert series[-1].day == now.date() and series[-1].transfers == len(rows)
        assert series[-1].discrepancies == len(open_d) and sum(d.transfers for d in series[:-1]) == 0
        assert activity.last_success is None and activity.depth == {"pending": len(rows)}
        assert coverage["F.DM"].filled == sum(1 for k in FILES for key in sent[k] if key.form_oid == "F.DM")
        assert coverage["F.DM"].expected == 2 * len(enrollments)  # birth year and sex, every enrolled subject
        assert coverage["F.MH"].kind == "log" and coverage["F.MH"].share is None
        assert 0 < coverage["F.VS"].filled <= coverage["F.VS"].expected
        assert rules["F.DM/sex"].values_mapped == 2 and rules["F.DM/sex"].records == 2
        assert {"result", "unit", "testcd", "date"} <= set(rules["F.VS/WEIGHT"].items)
        for key, items in sent.items():
            assert lines[key].items == len(items) and lines[key].transfers == 1
            assert lines[key].last_transfer_status == "pending"
        assert lines["001-0002"].items == 0 and lines["001-0002"].transfers == 0
    finally:
        container.close()
