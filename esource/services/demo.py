"""`esource demo`: the main job on embedded defaults. The CV01 demo enrollment (config/) and its
sample data go through the same use case as the service (file intake -> map -> state -> outbox), with
SQLite as the store and an ODM file drop as the EDC; then a summary."""

from __future__ import annotations

import datetime as dt
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from esource.adapters.files import iter_input_files, read_input_file
from esource.connectors.odm_file import OdmFileConnector
from esource.domain.model import Enrollment
from esource.errors import EsourceError, IntakeError, StudyConfigError
from esource.intake.parse import parse_fhir
from esource.mapping.engine import MappingEngine
from esource.odm.xsd import validate_odm
from esource.privacy import Pseudonymizer
from esource.services.dispatch import drain_outbox
from esource.services.process import Processor, content_key, enroll, intake_key_for
from esource.store.sqlalchemy_uow import Store
from esource.study.study import load_study


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
    odm_files: list[Path] = field(default_factory=list)
    odm_invalid: list[str] = field(default_factory=list)
    store_url: str = ""


def run_demo(workdir: Path, *, reset: bool = True, enrollment_file: Path | None = None, quiet: bool = False) -> DemoSummary:
    from rich.console import Console
    from rich.table import Table

    console = Console(quiet=quiet)
    workdir = Path(workdir)
    if reset and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    enrollment_file = enrollment_file or builtin_config_dir() / "demo_enrollment.yaml"
    study_oid, enrollments, feed = load_enrollment_file(enrollment_file)
    study = load_study(study_oid)
    summary = DemoSummary(subjects=len(enrollments))
    summary.store_url = f"sqlite:///{(workdir / 'esource.sqlite').resolve()}"
    store = Store(summary.store_url)
    try:
        engine = MappingEngine(study)
        processor = Processor(study, engine, store.uow, Pseudonymizer.from_env(allow_demo_key=True))
        enroll(store.uow, enrollments)
        connector = OdmFileConnector(workdir / "outbox")
        console.print(f"[bold]esource demo[/] — study {study.oid} ({study.metadata_version_oid}), "
                      f"{len(enrollments)} subjects enrolled, store {summary.store_url}")
        for folder in feed:
            for path in iter_input_files([folder]):
                summary.files += 1
                rel = path.relative_to(enrollment_file.parent) if path.is_relative_to(enrollment_file.parent) else path
                try:
                    data = read_input_file(path, max_bytes=50 * 1024 * 1024)
                    parsed = parse_fhir(data, str(rel), max_bytes=50 * 1024 * 1024)
                except IntakeError as exc:
                    summary.dead_letters.append(str(exc))
                    continue
                outcome = processor.ingest(parsed, intake_key_for("file", str(rel), content_key(data)))
                summary.duplicates += outcome.duplicate
                summary.dropped_not_enrolled += outcome.dropped_not_enrolled
                sent = sum(s.items_sent for s in outcome.subjects)
                new_d = sum(s.discrepancies_new for s in outcome.subjects)
                who = ", ".join(s.subject_key for s in outcome.subjects) or "no enrolled subject"
                console.print(f"  {rel}: {outcome.resources} resources -> {who}: {sent} item(s) in the outbox, "
                              f"{new_d} new discrepanc{'y' if new_d == 1 else 'ies'}"
                              + (f", {outcome.dropped_not_enrolled} resource(s) of a patient not enrolled dropped"
                                 if outcome.dropped_not_enrolled else ""))
                drain_outbox(store.uow, connector, study.metadata_version_oid)
        with store.uow(read_only=True) as uow:
            for e in enrollments:
                for key in uow.sent_items(study.oid, e.subject_key):
                    summary.items_by_form[key.form_oid] += 1
            for d in uow.open_discrepancies(study.oid):
                summary.discrepancies_by_kind[d.kind.value] += 1
            summary.transactions = len(uow.outbox_entries(statuses=None))
        summary.odm_files = sorted((workdir / "outbox").glob("*.xml"))
        for f in summary.odm_files:
            errors = validate_odm(f.read_bytes())
            if errors:
                summary.odm_invalid.append(f"{f.name}: {errors[0]}")
    finally:
        store.dispose()

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
    console.print(f"subjects: {summary.subjects} · files fed: {summary.files} · ODM transactions: "
                  f"{summary.transactions} ({len(summary.odm_files)} files in {workdir / 'outbox'}, "
                  f"{'all' if not summary.odm_invalid else len(summary.odm_files) - len(summary.odm_invalid)} valid "
                  f"against the ODM 1.3.2 XSD) · resources of patients not enrolled dropped: "
                  f"{summary.dropped_not_enrolled} · dead letters: {len(summary.dead_letters)}")
    for dl in summary.dead_letters:
        console.print(f"  dead letter: {dl}")
    for bad in summary.odm_invalid:
        console.print(f"  [red]invalid ODM[/]: {bad}")
    if summary.odm_invalid:
        raise EsourceError(f"{len(summary.odm_invalid)} ODM file(s) failed XSD validation")
    return summary
