"""End to end in a real browser: the system Chromium, headless, driven by Playwright against the real app
served on loopback (demo data ingested, transactions delivered to the sandbox EDC). Each role logs in,
opens the overview, drills into a subject, traces a value to its FHIR source; a data manager resolves a
discrepancy and finds the audit entry; a CRA can neither act on the queue nor see another site; the
language is switched. Every page visited is saved as a screenshot (artifacts/screenshots/, or
$ESOURCE_ARTIFACTS_DIR/screenshots/) for review. Skipped only when /usr/bin/chromium is absent."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from web_helpers import (
    CRA_SITE,
    OTHER_SITE,
    PASSWORDS,
    STUDY,
    World,
    accessibility_problems,
    artifacts_dir,
    visible_text_has_no_patient_data,
)

BASE = f"/ui/studies/{STUDY}"
LOCALES = {"en": "en-GB", "fr": "fr-FR"}


def shot(page: Any, name: str) -> None:
    """Save the page for review - and check its structure for assistive technologies on the way."""
    page.screenshot(path=str(artifacts_dir() / f"{name}.png"), full_page=True)
    assert accessibility_problems(page) == [], (name, page.url)


def no_patient_data(page: Any) -> None:
    assert visible_text_has_no_patient_data(page.content()) == [], page.url


@pytest.fixture
def session(browser: Any, world: World, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh browser context (no cookies) whose Accept-Language follows the test's `lang` marker."""
    lang = getattr(request, "param", "en")
    context = browser.new_context(base_url=world.base_url, locale=LOCALES[lang], viewport={"width": 1366, "height": 900},
                                  accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(20_000)
    try:
        yield page
    finally:
        context.close()


def log_in(page: Any, role: str, *, shot_name: str | None = None) -> None:
    """Log in with the keyboard only: fields found by their labels, Enter submits."""
    username, password = PASSWORDS[role]
    page.goto("/ui/")
    assert "/ui/login" in page.url
    if shot_name:
        shot(page, shot_name)
    label_user = "Identifiant" if page.locator("html").get_attribute("lang") == "fr" else "Username"
    page.get_by_label(label_user).focus()
    page.keyboard.type(username)
    page.keyboard.press("Tab")
    page.keyboard.type(password)
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(rf".*{re.escape(BASE)}/$"))


# ---------------------------------------------------------------- CRA


