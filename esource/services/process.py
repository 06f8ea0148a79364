"""The main use case: one FHIR input (bundle or resource) -> per enrolled subject, the facts kept, the
map re-run over all of the subject's facts, the state diff, discrepancies and one ODM transaction in
the outbox — all in one unit of work. Every channel (file, HTTP, Kafka) calls `ingest`.

Why re-run over all facts: visit selection depends on every reading, not only the newest message. A
new reading can be closer to a visit's target day than the one already sent (an Update), and a
retracted source changes the selection too. Re-running is idempotent; the diff decides what goes out.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

from esource.domain.model import (
    Discrepancy,
    DiscrepancyKind,
    Enrollment,
    ItemChange,
    ItemKey,
    ItemValue,
    MappingResult,
    Severity,
    SourceRef,
    SourceResource,
    SubjectTransaction,
    TransactionType,
)
from esource.domain.ports import Clock, SentItem, StoredFact, SystemClock, UnitOfWork
from esource.intake.parse import ParsedInput
from esource.intake.references import ReferenceResolver
from esource.mapping.engine import MappingContext, MappingEngine
from esource.odm.writer import write_clinical_data
from esource.privacy import Pseudonymizer
from esource.study.study import Study

# elements never kept in the subject's facts: free text and people (the map never reads them)
_SCRUB = ("text", "note", "performer", "photo", "name", "telecom", "address", "contact")


@dataclass
class SubjectOutcome:
    subject_key: str
    items_sent: int = 0
    inserts: int = 0
    updates: int = 0
    discrepancies_new: int = 0
    outbox_id: int | None = None


@dataclass
class IngestOutcome:
    intake_key: str
    duplicate: bool = False
    resources: int = 0
    dropped_not_enrolled: int = 0
    unattributed: int = 0
    subjects: list[SubjectOutcome] = field(default_factory=list)
    discrepancies_by_kind: Counter = field(default_factory=Counter)


def scrub(resource: dict) -> dict:
    """What esource keeps of a source resource: what maps read, without narrative, notes or people."""
    out = {k: v for k, v in resource.items() if k not in _SCRUB}
    if resource.get("resourceType") == "Patient":
        # the Patient keeps only what DM and matching read: identifiers stay inside the hospital store
        out = {k: resource[k] for k in ("resourceType", "id", "meta", "identifier", "gender", "birthDate")
               if k in resource}
    return out


def _facts_to_resources(facts: list[StoredFact]) -> list[SourceResource]:
    out = []
    for i, f in enumerate(facts):
        ref = SourceRef(f.resource_type, f.resource_id, f.version, f.identity, f.full_url)
        out.append(SourceResource(f.resource_type, f.resource_id, f.full_url, f.resource, ref, "store", i))
    return out


class Processor:
    """Wires the engine to a unit of work. One `ingest` call = one database transaction."""

    def __init__(self, study: Study, engine: MappingEngine, uow_factory: Callable[[], UnitOfWork],
                 pseudonymizer: Pseudonymizer, clock: Clock | None = None) -> None:
        self.study = study
        self.engine = engine
        self.uow_factory = uow_factory
        self.pseudonymizer = pseudonymizer
        self.clock = clock or SystemClock()

    # ------------------------------------------------------------------ grouping

    def _patient_identifiers(self, patient: SourceResource | dict | None) -> list[tuple[str, str]]:
        res = patient.resource if isinstance(patient, SourceResource) else patient
        if not isinstance(res, dict):
            return []
        out = []
        for ident in res.get("identifier") or []:
            if isinstance(ident, dict) and isinstance(ident.get("system"), str) and isinstance(ident.get("value"), str):
                out.append((ident["system"], ident["value"]))
        return out

    def group_by_patient(self, parsed: ParsedInput) -> tuple[dict[tuple[tuple[str, str], ...], list[SourceResource]], int]:
        """Resources the study reads, grouped by their Patient's identifiers; count of unattributable ones."""
        resolver = ReferenceResolver(parsed)
        patients = parsed.by_type("Patient")
        groups: dict[tuple[tuple[str, str], ...], list[SourceResource]] = {}
        unattributed = 0
        for res in parsed.resources:
            if res.resource_type not in self.engine.resource_types:
                continue
            if res.resource_type == "Medication":
                continue  # goes along with every group (referenced by statements)
            patient = resolver.patient_of(res)
            if patient is None and len(patients) == 1:
                patient = patients[0]
            idents = tuple(sorted(self._patient_identifiers(patient)))
            if not idents:
                # a reference carrying an identifier (logical reference) is enough to match
                for key in ("subject", "patient"):
                    ref = res.resource.get(key)
                    if isinstance(ref, dict) and isinstance(ref.get("identifier"), dict):
                        ident = ref["identifier"]
                        if isinstance(ident.get("system"), str) and isinstance(ident.get("value"), str):
                            idents = ((ident["system"], ident["value"]),)
            if not idents:
                unattributed += 1
                continue
            groups.setdefault(idents, []).append(res)
        meds = parsed.by_type("Medication")
        if meds:
            for g in groups.values():
                g.extend(meds)
        return groups, unattributed

    # ------------------------------------------------------------------ use case

    def ingest(self, parsed: ParsedInput, intake_key: str) -> IngestOutcome:
        outcome = IngestOutcome(intake_key=intake_key, resources=len(parsed.resources))
        groups, outcome.unattributed = self.group_by_patient(parsed)
        now = self.clock.now()
        with self.uow_factory() as uow:
            if uow.seen_intake(intake_key):
                outcome.duplicate = True
                return outcome
            for idents, resources in groups.items():
                enrollment = uow.find_enrollment(self.study.oid, idents)
                if enrollment is None:
                    # privacy: nothing of a patient who is not enrolled is kept; only a count
                    outcome.dropped_not_enrolled += sum(1 for r in resources if r.resource_type != "Medication")
                    continue
                outcome.subjects.append(self._subject(uow, enrollment, resources, parsed.deletions, now, outcome))
            uow.mark_intake(intake_key)
            uow.commit()
        return outcome

    def _subject(self, uow: UnitOfWork, enrollment: Enrollment, resources: list[SourceResource],
                 deletions: list[str], now: dt.datetime, outcome: IngestOutcome) -> SubjectOutcome:
        study_oid, subject = self.study.oid, enrollment.subject_key
        today = now.date()
        so = SubjectOutcome(subject)
        for res in resources:
            fact = StoredFact(res.ref.identity, res.resource_type, res.id, res.ref.version, res.full_url,
                              scrub(res.resource), today)
            uow.upsert_fact(study_oid, subject, fact)
        facts = _facts_to_resources(uow.facts(study_oid, subject))
        ctx = MappingContext(repeat_keys=uow.repeat_keys, first_seen=uow.first_seen, today=today)
        result = self.engine.map_subject(enrollment, facts, ctx, deletions=deletions)
        sent = uow.sent_items(study_oid, subject)
        changes, new_state, extra = diff_state(result, sent, self.pseudonymizer, study_oid, subject)
        if any(item.frozen for item in sent.values()):
            # a value site staff changed in the EDC is never overwritten: a later source change for it
            # refreshes its conflict discrepancy with the new proposed value
            from esource.services.conflicts import conflict_followups

            conflicts = [d for d in uow.open_discrepancies(study_oid, subject) if d.kind is DiscrepancyKind.EDC_CONFLICT]
            extra += conflict_followups(result.items, sent, conflicts)
        for d in list(result.discrepancies) + extra:
            if uow.upsert_discrepancy(d):
                so.discrepancies_new += 1
                outcome.discrepancies_by_kind[d.kind.value] += 1
        if changes:
            known = uow.subject_known(study_oid, subject)
            tx = SubjectTransaction(
                study_oid=study_oid, metadata_version_oid=self.study.metadata_version_oid, subject_key=subject,
                site_oid=enrollment.site_oid, subject_transaction_type=None if known else TransactionType.INSERT,
                changes=changes, sequence=uow.next_sequence(study_oid, subject))
            file_oid = f"ESOURCE.{study_oid}.{subject}.{tx.sequence:06d}"
            odm = write_clinical_data([tx], file_type="Transactional", file_oid=file_oid, creation=now,
                                      pseudonymizer=self.pseudonymizer, metadata=self.study.metadata)
            so.outbox_id = uow.add_outbox(tx, odm)
            so.items_sent = len(changes)
            so.inserts = sum(1 for c in changes if c.transaction_type is TransactionType.INSERT)
            so.updates = len(changes) - so.inserts
        uow.put_sent_items(new_state)
        return so


