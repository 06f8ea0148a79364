"""Dry run (`esource map`): one patient's bundles -> ODM Snapshot or lineage JSON, keeping no state."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from esource.adapters.files import read_input_file
from esource.domain.model import (
    Enrollment,
    ItemChange,
    MappingResult,
    SourceRef,
    SourceResource,
    SubjectTransaction,
    TransactionType,
)
from esource.errors import EnrollmentError
from esource.intake.parse import parse_fhir
from esource.mapping.engine import MappingContext, MappingEngine
from esource.odm.writer import write_clinical_data
from esource.privacy import Pseudonymizer
from esource.study.study import Study

DEFAULT_MAX_BYTES = 50 * 1024 * 1024


@dataclass
class DryRun:
    enrollment: Enrollment
    result: MappingResult
    files: list[str] = field(default_factory=list)
    resources_read: int = 0
    patient_ids: set[str] = field(default_factory=set)


def _scrub_candidate(c: dict[str, Any], patient_ids: set[str], pseudonymizer: Pseudonymizer) -> dict[str, Any]:
    rid = c.get("id")
    if isinstance(rid, str) and any(pid in rid for pid in patient_ids):
        c = dict(c)
        c["id"] = pseudonymizer.reference(SourceRef(str(c.get("resourceType")), rid, str(c.get("versionId")), rid))
        c["id_pseudonymised"] = True
    return c


def validate_enrollment(study: Study, enrollment: Enrollment) -> Enrollment:
    """An enrollment must fit its study: SubjectKey pattern, one of the study's sites, consent on or
    before Day 1, withdrawal not before consent. Raises EnrollmentError saying which rule failed."""
    import re

    spec = study.spec.study
    if enrollment.study_oid != spec.oid:
        raise EnrollmentError(f"the enrollment is for study {enrollment.study_oid}, not {spec.oid}")
    if spec.subject_key_pattern and not re.fullmatch(spec.subject_key_pattern, enrollment.subject_key):
        raise EnrollmentError(f"SubjectKey {enrollment.subject_key!r} does not match the study's pattern "
                              f"{spec.subject_key_pattern}")
    if enrollment.site_oid not in spec.sites:
        raise EnrollmentError(f"site {enrollment.site_oid!r} is not a site of {spec.oid} ({', '.join(spec.sites)})")
    if enrollment.consent_date > enrollment.day1:
        raise EnrollmentError(f"consent ({enrollment.consent_date}) is after Day 1 ({enrollment.day1})")
    if enrollment.withdrawal_date is not None and enrollment.withdrawal_date < enrollment.consent_date:
        raise EnrollmentError(f"withdrawal ({enrollment.withdrawal_date}) is before consent ({enrollment.consent_date})")
    return enrollment


def adhoc_enrollment(study: Study, subject_key: str, site_oid: str, day1: dt.date, consent: dt.date | None = None,
                     withdrawn: dt.date | None = None) -> Enrollment:
    """Enroll a patient for a dry run, checked against the study like a real enrollment."""
    consent = consent or day1 + dt.timedelta(days=study.spec.study.default_consent_offset_days)
    return validate_enrollment(study, Enrollment(study.oid, subject_key, site_oid, (), consent, day1, withdrawn))


def collect(files: Iterable[Path], *, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[list[SourceResource], list[str], list[tuple[SourceRef | None, str]], int]:
    """Read and parse every file (IntakeError for a file that is not FHIR at all). The same source
    record in several files: the later file's version wins, as it would in the service."""
    by_identity: dict[str, SourceResource] = {}
    deletions: list[str] = []
    problems: list[tuple[SourceRef | None, str]] = []
    count = 0
    for path in files:
        parsed = parse_fhir(read_input_file(Path(path), max_bytes=max_bytes), str(path), max_bytes=max_bytes)
        count += len(parsed.resources)
        for res in parsed.resources:
            by_identity.pop(res.ref.identity, None)
            by_identity[res.ref.identity] = res
        deletions.extend(parsed.deletions)
        problems.extend((None, str(p)) for p in parsed.problems)
    return list(by_identity.values()), deletions, problems, count


