"""The reconciliation routes with roles (a production-mode Container on the `store_url` database: SQLite,
and PostgreSQL when ESOURCE_TEST_POSTGRES_DSN is set): CRAs read their own sites only and never act,
data managers and admins act, no token is 401; errors are problem details; reads are audited."""

from __future__ import annotations

import csv
import datetime as dt
import io
import warnings
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
    from fastapi.testclient import TestClient

from recon_helpers import MRN, STUDY, Feeder, assert_valid_odm, odm_items  # noqa: E402
from esource.adapters.http import create_app  # noqa: E402
from esource.bootstrap import build  # noqa: E402
from esource.connectors.sandbox import SandboxConnector  # noqa: E402
from esource.connectors.sandbox_edc import create_sandbox_app  # noqa: E402
from esource.domain.model import Enrollment  # noqa: E402
from esource.intake.parse import parse_fhir  # noqa: E402
from esource.services.process import content_key, enroll, intake_key_for  # noqa: E402
from esource.services.server import ThreadedServer, free_port  # noqa: E402
from esource.settings import load_settings  # noqa: E402

A, B = "001-0001", "002-0001"
SECRET = "recon-bootstrap-" + "s" * 40
USERS = {"cra_a": (["cra"], ["SITE.001"]), "dm": (["data_manager"], []), "admin": (["admin"], []),
         "edc": (["edc"], [])}


class Api:
    def __init__(self, container: Any, client: TestClient, tokens: dict[str, str], clock: Any) -> None:
        self.container, self.client, self.tokens, self.clock = container, client, tokens, clock
        self._n = 0

    def headers(self, who: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}

    def get(self, path: str, who: str | None, **params: Any) -> Any:
        return self.client.get(path, headers=self.headers(who), params=params)

    def post(self, path: str, who: str | None, body: dict) -> Any:
        return self.client.post(path, headers=self.headers(who), json=body)

    def put(self, path: str, who: str | None, body: dict) -> Any:
        return self.client.put(path, headers=self.headers(who), json=body)

    def ingest(self, subject: str, *resources: dict, gender: str = "female") -> None:
        data = orjson.dumps({"resourceType": "Bundle", "type": "collection",
                             "entry": [{"fullUrl": f"urn:uuid:{subject}-{r['id']}", "resource": r}
                                       for r in (Feeder.patient(subject, gender), *resources)]})
        self._n += 1
        self.container.processors[STUDY].ingest(parse_fhir(data, "test"),
                                                intake_key_for("test", self._n, content_key(data)))

    def ids(self, who: str = "dm", **params: Any) -> dict[str, int]:
        r = self.get(f"/studies/{STUDY}/discrepancies", who, **params)
        assert r.status_code == 200, r.text
        return {f"{d['subject_key']}:{d['kind']}": d["id"] for d in r.json()["items"]}

    def reads(self, actor: str) -> list:
        with self.container.store.uow(read_only=True) as uow:
            entries, _ = uow.audit_entries(study_oid=STUDY, actions=["data.read"], actor=f"user:{actor}")
        return entries


@pytest.fixture
def api(store_url: str, tmp_path, clock) -> Iterator[Api]:
    app = create_sandbox_app(None)
    server = ThreadedServer(app, "127.0.0.1", free_port())
    server.start()
    settings = load_settings(mode="production", database_url=store_url, auth_secret=SECRET, pseudonym_key="p" * 32,
                             edc={"connector": "odm_file", "folder": str(tmp_path / "edc")})
    container = build(settings, clock=clock, connectors={STUDY: SandboxConnector(server.url)})
    try:
        enroll(container.store.uow, [Enrollment(STUDY, s, f"SITE.{s[:3]}", ((MRN, f"MRN-{s}"),),
                                                dt.date(2024, 4, 15), dt.date(2024, 5, 1)) for s in (A, B)])
        with TestClient(create_app(container)) as client:
            from esource.api.auth import get_authenticator

            auth = get_authenticator(container)
            tokens = {}
            for name, (roles, sites) in USERS.items():
                auth.create_user(name, roles, sites=sites, studies=[STUDY] if name == "edc" else [])
                tokens[name] = auth.issue_token(name, ttl_days=30).token
            world = Api(container, client, tokens, clock)
            world.ingest(A, _sysbp(A, 300), _weight(A, 70))
            world.ingest(B, _sysbp(B, 310), gender="other")
            yield world
    finally:
        container.close()
        server.stop()
        app.state.sandbox.close()


