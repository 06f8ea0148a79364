"""The dashboard over plain HTTP (no browser): sessions, CSRF, the role model on pages (the API's), site
scoping, languages, security headers, and that no page shows a patient's name or identifier."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from web_helpers import (
    CRA_SITE,
    OTHER_SITE,
    STUDY,
    World,
    csrf_of,
    http_login,
    visible_text_has_no_patient_data,
)

BASE = f"/ui/studies/{STUDY}"
PAGES = [f"{BASE}/", f"{BASE}/subjects", f"{BASE}/subjects/001-0001", f"{BASE}/discrepancies", f"{BASE}/audit",
         f"{BASE}/sdv", f"{BASE}/mapping"]


def _subject_of_site(world: World, site: str) -> str:
    with world.container.store.uow(read_only=True) as uow:
        return next(e.subject_key for e in uow.enrollments(STUDY) if e.site_oid == site)


# ---------------------------------------------------------------- sessions


@pytest.mark.parametrize("path", [*PAGES, "/ui/", f"{BASE}/subjects/002-0001/lineage?event=SE.WEEK4&form=F.VS&"
                                  "group=IG.VS&repeat=WEIGHT&item=IT.VS.VSORRES"])
def test_every_page_needs_a_login_even_in_demo_mode(client: Any, path: str) -> None:
    # demo mode lets an API request without credentials act as the demo admin; pages never do
    r = client.get(path)
    assert r.status_code == 303
    assert r.headers["location"].startswith("/ui/login")


def test_login_sets_a_signed_httponly_samesite_strict_cookie_and_lands_on_the_study(client: Any) -> None:
    r = http_login(client, "data_manager")
    assert r.status_code == 303 and r.headers["location"] == "/ui/"
    cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith("esource_session="))
    flags = {p.strip().lower() for p in cookie.split(";")[1:]}
    assert "httponly" in flags and "samesite=strict" in flags and "path=/ui" in flags
    assert client.get("/ui/").headers["location"] == f"{BASE}/"
    assert client.get(f"{BASE}/").status_code == 200


def test_wrong_password_unknown_user_and_a_stale_form_are_refused(client: Any) -> None:
    r = http_login(client, username="demo-dm", password="not-the-password")
    assert r.status_code == 401 and "esource_session" not in r.headers.get("set-cookie", "")
    assert "Unknown username or wrong password" in r.text
    r = http_login(client, username="nobody", password="whatever-password")
    assert r.status_code == 401
    # a login post without the form's nonce (another site posting the form) is refused
    r = client.post("/ui/login", data={"username": "demo-dm", "password": "demo-dm-password", "nonce": "forged"})
    assert r.status_code == 400 and "esource_session" not in r.headers.get("set-cookie", "")


@pytest.mark.parametrize("username", ["demo-edc", "demo-system"])
def test_accounts_without_a_dashboard_role_cannot_log_in(client: Any, username: str) -> None:
    r = http_login(client, username=username, password=f"{username}-password")
    assert r.status_code == 403
    assert "no access to the dashboard" in r.text
    assert client.get(f"{BASE}/").status_code == 303


def test_a_tampered_or_foreign_cookie_is_no_session(client: Any) -> None:
    http_login(client, "cra")
    value = client.cookies.get("esource_session")
    body, mac = value.split(".")
    import base64
    import json

    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload["u"] = "demo-admin"  # try to become the admin
    forged = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
    client.cookies.set("esource_session", f"{forged}.{mac}", path="/ui")
    assert client.get(f"{BASE}/").status_code == 303


def test_a_bearer_token_does_not_open_pages_and_the_api_still_wants_one(client: Any, world: World) -> None:
    token = next(c.token for c in world.credentials if c.username == "demo-dm")
    r = client.get(f"{BASE}/", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 303  # pages: the session only
    assert client.get(f"/studies/{STUDY}/transfers", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_logout_needs_the_csrf_token_and_ends_the_session(client: Any) -> None:
    http_login(client, "admin")
    page = client.get(f"{BASE}/")
    assert client.post("/ui/logout", data={"csrf_token": "wrong"}).status_code == 403
    assert client.get(f"{BASE}/").status_code == 200
    r = client.post("/ui/logout", data={"csrf_token": csrf_of(page.text)})
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    assert client.get(f"{BASE}/").status_code == 303


def test_login_never_redirects_off_the_dashboard(client: Any) -> None:
    for target in ("https://evil.example/", "//evil.example/ui/", "/studies/CV01/transfers", "/ui/\\evil"):
        r = http_login(client, "data_manager", next_url=target)
        assert r.headers["location"] == "/ui/", target


# ---------------------------------------------------------------- the role model on pages


def test_a_cra_sees_only_their_site(client: Any, world: World) -> None:
    http_login(client, "cra")
    own, other = _subject_of_site(world, CRA_SITE), _subject_of_site(world, OTHER_SITE)
    overview = client.get(f"{BASE}/").text
    assert CRA_SITE in overview and OTHER_SITE not in overview
    subjects = client.get(f"{BASE}/subjects").text
    assert own in subjects and other not in subjects
    assert client.get(f"{BASE}/subjects/{own}").status_code == 200
    for path in (f"{BASE}/subjects/{other}", f"{BASE}/subjects?site={OTHER_SITE}",
                 f"{BASE}/discrepancies?site={OTHER_SITE}", f"{BASE}/sdv?site={OTHER_SITE}",
                 f"{BASE}/audit?subject={other}", f"{BASE}/audit/export?format=csv&subject={other}",
                 f"{BASE}/subjects/{other}/lineage?event=SE.WEEK4&form=F.VS&group=IG.VS&repeat=WEIGHT"
                 "&item=IT.VS.VSORRES"):
        r = client.get(path)
        assert r.status_code == 403, path
        assert "Not allowed" in r.text
    queue = client.get(f"{BASE}/discrepancies?status=all").text
    assert OTHER_SITE not in queue
    other_ids = [r.id for r in world.discrepancies() if r.site_oid == OTHER_SITE]
    assert other_ids and client.get(f"{BASE}/discrepancies/{other_ids[0]}").status_code == 403
    audit_csv = client.get(f"{BASE}/audit/export?format=csv").text
    assert OTHER_SITE not in audit_csv and other not in audit_csv
    sdv = client.get(f"{BASE}/sdv").text
    assert other not in sdv


def test_a_cra_reads_the_queue_but_cannot_act_on_it(client: Any, world: World) -> None:
    http_login(client, "cra")
    queue = client.get(f"{BASE}/discrepancies")
    assert queue.status_code == 200 and "Read only" in queue.text
    assert 'name="ids"' not in queue.text and "/discrepancies/bulk" not in queue.text
    own = [r for r in world.discrepancies() if r.site_oid == CRA_SITE]
    assert own, "the demo data give SITE.001 open discrepancies"
    page = client.get(f"{BASE}/discrepancies/{own[0].id}")
    assert page.status_code == 200 and "/act" not in page.text
    token = csrf_of(page.text)
    r = client.post(f"{BASE}/discrepancies/{own[0].id}/act",
                    data={"csrf_token": token, "action": "dismiss", "reason": "a CRA tries"})
    assert r.status_code == 403
    r = client.post(f"{BASE}/discrepancies/bulk",
                    data={"csrf_token": token, "action": "dismiss", "reason": "a CRA tries", "ids": [str(own[0].id)]})
    assert r.status_code == 403
    assert world.discrepancies(kind=own[0].kind.value, subject_key=own[0].discrepancy.subject_key), "nothing changed"


def test_a_data_manager_acts_only_with_the_csrf_token_and_the_action_is_audited(client: Any, world: World) -> None:
    http_login(client, "data_manager")
    target = next(r for r in world.discrepancies(kind="possible_adverse_event") if r.site_oid == OTHER_SITE)
    page = client.get(f"{BASE}/discrepancies/{target.id}")
    assert 'id="do-dismiss"' in page.text
    url = f"{BASE}/discrepancies/{target.id}/act"
    form = {"action": "dismiss", "reason": "reported on the AE form by the site (HTTP test)"}
    assert client.post(url, data=form).status_code == 403  # no token
    assert client.post(url, data={**form, "csrf_token": "forged"}).status_code == 403
    assert client.post(url, data={**form, "csrf_token": csrf_of(page.text)},
                       headers={"Origin": "https://evil.example"}).status_code == 403
    assert target.id in [r.id for r in world.discrepancies()], "still open"
    r = client.post(url, data={**form, "csrf_token": csrf_of(page.text)})
    assert r.status_code == 303 and "done=dismiss" in r.headers["location"]
    assert target.id not in [r.id for r in world.discrepancies()]
    after = client.get(r.headers["location"]).text
    assert "Done: Dismiss." in after and "reported on the AE form by the site (HTTP test)" in after
    audit = client.get(f"{BASE}/audit?action=discrepancy.dismissed").text
    assert "reported on the AE form by the site (HTTP test)" in audit and "user:demo-dm" in audit


def test_an_action_without_a_reason_is_refused_and_nothing_changes(client: Any, world: World) -> None:
    http_login(client, "data_manager")
    target = world.discrepancies(kind="ambiguous_data")[0]
    page = client.get(f"{BASE}/discrepancies/{target.id}")
    r = client.post(f"{BASE}/discrepancies/{target.id}/act",
                    data={"csrf_token": csrf_of(page.text), "action": "dismiss", "reason": "  "})
    assert r.status_code == 422 and "Not done" in r.text
    assert target.id in [x.id for x in world.discrepancies()]


# ---------------------------------------------------------------- languages, headers, privacy


def test_language_follows_the_browser_and_can_be_switched(client: Any) -> None:
    http_login(client, "data_manager")
    fr = client.get(f"{BASE}/", headers={"Accept-Language": "fr-FR,fr;q=0.9,en;q=0.8"})
    assert '<html lang="fr">' in fr.text and "Vue d’ensemble de l’étude" in fr.text
    en = client.get(f"{BASE}/", headers={"Accept-Language": "en-GB,en;q=0.9"})
    assert '<html lang="en">' in en.text and "Study overview" in en.text
    switched = client.get(f"{BASE}/?lang=fr", headers={"Accept-Language": "en"})
    assert "Vue d’ensemble de l’étude" in switched.text and "esource_lang=fr" in switched.headers["set-cookie"]
    assert "Vue d’ensemble de l’étude" in client.get(f"{BASE}/", headers={"Accept-Language": "en"}).text


def test_every_page_has_the_security_headers_and_no_patient_data(client: Any, world: World) -> None:
    http_login(client, "admin")
    seen = set(PAGES)
    for path in PAGES:
        html = client.get(path).text
        for href in re.findall(r'href="(/ui/studies/[^"#]+)"', html):  # one level of links: subjects, cells, items
            seen.add(href.replace("&amp;", "&"))
    for path in sorted(seen):
        if "/export" in path:
            continue
        r = client.get(path)
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert r.headers["cache-control"] == "no-store" and r.headers["x-frame-options"] == "DENY"
        assert visible_text_has_no_patient_data(r.text) == [], path
        assert "<script>" not in r.text and ' style="' not in r.text, path  # nothing inline (CSP)
    assert len(seen) > 20


def test_csv_exports_are_attachments_scoped_and_audited(client: Any, world: World) -> None:
    http_login(client, "data_manager")
    r = client.get(f"{BASE}/audit/export?format=csv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert 'attachment; filename="audit-CV01.csv"' == r.headers["content-disposition"]
    assert r.text.splitlines()[0].startswith("id,at,actor,action")
    sdv = client.get(f"{BASE}/sdv/export")
    assert sdv.status_code == 200 and sdv.text.splitlines()[0].startswith("site_oid,subject_key")
    assert visible_text_has_no_patient_data(r.text + sdv.text) == []
    with world.container.store.uow(read_only=True) as uow:
        entries, _ = uow.audit_entries(study_oid=STUDY, actions=["data.read"], actor="user:demo-dm",
                                       newest_first=True, limit=20)
    whats = [e.event.detail.get("what") for e in entries]
    assert "audit_export" in whats and "reconciliation_report" in whats


# ---------------------------------------------------------------- catalogue


def test_every_string_the_templates_use_exists_in_both_languages() -> None:
    from esource.domain.audit import AuditAction
    from esource.domain.model import DiscrepancyKind
    from esource.web import i18n

    root = Path(__file__).resolve().parents[2] / "esource" / "web"
    used: set[str] = set()
    for f in [*(root / "templates").glob("*.html"), root / "pages.py"]:
        text = f.read_text(encoding="utf-8")
        used |= set(re.findall(r"""\bt\(\s*["']([a-z0-9_]+\.[a-z0-9_.]+|[a-z_]+)["'](?!\s*~)""", text))
    used |= {f"nav.{n}" for n in ("overview", "subjects", "queue", "audit", "sdv", "mapping")}
    used |= {f"kind.{k.value}" for k in DiscrepancyKind} | {f"action.{a.value}" for a in AuditAction}
    used |= {f"error.title_{s}" for s in (403, 404, 409, 422)} | {f"error.explain_{s}" for s in (403, 404)}
    used |= {f"act.help_{a}" for a in ("accept", "override", "dismiss", "repush")}
    used |= {f"lang.switch_{x}" for x in i18n.LANGUAGES}
    # every value an enumeration shown with t.v(...) can take
    from esource.api.auth import Role
    from esource.domain.model import Severity
    from esource.reconciliation.model import DiscrepancyStatus, Resolution
    from esource.reconciliation.report import CATEGORIES
    from esource.store.schema import OUTBOX_STATUSES
    from esource.web.grid import CONFLICT, EMPTY, FILLED, HELD, NA, PENDING, REJECTED
    from esource.web.pages import FORM_ACTIONS, STATUS_CHOICES

    used |= {f"status.{s.value}" for s in DiscrepancyStatus} | {f"resolution.{r.value}" for r in Resolution}
    used |= {f"severity.{s.value}" for s in Severity} | {f"role.{r.value}" for r in Role}
    used |= {f"transfer.{s}" for s in OUTBOX_STATUSES} | {f"sdv.{c}" for c in CATEGORIES}
    used |= {f"state.{s}" for s in (CONFLICT, EMPTY, FILLED, HELD, NA, PENDING, REJECTED)}
    used |= {f"circuit.{s}" for s in ("closed", "open", "auth_failed")}  # Dispatcher.endpoint_states
    used |= {f"act.{a}" for a in FORM_ACTIONS} | {f"status_filter.{s}" for s in STATUS_CHOICES}
    used |= {"sdv.no_connector", "sdv.no_read_back"}
    missing = sorted(k for k in used if k not in i18n.C)
    assert missing == []
    for key, texts in i18n.C.items():
        assert len(texts) == len(i18n.LANGUAGES) and all(t.strip() for t in texts), key
        assert set(re.findall(r"{(\w+)}", texts[0])) == set(re.findall(r"{(\w+)}", texts[1])), key


@pytest.mark.parametrize(("header", "lang"), [(None, "en"), ("fr", "fr"), ("fr-CA,en;q=0.5", "fr"),
                                              ("de-DE,fr;q=0.8,en;q=0.9", "en"), ("en;q=0.5,fr;q=0.5", "en"),
                                              ("*", "en"), ("fr;q=0", "en")])
def test_accept_language_negotiation(header: str | None, lang: str) -> None:
    from esource.web.i18n import negotiate

    assert negotiate(header) == lang