@pytest.mark.parametrize("session", ["en"], indirect=True)
def test_cra_monitors_their_site_traces_a_value_and_cannot_act(session: Any, world: World) -> None:
    page = session
    log_in(page, "cra", shot_name="01-login")
    # keyboard: the first Tab reaches the skip link, which moves the focus to the main content
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"

    assert page.get_by_role("heading", level=1).inner_text() == "Study overview — CV01"
    sites = page.get_by_role("table").filter(has_text="Transfers today")
    assert sites.get_by_role("row").filter(has_text=CRA_SITE).count() == 1
    assert OTHER_SITE not in page.content()
    assert page.get_by_text("connected").first.is_visible()  # the EDC connection (circuit closed)
    shot(page, "02-overview-cra")
    no_patient_data(page)

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Subjects").click()
    assert page.get_by_role("link", name="001-0001").is_visible()
    assert page.get_by_role("link", name=re.compile("^002-")).count() == 0
    shot(page, "03-subjects-cra")

    # drill into a subject, open a cell of the grid, open a value: its lineage to the FHIR source
    page.get_by_role("link", name="001-0001").click()
    assert page.get_by_role("heading", level=1).inner_text() == "Subject 001-0001"
    row = page.get_by_role("row").filter(has=page.get_by_role("rowheader", name=re.compile("^SE.SCREEN")))
    row.get_by_role("link").first.click()  # the F.DM cell at screening
    assert page.get_by_role("heading", name="F.DM at SE.SCREEN").is_visible()
    shot(page, "04-subject-cra")
    no_patient_data(page)
    page.get_by_role("link", name=re.compile(r"lineage of IT\.DM\.SEX$")).click()
    assert page.get_by_role("heading", level=1).inner_text() == "Lineage: IT.DM.SEX"
    source = page.locator("#lineage-source").inner_text()
    assert source.startswith("Patient") and "v." in source  # a Patient's id is never shown
    assert page.get_by_role("cell", name=re.compile("acknowledged")).count() >= 1  # the EDC's acknowledgement
    shot(page, "05-lineage-dm-item-cra")
    no_patient_data(page)

    # a VS value: an Observation with its id and version, and the conversions applied
    page.goto(f"{BASE}/subjects/001-0001?event=SE.BASELINE&form=F.VS")
    page.get_by_role("link", name=re.compile(r"lineage of IT\.VS\.VSORRES$")).first.click()
    source = page.locator("#lineage-source").inner_text()
    assert re.match(r"Observation/\S+ · v\. \S+", source), source
    assert page.get_by_role("heading", name="Conversions").is_visible()
    shot(page, "06-lineage-vs-cra")

    # the queue: their site only, read-only
    page.get_by_role("link", name="Reconciliation queue").click()
    assert page.get_by_role("note").filter(has_text="Read only").is_visible()
    assert page.get_by_role("checkbox").count() == 0 and page.get_by_role("button", name="Apply to the selection").count() == 0
    assert OTHER_SITE not in page.locator("table.queue").inner_text()
    shot(page, "07-queue-cra")
    page.locator("table.queue").get_by_role("link", name=re.compile(r"^#\d+$")).first.click()
    assert page.get_by_role("heading", name="Decide").is_visible()
    assert page.get_by_role("button", name="Accept").count() == 0 and page.get_by_role("button", name="Dismiss").count() == 0
    shot(page, "08-discrepancy-cra")

    # another site's subject, by URL: refused by the same rule as the API
    response = page.goto(f"{BASE}/subjects/002-0001")
    assert response is not None and response.status == 403
    assert page.get_by_role("heading", name="Not allowed").is_visible()
    shot(page, "09-forbidden-cra")


# ---------------------------------------------------------------- data manager (in French)


@pytest.mark.parametrize("session", ["fr"], indirect=True)
def test_data_manager_resolves_a_discrepancy_and_sees_the_audit_entry(session: Any, world: World) -> None:
    page = session
    log_in(page, "data_manager")
    assert page.get_by_role("heading", level=1).inner_text() == "Vue d’ensemble de l’étude — CV01"
    assert page.locator("html").get_attribute("lang") == "fr"
    shot(page, "10-overview-dm-fr")

    page.get_by_role("link", name="File de réconciliation").click()
    page.get_by_label("Type").select_option("out_of_range")
    page.get_by_role("button", name="Appliquer", exact=True).click()
    rows = page.locator("table.queue tbody tr")
    assert rows.count() == 1 and "hors limites" in rows.first.inner_text()
    shot(page, "11-queue-dm-fr")
    rows.first.get_by_role("link", name=re.compile(r"^#\d+$")).click()

    # source and proposed value side by side
    assert page.get_by_role("heading", name="Ce que dit le DPI").is_visible()
    assert page.locator("#proposed-value").inner_text() == "190"
    shot(page, "12-discrepancy-dm-fr")
    accept = page.locator("form").filter(has=page.get_by_role("heading", name="Accepter", exact=True))
    accept.get_by_label("Motif (obligatoire, tracé)").fill("Natrémie contrôlée par le site : valeur confirmée")
    accept.get_by_role("button", name="Accepter").click()
    assert page.get_by_role("status").filter(has_text="Fait : Accepter.").is_visible()
    assert "résolue" in page.locator("#disc-status").inner_text()
    history = page.get_by_role("table").filter(has_text="Ancien → nouveau").last
    assert history.get_by_role("row").filter(has_text="Natrémie contrôlée par le site").count() >= 1
    shot(page, "13-discrepancy-resolved-dm-fr")

    # the audit trail shows the decision: who, what, why
    page.get_by_role("link", name="Piste d’audit").click()
    entry = page.locator("table.audit tbody tr").filter(has_text="anomalie résolue").first
    assert "user:demo-dm" in entry.inner_text() and "Natrémie contrôlée par le site" in entry.inner_text()
    shot(page, "14-audit-dm-fr")

    # once delivered, the value's lineage shows the manual decision and the EDC's acknowledgement
    world.drain()
    page.goto(f"{BASE}/subjects/002-0001?event=SE.WEEK12&form=F.LB")
    page.get_by_role("row").filter(has=page.get_by_role("rowheader", name="SODIUM", exact=True)) \
        .get_by_role("link", name=re.compile(r"traçabilité de IT\.LB\.LBORRES$")).click()
    assert page.locator("#lineage-value").inner_text() == "190"
    assert page.locator("tr.manual").filter(has_text="valeur produite").count() >= 1
    assert page.get_by_role("cell", name=re.compile("accusé de réception")).count() >= 1
    shot(page, "15-lineage-after-accept-dm-fr")
    no_patient_data(page)


