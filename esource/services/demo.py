"""`esource demo`: the main job on embedded defaults. The service starts (SQLite store, FHIR HTTP and
file intake, the sandbox EDC), the CV01 demo enrollment (config/) and its sample data are fed in through
the same use case as production, every ODM transaction is delivered to the sandbox EDC (and copied to
files), then a summary and the URLs to look at."""

from __future__ import annotations

import datetime as dt
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from esource.adapters.files import iter_input_files, read_input_file
from esource.domain.model import Enrollment
from esource.errors import EsourceError, StudyConfigError
from esource.odm.xsd import validate_odm
from esource.services.process import content_key, enroll


def builtin_config_dir() -> Path:
    import esource.builtin_config as pkg

    return Path(pkg.__file__).parent


def load_enrollment_file(path: Path) -> tuple[str, list[Enrollment], list[Path]]:
    """The demo enrollment YAML: study, subjects (identifiers, SubjectKey, site, dates), feed folders."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise StudyConfigError(str(path), f"cannot read the enrollment file: {exc}") from None
    if not isinstance(data, dict) or "study" not in data or not isinstance(data.get("subjects"), list):
        raise StudyConfigError(str(path), "expected keys study and subjects (a list)")
    out = []
    for i, s in enumerate(data["subjects"]):
        try:
            idents = tuple((str(x["system"]), str(x["value"])) for x in s["identifiers"])
            out.append(Enrollment(
                study_oid=data["study"], subject_key=str(s["subject_key"]), site_oid=str(s["site_oid"]),
                identifiers=idents, consent_date=dt.date.fromisoformat(str(s["consent"])),
                day1=dt.date.fromisoformat(str(s["day1"])),
                withdrawal_date=dt.date.fromisoformat(str(s["withdrawn"])) if s.get("withdrawn") else None))
        except (KeyError, TypeError, ValueError) as exc:
            raise StudyConfigError(str(path), f"subject entry is not valid: {exc}", key=f"subjects[{i}]") from None
    feed = [path.parent / f for f in data.get("feed", [])]
    return str(data["study"]), out, feed


@dataclass
class DemoSummary:
    subjects: int = 0
    files: int = 0
    duplicates: int = 0
    dead_letters: list[str] = field(default_factory=list)
    dropped_not_enrolled: int = 0
    items_by_form: Counter = field(default_factory=Counter)
    discrepancies_by_kind: Counter = field(default_factory=Counter)
    transactions: int = 0
    delivered: int = 0
    edc_items: int = 0
    odm_files: list[Path] = field(default_factory=list)
    odm_invalid: list[str] = field(default_factory=list)
    store_url: str = ""
    base_url: str = ""
    credentials: list[Any] = field(default_factory=list)  # esource.api.auth.DemoCredential, one per role


def run_demo(workdir: Path, *, reset: bool = True, serve: bool = False, port: int = 8080,
             enrollment_file: Path | None = None, quiet: bool = False, timeout: float = 120.0) -> DemoSummary:
    """Start the service on embedded defaults (SQLite, HTTP + file intake, the sandbox EDC mounted at
    /edc), feed the demo data in — initial summaries as a file backfill, later updates over HTTP —
    wait until every transaction is acknowledged by the sandbox EDC, and print a summary and URLs."""
    import time

    import httpx
    from rich.console import Console

    from esource.adapters.http import create_app
    from esource.bootstrap import build
    from esource.connectors.sandbox_edc import create_sandbox_app
    from esource.observability import configure_logging
    from esource.services.ingest import Envelope
    from esource.services.server import ThreadedServer, free_port, start_background
    from esource.settings import load_settings

    console = Console(quiet=quiet, width=110)
    workdir = Path(workdir)
    if reset and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    enrollment_file = enrollment_file or builtin_config_dir() / "demo_enrollment.yaml"
    study_oid, enrollments, feed = load_enrollment_file(enrollment_file)
    wanted = port
    port = free_port(port)
    base = f"http://127.0.0.1:{port}"
    summary = DemoSummary(subjects=len(enrollments), base_url=base)
    summary.store_url = f"sqlite:///{(workdir / 'esource.sqlite').resolve()}"
    settings = load_settings(mode="demo", database_url=summary.store_url, studies=[study_oid],
                             http={"host": "127.0.0.1", "port": port},
                             edc={"connector": "sandbox", "url": f"{base}/edc", "timeout_s": 10},
                             log={"level": "WARNING", "json": True})
    configure_logging("WARNING")
    container = build(settings)
    app = create_app(container)
    app.mount("/edc", create_sandbox_app(workdir / "sandbox-edc.sqlite"))
    server = ThreadedServer(app, "127.0.0.1", port)
    server.start()
    bg = start_background(container, kafka=False)
    study = container.studies[study_oid]
    try:
        enroll(container.store.uow, enrollments)
        from esource.api.auth import get_authenticator, seed_demo_users

        summary.credentials = seed_demo_users(get_authenticator(container), study.oid, study.spec.study.sites[0])
        console.print(f"[bold]esource demo[/] — study {study.oid} ({study.metadata_version_oid}), "
                      f"{len(enrollments)} subjects enrolled, store {summary.store_url}")
        if wanted and port != wanted:
            console.print(f"  (port {wanted} is busy: using {port})")
        with httpx.Client(base_url=base, timeout=60) as http:
            for i, folder in enumerate(feed):
                over_http = i > 0  # later messages arrive over FHIR HTTP, the first summaries as a backfill
                for path in iter_input_files([folder]):
                    summary.files += 1
                    rel = path.relative_to(enrollment_file.parent) if path.is_relative_to(enrollment_file.parent) else path
                    data = read_input_file(path, max_bytes=settings.http.max_body_bytes)
                    if over_http:
                        r = http.post("/fhir", content=data, headers={"Content-Type": "application/fhir+json",
                                                                       "X-Request-ID": f"demo-{rel}"})
                        ok = r.status_code == 202
                        if not ok:
                            summary.dead_letters.append(f"{rel}: HTTP {r.status_code} {r.text[:200]}")
                        console.print(f"  POST /fhir {rel}: {r.status_code}")
                        continue
                    result = container.ingest.ingest_bytes(data, Envelope("file", f"{rel}:{content_key(data)}", str(rel)))
                    if not result.accepted:
                        summary.dead_letters.append(result.error or "")
                        continue
                    summary.duplicates += result.duplicate
                    dropped = sum(o.dropped_not_enrolled for o in result.outcomes.values())
                    summary.dropped_not_enrolled += dropped
                    who = ", ".join(s.subject_key for o in result.outcomes.values() for s in o.subjects) or "no enrolled subject"
                    console.print(f"  file {rel}: {len(result.parsed.resources)} resources -> {who}: "
                                  f"{result.items_sent} item(s) in the outbox"
                                  + (f", {dropped} resource(s) of a patient not enrolled dropped" if dropped else ""))
        # wait until the dispatcher has delivered everything to the sandbox EDC
        deadline = time.monotonic() + timeout
        while True:
            with container.store.uow(read_only=True) as uow:
                pending = uow.outbox_entries(statuses=("pending", "failed"))
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        out_dir = workdir / "outbox"
        out_dir.mkdir(exist_ok=True)
        with container.store.uow(read_only=True) as uow:
            for e in enrollments:
                for key in uow.sent_items(study.oid, e.subject_key):
                    summary.items_by_form[key.form_oid] += 1
            for d in uow.open_discrepancies(study.oid):
                summary.discrepancies_by_kind[d.kind.value] += 1
            entries = uow.outbox_entries(statuses=None)
            summary.transactions = len(entries)
        summary.delivered = sum(1 for e in entries if e.status in ("sent", "acked"))
        for e in entries:
            f = out_dir / f"{e.study_oid}_{e.subject_key}_{e.sequence:06d}.xml"
            f.write_bytes(e.odm)
            summary.odm_files.append(f)
            errors = validate_odm(e.odm)
            if errors:
                summary.odm_invalid.append(f"{f.name}: {errors[0]}")
        items = httpx.get(f"{base}/edc/studies/{study.oid}/items", timeout=30).json()
        summary.edc_items = len(items) if isinstance(items, list) else len(items.get("items", []))
        _print_summary(console, summary, workdir, study.oid)
        if summary.odm_invalid:
            raise EsourceError(f"{len(summary.odm_invalid)} ODM file(s) failed XSD validation")
        if serve:
            console.print("\n[bold]serving[/] — press Ctrl-C to stop")
            try:
                while not bg.stop.wait(1.0):
                    pass
            except KeyboardInterrupt:
                pass
    finally:
        bg.shutdown()
        server.stop()
        container.close()
    return summary


def _print_summary(console: "Any", summary: DemoSummary, workdir: Path, study_oid: str) -> None:
    from rich.table import Table

    t = Table(title="Items sent, by form")
    t.add_column("form")
    t.add_column("items", justify="right")
    for form, n in sorted(summary.items_by_form.items()):
        t.add_row(form, str(n))
    console.print(t)
    t = Table(title="Open discrepancies, by kind")
    t.add_column("kind")
    t.add_column("count", justify="right")
    for kind, n in sorted(summary.discrepancies_by_kind.items()):
        t.add_row(kind, str(n))
    console.print(t)
    console.print(f"subjects: {summary.subjects} · files fed: {summary.files} · ODM transactions: {summary.transactions}, "
                  f"{summary.delivered} acknowledged by the sandbox EDC ({summary.edc_items} items held there) · "
                  f"{len(summary.odm_files)} ODM files in {workdir / 'outbox'} "
                  f"({'all' if not summary.odm_invalid else len(summary.odm_files) - len(summary.odm_invalid)} valid "
                  f"against the ODM 1.3.2 XSD) · resources of patients not enrolled dropped: "
                  f"{summary.dropped_not_enrolled} · dead letters: {len(summary.dead_letters)}")
    for dl in summary.dead_letters:
        console.print(f"  dead letter: {dl}")
    for bad in summary.odm_invalid:
        console.print(f"  [red]invalid ODM[/]: {bad}")
    if summary.credentials:
        t = Table(title="Demo accounts (demo mode only; without a token a request acts as the demo admin)")
        for col in ("user", "role", "scope", "password"):
            t.add_column(col)
        for c in summary.credentials:
            t.add_row(c.username, c.role.value, ", ".join((*c.sites, *c.studies)) or "all", c.password)
        console.print(t)
        for c in summary.credentials:
            console.print(f"  {c.username:<12} Authorization: Bearer {c.token}", soft_wrap=True)
    b = summary.base_url
    logins = ", ".join(f"{c.username} / {c.password}" for c in summary.credentials  # the dashboard's roles
                       if c.role.value in ("cra", "data_manager", "admin"))
    console.print(f"\n[bold]Dashboard[/]: {b}/ui/" + (f"  — log in as {logins}" if logins else ""), soft_wrap=True)
    console.print("\nLook at:")
    for url, what in ((f"{b}/docs", "the API (OpenAPI)"), (f"{b}/studies/{study_oid}/subjects", "enrolled subjects"),
                      (f"{b}/studies/{study_oid}/transfers", "the ODM transactions sent (as a demo token's role)"),
                      (f"{b}/studies/{study_oid}/odm/clinicaldata", "ODM ClinicalData pull (edc, data_manager)"),
                      (f"{b}/metrics", "Prometheus metrics"), (f"{b}/ready", "readiness"),
                      (f"{b}/edc/studies/{study_oid}/items", "what the sandbox EDC holds"),
                      (f"{b}/edc/studies/{study_oid}/subjects/002-0001/clinicaldata", "a subject's ODM in the EDC")):
        console.print(f"  {url}  — {what}")