def dry_run(study: Study, engine: MappingEngine, enrollment: Enrollment, files: list[Path], *,
            today: dt.date | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> DryRun:
    resources, deletions, problems, count = collect(files, max_bytes=max_bytes)
    ctx = MappingContext(today=today or dt.datetime.now(dt.timezone.utc).date())
    result = engine.map_subject(enrollment, resources, ctx, deletions=deletions, invalid_entries=problems)
    patient_ids = {r.id for r in resources if r.resource_type == "Patient" and r.id}
    return DryRun(enrollment, result, [str(f) for f in files], count, patient_ids)


def snapshot_odm(study: Study, run: DryRun, pseudonymizer: Pseudonymizer, *, creation: dt.datetime | None = None) -> bytes:
    creation = creation or dt.datetime.now(dt.timezone.utc)
    tx = SubjectTransaction(
        study_oid=study.oid, metadata_version_oid=study.metadata_version_oid,
        subject_key=run.enrollment.subject_key, site_oid=run.enrollment.site_oid,
        subject_transaction_type=None,
        changes=[ItemChange(item, TransactionType.INSERT) for item in run.result.items],
    )
    file_oid = f"ESOURCE.DRYRUN.{study.oid}.{run.enrollment.subject_key}.{creation.strftime('%Y%m%dT%H%M%S')}"
    return write_clinical_data([tx], file_type="Snapshot", file_oid=file_oid, creation=creation,
                               pseudonymizer=pseudonymizer, metadata=study.metadata)


def _outbound(ref: SourceRef, patient_ids: set[str], pseudonymizer: Pseudonymizer) -> dict[str, Any]:
    """A source for the lineage export: a resource id that embeds the Patient's id (EHRs derive ids
    from the MRN) is replaced by its pseudonymous reference — the Patient id never leaves."""
    out = ref.outbound()
    rid = out.get("id")
    if isinstance(rid, str) and any(pid in rid for pid in patient_ids):
        out["id"] = pseudonymizer.reference(ref)
        out["id_pseudonymised"] = True
    return out


def lineage(run: DryRun, pseudonymizer: Pseudonymizer) -> dict[str, Any]:
    """JSON lineage: exactly the ItemData of the ODM, plus what was not sent and why."""
    patient_ids = {pid for pid in run.patient_ids if len(pid) >= 3}
    items = []
    for iv in run.result.items:
        k = iv.key
        items.append({
            "study_event_oid": k.study_event_oid,
            "study_event_repeat_key": k.study_event_repeat_key,
            "form_oid": k.form_oid,
            "item_group_oid": k.item_group_oid,
            "item_group_repeat_key": k.item_group_repeat_key,
            "item_oid": k.item_oid,
            "value": iv.value,
            "source": _outbound(iv.source, patient_ids, pseudonymizer),
            "source_id": pseudonymizer.source_id(iv.source),
            "rule": iv.rule,
            "conversions": list(iv.conversions),
        })
    not_sent = [{
        "reason": n.reason,
        "source": _outbound(n.source, patient_ids, pseudonymizer),
        "form_oid": n.form_oid,
        "test": n.test_code,
        "study_event_oid": n.study_event_oid,
        "detail": n.detail,
    } for n in run.result.not_sent]
    discrepancies = [{
        "kind": d.kind.value,
        "severity": d.severity.value,
        "message": d.message,
        "item_oid": d.item_oid,
        "study_event_oid": d.study_event_oid,
        "form_oid": d.form_oid,
        "item_group_repeat_key": d.item_group_repeat_key,
        "held_value": d.held_value,
        "source": _outbound(d.source, patient_ids, pseudonymizer) if d.source else None,
        "candidates": [_scrub_candidate(c, patient_ids, pseudonymizer) for c in d.candidates],
    } for d in run.result.discrepancies]
    return {
        "study_oid": run.enrollment.study_oid,
        "subject_key": run.enrollment.subject_key,
        "site_oid": run.enrollment.site_oid,
        "items": items,
        "not_sent": not_sent,
        "discrepancies": discrepancies,
    }