# ---------------------------------------------------------------- admin: language, reports, bulk


@pytest.mark.parametrize("session", ["en"], indirect=True)
def test_admin_switches_language_reads_the_reports_and_acts_in_bulk(session: Any, world: World) -> None:
    page = session
    log_in(page, "admin")
    assert page.get_by_role("heading", level=1).inner_text() == "Study overview — CV01"
    assert page.get_by_role("row").filter(has_text=OTHER_SITE).count() >= 1  # every site
    assert page.locator("svg.chart rect").count() > 0  # transfers and discrepancies over time
    shot(page, "16-overview-admin")

    page.get_by_role("navigation", name="Language").get_by_role("link", name="Français").click()
    assert page.get_by_role("heading", level=1).inner_text() == "Vue d’ensemble de l’étude — CV01"
    page.get_by_role("link", name="Rapport de SDV").click()  # the choice is remembered from page to page
    assert page.get_by_role("heading", level=1).inner_text().startswith("Rapport de vérification des données source")
    assert page.get_by_role("table").filter(has_text="concordant").count() >= 1
    shot(page, "17-sdv-admin-fr")
    page.get_by_role("link", name="Couverture du mapping").click()
    assert page.locator("table.rules th[scope=row] code").filter(has_text=re.compile(r"^F\.VS/SYSBP$")).count() == 1
    shot(page, "18-mapping-admin-fr")
    page.get_by_role("navigation", name="Langue").get_by_role("link", name="English").click()
    assert page.get_by_role("heading", level=1).inner_text() == "Mapping coverage — CV01"

    # the audit trail and its CSV export
    page.get_by_role("link", name="Audit trail").click()
    shot(page, "19-audit-admin")
    with page.expect_download() as info:
        page.get_by_role("link", name="CSV").click()
    path = info.value.path()
    with open(path, encoding="utf-8") as f:
        head = f.readline()
    assert head.startswith("id,at,actor,action") and info.value.suggested_filename == "audit-CV01.csv"

    # bulk: dismiss two possible adverse events at once (reported on the AE form by the sites)
    page.get_by_role("link", name="Reconciliation queue").click()
    page.get_by_label("Kind").select_option("possible_adverse_event")
    page.get_by_role("button", name="Apply", exact=True).click()
    boxes = page.locator("input.row-select")
    assert boxes.count() >= 2
    ids = [boxes.nth(i).get_attribute("value") for i in range(2)]
    for i in range(2):
        boxes.nth(i).check()
    page.get_by_label("Action", exact=True).select_option("dismiss")
    assert page.get_by_label("Corrected value (override only)").is_hidden()  # only for override
    page.get_by_label("Reason (required, audited)").fill("reported on the AE form by the site")
    shot(page, "20-queue-bulk-admin")
    page.get_by_role("button", name="Apply to the selection").click()
    assert page.get_by_role("heading", name="Bulk action").is_visible()
    assert page.get_by_role("status").inner_text() == "Dismiss: 2 selected, 2 done, 0 not done."
    shot(page, "21-bulk-result-admin")
    open_ids = {str(r.id) for r in world.discrepancies()}
    assert not (set(ids) & open_ids)