def _sysbp(subject: str, value: float) -> dict:
    return Feeder.obs(subject, f"bp-{subject}", "8480-6", value, "mm[Hg]")


def _weight(subject: str, value: float) -> dict:
    return Feeder.obs(subject, f"wt-{subject}", "29463-7", value, "kg")


def is_problem(r: Any, status: int) -> bool:
    return r.status_code == status and r.headers["content-type"].startswith("application/problem+json") \
        and r.json()["status"] == status


def test_reading_the_queue_by_role_and_site(api):
    ids = api.ids("dm")
    assert set(ids) == {f"{A}:out_of_range", f"{B}:out_of_range", f"{B}:unknown_gender"}
    assert set(api.ids("admin")) == set(ids)
    # a CRA sees its own site; another site is 403, as is anything of it
    assert set(api.ids("cra_a")) == {f"{A}:out_of_range"}
    assert is_problem(api.get(f"/studies/{STUDY}/discrepancies", "cra_a", site="SITE.002"), 403)
    assert is_problem(api.get(f"/studies/{STUDY}/discrepancies/{ids[f'{B}:out_of_range']}", "cra_a"), 403)
    assert is_problem(api.get(f"/studies/{STUDY}/discrepancies", None), 401)
    assert is_problem(api.get(f"/studies/{STUDY}/discrepancies", "edc"), 403)
    assert is_problem(api.get("/studies/NOPE/discrepancies", "dm"), 404)
    # filters and pages
    page = api.get(f"/studies/{STUDY}/discrepancies", "dm", kind="out_of_range", limit=1, offset=1).json()
    assert (page["total"], page["limit"], page["offset"], len(page["items"])) == (2, 1, 1, 1)
    assert set(api.ids("dm", site="SITE.002", status="open")) == {f"{B}:out_of_range", f"{B}:unknown_gender"}
    assert api.ids("dm", form="F.DM") == {f"{B}:unknown_gender": ids[f"{B}:unknown_gender"]}
    assert api.ids("dm", min_age_days=1) == {}
    assert is_problem(api.get(f"/studies/{STUDY}/discrepancies", "dm", kind="nonsense"), 422)
    # the detail: source and proposed value side by side
    detail = api.get(f"/studies/{STUDY}/discrepancies/{ids[f'{A}:out_of_range']}", "cra_a").json()
    assert detail["proposed"]["value"] == "300" and detail["source"]["as_received"]["value"] == 300
    assert detail["source"]["as_received"]["unit"] == "mm[Hg]" and detail["item"]["item_group_oid"] == "IG.VS"
    assert "accept" in detail["actions"] and "MRN" not in str(detail)
    assert is_problem(api.get(f"/studies/{STUDY}/discrepancies/999999", "dm"), 404)
    # every read of clinical data is in the audit trail, with who read it
    assert [e.event.detail["what"] for e in api.reads("cra_a")].count("discrepancies") == 1
    assert [e.event.detail["what"] for e in api.reads("cra_a")].count("discrepancy") == 1