def _sent(iv: ItemValue, frozen: bool = False) -> SentItem:
    return SentItem(iv.key, iv.value, iv.source.identity, iv.source.version, iv.source.resource_type, iv.source.id,
                    iv.rule, frozen)


def _retracted(prev: SentItem, retracted: dict[str, SourceRef]) -> bool:
    return prev.source_identity in retracted or f"{prev.source_type}/{prev.source_id}" in retracted


def diff_state(result: MappingResult, sent: dict[ItemKey, SentItem], pseudonymizer: Pseudonymizer,
               study_oid: str, subject_key: str) -> tuple[list[ItemChange], list[SentItem], list[Discrepancy]]:
    """What changed since the last transaction: Inserts, Updates (with ReasonForChange naming the
    pseudonymous source and version), and items frozen because their source was retracted."""
    changes: list[ItemChange] = []
    state: list[SentItem] = []
    extra: list[Discrepancy] = []
    produced = {iv.key: iv for iv in result.items}
    # items sent from a retracted source are frozen; one discrepancy per frozen item group
    frozen_groups: dict[tuple, list[tuple[SentItem, ItemValue | None]]] = {}
    for key, prev in sent.items():
        if prev.frozen or not _retracted(prev, result.retracted_sources):
            continue
        group = (key.study_event_oid, key.study_event_repeat_key, key.form_oid, key.item_group_oid,
                 key.item_group_repeat_key, prev.source_identity)
        frozen_groups.setdefault(group, []).append((prev, produced.get(key)))
        state.append(SentItem(prev.key, prev.value, prev.source_identity, prev.source_version, prev.source_type,
                              prev.source_id, prev.rule, frozen=True))
    for (event, _erk, form, _ig, repeat, _identity), members in frozen_groups.items():
        prev0 = members[0][0]
        ref = SourceRef(prev0.source_type, prev0.source_id, prev0.source_version, prev0.source_identity)
        proposals = [(p, iv) for p, iv in members if iv is not None and iv.value != p.value]
        if proposals:
            what = "the selection rule would now send " + ", ".join(
                f"{p.key.item_oid}={iv.value!r}" for p, iv in proposals)
        elif all(iv is None for _, iv in members):
            what = "the selection rule now has no other value"
        else:
            what = "the selection rule would keep the same values from another source"
        frozen_values = ", ".join(f"{p.key.item_oid}={p.value!r}" for p, _ in members)
        extra.append(Discrepancy(
            kind=DiscrepancyKind.ENTERED_IN_ERROR,
            message=(f"{form} {repeat or ''} at {event}: the source of the sent values ({frozen_values}) was marked "
                     f"entered-in-error or deleted; the eCRF values are frozen and {what}. A data manager decides."),
            study_oid=study_oid, subject_key=subject_key, source=ref, item_oid=None,
            study_event_oid=event, form_oid=form, item_group_repeat_key=repeat, severity=Severity.ERROR,
            candidates=tuple({"item_oid": p.key.item_oid, "sent_value": p.value,
                              "proposed_value": iv.value if iv else None,
                              "proposed_source": iv.source.outbound() if iv else None} for p, iv in members),
        ))
    frozen_now = {s.key for s in state}
    for key, iv in produced.items():
        prev = sent.get(key)
        if key in frozen_now or (prev is not None and prev.frozen):
            continue
        if prev is None:
            changes.append(ItemChange(iv, TransactionType.INSERT))
            state.append(_sent(iv))
            continue
        if prev.value == iv.value:
            if prev.source_identity != iv.source.identity or prev.source_version != iv.source.version:
                state.append(_sent(iv))  # same value, newer lineage: nothing to send
            continue
        pseudo = pseudonymizer.reference(iv.source)
        if prev.source_identity == iv.source.identity:
            reason = f"Source {pseudo} changed (version {iv.source.version}): {prev.value} -> {iv.value}"
        else:
            reason = (f"A reading the selection rule now prefers was received ({pseudo}, version "
                      f"{iv.source.version}): {prev.value} -> {iv.value}")
        changes.append(ItemChange(iv, TransactionType.UPDATE, previous_value=prev.value, reason_for_change=reason))
        state.append(_sent(iv))
    return changes, state, extra


def intake_key_for(channel: str, *parts: str | int) -> str:
    """channel + (topic, partition, offset) or request id: a re-delivered message changes nothing."""
    return channel + ":" + ":".join(str(p) for p in parts)


def content_key(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def enroll(uow_factory: Callable[[], UnitOfWork], enrollments: Iterable[Enrollment]) -> int:
    n = 0
    with uow_factory() as uow:
        for e in enrollments:
            if uow.find_enrollment(e.study_oid, e.identifiers) is None:
                uow.add_enrollment(e)
                n += 1
        uow.commit()
    return n