def test_acting_is_for_data_managers_and_admins(api):
    ids = api.ids("dm")
    a_held, b_held, gender = ids[f"{A}:out_of_range"], ids[f"{B}:out_of_range"], ids[f"{B}:unknown_gender"]
    path = f"/studies/{STUDY}/discrepancies"
    assert is_problem(api.post(f"{path}/{a_held}/accept", "cra_a", {"reason": "ok"}), 403)
    assert is_problem(api.post(f"{path}/{a_held}/accept", None, {"reason": "ok"}), 401)
    assert is_problem(api.post(f"{path}/{a_held}/accept", "dm", {}), 422)  # the reason is required
    assert is_problem(api.post(f"{path}/{a_held}/explode", "dm", {"reason": "x"}), 422)
    r = api.post(f"{path}/{a_held}/accept", "dm", {"reason": "confirmed with the site"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ok"] and body["resolution"] == "accepted" and body["outbox_id"]
    with api.container.store.uow(read_only=True) as uow:
        row = next(e for e in uow.outbox_entries(statuses=None) if e.id == body["outbox_id"])
    assert_valid_odm(row.odm)
    assert odm_items(row.odm)["SE.BASELINE/F.VS/IG.VS[SYSBP]/IT.VS.VSORRES"] == ("Insert", "300")
    again = api.post(f"{path}/{a_held}/accept", "dm", {"reason": "twice"})
    assert is_problem(again, 409) and "resolved" in again.json()["detail"]
    bad = api.post(f"{path}/{gender}/override", "admin", {"reason": "asked the site", "value": "X"})
    assert is_problem(bad, 422) and "codelist" in bad.json()["detail"]
    assert api.post(f"{path}/{gender}/override", "admin", {"reason": "asked the site", "value": "U"}).json()["ok"]
    assert is_problem(api.post(f"{path}/{b_held}/repush", "dm", {"reason": "x"}), 409)
    r = api.post(f"{path}/{b_held}/review", "dm", {"reason": "mine"})
    assert (r.json()["status"], api.get(f"{path}/{b_held}", "dm").json()["discrepancy"]["assignee"]) == (
        "in_review", "dm")
    # bulk with the list's filters: per-item outcome
    r = api.post(f"{path}/bulk", "dm", {"action": "dismiss", "reason": "cuff broken",
                                        "filter": {"site": "SITE.002", "kind": ["out_of_range"]}})
    assert r.status_code == 200 and (r.json()["matched"], r.json()["succeeded"]) == (1, 1)
    assert is_problem(api.post(f"{path}/bulk", "cra_a", {"action": "dismiss", "reason": "x"}), 403)
    statuses = {d["id"]: d["status"] for d in api.get(path, "dm", status=["resolved", "dismissed"]).json()["items"]}
    assert statuses == {a_held: "resolved", gender: "resolved", b_held: "dismissed"}


def test_review_policy_reads_for_everyone_changes_for_data_managers(api):
    path = f"/studies/{STUDY}/review-policy"
    forms = {f["form_oid"]: f for f in api.get(path, "cra_a").json()["forms"]}
    assert {f["mode"] for f in forms.values()} == {"auto"}
    assert is_problem(api.put(path, "cra_a", {"reason": "x", "forms": {"F.LB": "adjudicate"}}), 403)
    assert is_problem(api.put(path, "dm", {"reason": "x", "forms": {"F.LB": "sometimes"}}), 422)
    assert is_problem(api.put(path, "dm", {"reason": "x", "forms": {"F.XX": "adjudicate"}}), 422)
    r = api.put(path, "dm", {"reason": "lab values double-checked", "forms": {"F.LB": "adjudicate"}})
    assert r.status_code == 200
    lb = next(f for f in r.json()["forms"] if f["form_oid"] == "F.LB")
    assert (lb["mode"], lb["source"], lb["changed_by"]) == ("adjudicate", "override", "user:dm")
    with api.container.store.uow(read_only=True) as uow:
        changed, _ = uow.audit_entries(study_oid=STUDY, actions=["config.changed"])
    assert [(e.event.actor, e.event.new_value) for e in changed] == [("user:dm", "adjudicate")]


def test_the_sdv_report_by_role_site_and_format(api):
    api.container.dispatcher.drain()
    path = f"/studies/{STUDY}/reconciliation"
    assert is_problem(api.get(path, None), 401)
    r = api.get(path, "dm")
    assert r.status_code == 200, r.text
    assert [s["site_oid"] for s in r.json()["sites"]] == ["SITE.001", "SITE.002"]
    # a CRA: its own site only, whether it asks for it or not
    assert [s["site_oid"] for s in api.get(path, "cra_a").json()["sites"]] == ["SITE.001"]
    assert is_problem(api.get(path, "cra_a", site="SITE.002"), 403)
    assert is_problem(api.get(path, "cra_a", subject=B), 403)
    assert is_problem(api.get(path, "dm", subject="999-9999"), 404)
    r = api.get(path, "cra_a", site="SITE.001", format="csv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert rows and {row["site_oid"] for row in rows} == {"SITE.001"} and {row["status"] for row in rows} == {"matching"}
    assert [e.event.detail["what"] for e in api.reads("cra_a")] == ["reconciliation_report"] * 2
