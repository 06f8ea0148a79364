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
from typing import Any, Callable, Generator, Iterable, Sequence

from esource.domain.audit import SYSTEM_ACTOR, AuditAction, AuditEvent
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
from esource.errors import EnrollmentError
from esource.intake.parse import ParsedInput
from esource.intake.references import ReferenceResolver
from esource.mapping.engine import NO_READING, MappingContext, MappingEngine
from esource.odm.writer import write_clinical_data
from esource.privacy import Pseudonymizer
from esource.study.study import Study

# elements never kept in the subject's facts: free text and people (the map never reads them)
_SCRUB = ("text", "note", "performer", "photo", "name", "telecom", "address", "contact")


# review-before-send policy: (study, proposed changes) -> (changes to send now, discrepancies holding the rest)
HoldForReview = Callable[[Study, list[ItemChange]], tuple[list[ItemChange], list[Discrepancy]]]


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
                 pseudonymizer: Pseudonymizer, clock: Clock | None = None,
                 hold_for_review: HoldForReview | None = None) -> None:
        self.study = study
        self.hold_for_review = hold_for_review
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
        """One input in one unit of work (HTTP requests, files)."""
        return self.ingest_batch([(parsed, intake_key)])[0]

    def ingest_batch(self, inputs: Sequence[tuple[ParsedInput, str]]) -> list[IngestOutcome]:
        """Many inputs in one unit of work: each subject touched is mapped once, over all of its facts,
        and gets at most one ODM transaction for the whole batch (the final state; intermediate values
        never reach the EDC). This is what lets a Kafka backlog drain at thousands of resources per
        second: re-mapping a subject per message made the cost grow with every message.

        Inputs are applied in order (later versions of a record replace earlier ones, unless stale).
        An EsourceError (e.g. identifiers matching two subjects) aborts the whole batch: the caller
        retries the inputs one by one, so only the bad one is parked."""
        now = self.clock.now()
        outcomes: list[IngestOutcome] = []
        pending: dict[str, _PendingSubject] = {}
        with self.uow_factory() as uow:
            seen = uow.seen_intakes([key for _, key in inputs])
            # the fresh inputs' resources by patient (None: a duplicate), then every patient of the
            # batch looked up at once
            grouped: list[tuple[dict[tuple[tuple[str, str], ...], list[SourceResource]], int] | None] = []
            for parsed, intake_key in inputs:
                grouped.append(None if intake_key in seen else self.group_by_patient(parsed))
                seen.add(intake_key)
            matched = uow.find_enrollments(self.study.oid, [idents for g in grouped if g is not None for idents in g[0]])
            fresh: list[str] = []
            for (parsed, intake_key), group in zip(inputs, grouped):
                outcome = IngestOutcome(intake_key=intake_key, resources=len(parsed.resources))
                outcomes.append(outcome)
                if group is None:
                    outcome.duplicate = True
                    uow.audit(AuditEvent(AuditAction.MESSAGE_DUPLICATE, study_oid=self.study.oid,
                                         detail={"intake": self.pseudonymizer.token(intake_key, "intake")}, at=now))
                    continue
                fresh.append(intake_key)
                uow.audit(AuditEvent(AuditAction.MESSAGE_RECEIVED, study_oid=self.study.oid, at=now,
                                     detail={"intake": self.pseudonymizer.token(intake_key, "intake"), "resources": len(parsed.resources)}))
                groups, outcome.unattributed = group
                dropped = 0
                for idents, resources in groups.items():
                    enrollment = matched[idents]
                    if enrollment is None:
                        # privacy: nothing of a patient who is not enrolled is kept; only a count
                        dropped += sum(1 for r in resources if r.resource_type != "Medication")
                        continue
                    p = pending.get(enrollment.subject_key)
                    if p is None:
                        p = pending[enrollment.subject_key] = _PendingSubject(enrollment, outcome)
                    p.resources.extend(resources)
                    p.deletions.extend(parsed.deletions)
                    p.outcome = outcome  # the subject's transaction is reported with the last input
                    uow.audit(AuditEvent(AuditAction.PATIENT_MATCHED, study_oid=self.study.oid,
                                         subject_key=enrollment.subject_key, site_oid=enrollment.site_oid, at=now,
                                         detail={"intake": self.pseudonymizer.token(intake_key, "intake"), "resources": len(resources)}))
                if dropped:
                    outcome.dropped_not_enrolled += dropped
                    uow.audit(AuditEvent(AuditAction.PATIENT_DROPPED, study_oid=self.study.oid, at=now,
                                         reason="patient not enrolled in the study: nothing kept",
                                         detail={"intake": self.pseudonymizer.token(intake_key, "intake"), "resources": dropped}))
            uow.mark_intakes(fresh)
            # what every subject's run reads anyway, for all of them at once (a round trip per subject
            # each was most of a small batch's time on PostgreSQL); their new states written at once
            keys = list(pending)
            batch = None
            if keys:
                study_oid, today = self.study.oid, now.date()
                stored = uow.store_facts_of(study_oid, {k: self._incoming(p.resources, today)
                                                        for k, p in pending.items()})
                batch = _BatchReads(uow.outbox_positions(study_oid, keys), uow.frozen_items(study_oid, keys), stored,
                                    uow.sent_items_from(study_oid, {k: stored[k][1] for k in keys}))
                # every subject's run in step: first all their fact reads, then all their item-state
                # reads, each one call for the batch, then each run's writes in subject order
                runs = {k: self._subject_steps(uow, p.enrollment, p.resources, p.deletions, now, p.outcome,
                                               batch=batch) for k, p in pending.items()}
                reads = {k: next(run) for k, run in runs.items()}
                facts = uow.facts_of(study_oid, {k: r.dates for k, r in reads.items()}, self.engine.clinical_basis)
                sent_reads = {k: runs[k].send(facts[k]) for k in runs}
                sent = uow.sent_items_in(study_oid, {k: (r.buckets, r.identities) for k, r in sent_reads.items()})
                for k, p in pending.items():
                    p.outcome.subjects.append(_finish(runs[k], sent[k]))
                uow.put_sent_items(batch.states)
            uow.commit()
        return outcomes

    def remap(self, subject_keys: Iterable[str] | None = None, *, actor: str = SYSTEM_ACTOR,
              reason: str = "re-map") -> list[SubjectOutcome]:
        """Re-run the map over the stored facts of some (or all) enrolled subjects, e.g. after a map
        change or a data manager's decision: whatever now differs from what was sent goes out as a
        new transaction, new findings become discrepancies. One unit of work, audited with the actor."""
        now = self.clock.now()
        out: list[SubjectOutcome] = []
        with self.uow_factory() as uow:
            enrolled = {e.subject_key: e for e in uow.enrollments(self.study.oid)}
            wanted = list(enrolled) if subject_keys is None else list(dict.fromkeys(subject_keys))
            unknown = [k for k in wanted if k not in enrolled]
            if unknown:
                raise EnrollmentError(f"not enrolled in {self.study.oid}: {', '.join(unknown)}")
            for key in wanted:
                outcome = IngestOutcome(intake_key=f"remap:{key}")
                so = self._subject(uow, enrolled[key], [], [], now, outcome, actor=actor, reason=reason,
                                   incremental=False)
                out.append(so)
            uow.commit()
        return out

    def _incoming(self, resources: list[SourceResource], today: dt.date) -> list[StoredFact]:
        """What is kept of a subject's new resources (scrubbed), with the day their readings fall on."""
        engine, basis = self.engine, self.engine.clinical_basis
        incoming = []
        for res in resources:
            kept = scrub(res.resource)
            incoming.append(StoredFact(res.ref.identity, res.resource_type, res.id, res.ref.version, res.full_url,
                                       kept, today, engine.clinical_date(res.resource_type, kept), basis))
        return incoming

    def _subject(self, uow: UnitOfWork, enrollment: Enrollment, resources: list[SourceResource],
                 deletions: list[str], now: dt.datetime, outcome: IngestOutcome, *, actor: str = SYSTEM_ACTOR,
                 reason: str | None = None, incremental: bool = True) -> SubjectOutcome:
        """Map one subject on its own: its run's reads answered one by one."""
        study_oid, subject, basis = self.study.oid, enrollment.subject_key, self.engine.clinical_basis
        run = self._subject_steps(uow, enrollment, resources, deletions, now, outcome, actor=actor, reason=reason,
                                  incremental=incremental)
        facts_read = next(run)
        sent_read = run.send(uow.facts(study_oid, subject, dates=facts_read.dates, basis=basis))
        if sent_read.buckets is None:
            sent = uow.sent_items(study_oid, subject)
        else:
            sent = uow.sent_items(study_oid, subject, buckets=sent_read.buckets, identities=sent_read.identities,
                                  frozen=False)
        return _finish(run, sent)

    def _subject_steps(self, uow: UnitOfWork, enrollment: Enrollment, resources: list[SourceResource],
                       deletions: list[str], now: dt.datetime, outcome: IngestOutcome, *, actor: str = SYSTEM_ACTOR,
                       reason: str | None = None, incremental: bool = True, batch: _BatchReads | None = None
                       ) -> Generator[_FactsRead | _SentRead, Any, SubjectOutcome]:
        """One subject's run, as steps: it yields the facts it needs (gets them back), then the item
        states it diffs against (gets them back), and returns its outcome. Why steps: a batch answers
        each read for all of its subjects in one statement (`ingest_batch`). With `batch`, its facts
        were stored and its outbox position, frozen items and items sent from the changed sources
        read with the batch's other subjects, and its new item state is left in `batch.states`."""
        study_oid, subject = self.study.oid, enrollment.subject_key
        site = enrollment.site_oid
        today = now.date()
        so = SubjectOutcome(subject)
        engine, basis = self.engine, self.engine.clinical_basis
        if batch is None:
            stored, changed, replaced = uow.store_facts(study_oid, subject, self._incoming(resources, today))
        else:
            stored, changed, replaced = batch.stored[subject]
        ctx = MappingContext(repeat_keys=uow.repeat_keys, first_seen=uow.first_seen, today=today)
        deletions = list(dict.fromkeys(deletions))
        if incremental:
            # only what changed is re-selected, and diffed against the state of the groups it touches;
            # only the facts that can fall in those groups are read (cost independent of the history)
            type_ids = [(t, i.split("/")[0]) for t, _, i in (d.partition("/") for d in deletions)]
            if batch is None:
                before = uow.sent_items(study_oid, subject, buckets=(), identities=changed, type_ids=type_ids)
            else:
                before = {**batch.frozen[subject], **batch.sent_from[subject]}
                if type_ids:
                    before.update(uow.sent_items(study_oid, subject, buckets=(), type_ids=type_ids, frozen=False))
            ctx.changed, ctx.changed_buckets = _changes(changed, deletions, before)
            # where the replaced versions' readings were placed (stored under this map's rules, or worked out)
            ctx.previous_dates = frozenset(
                d for d in (f.clinical_date if f.clinical_basis == basis else engine.clinical_date(f.resource_type,
                                                                                                   f.resource)
                            for f in replaced) if d is not None and d != NO_READING)
            ranges = None
            if not any(f.resource_type == "Patient" for f in stored) and not any(
                    d.startswith("Patient/") for d in deletions):
                # (a changed Patient may change birth-date masking everywhere: the run sees everything)
                ranges = engine.fact_ranges(enrollment, [*(f.clinical_date for f in stored), *ctx.previous_dates],
                                            ctx.changed_buckets)
            facts = _facts_to_resources((yield _FactsRead(ranges)))
            result = self.engine.map_subject(enrollment, facts, ctx, deletions=deletions)
            produced = {(iv.key.study_event_oid, iv.key.study_event_repeat_key, iv.key.form_oid,
                         iv.key.item_group_repeat_key) for iv in result.items}
            # `before` has the frozen items and those sent from the changed sources already
            sent = {**before, **(yield _SentRead(produced | ctx.changed_buckets, ctx.changed - changed))}
        else:
            facts = _facts_to_resources((yield _FactsRead(None)))
            result = self.engine.map_subject(enrollment, facts, ctx, deletions=deletions)
            sent = yield _SentRead(None, frozenset())
        changes, new_state, extra = diff_state(result, sent, self.pseudonymizer, study_oid, subject)
        if any(item.frozen for item in sent.values()):
            # a value site staff changed in the EDC is never overwritten: a later source change for it
            # refreshes its conflict discrepancy with the new proposed value
            from esource.services.conflicts import conflict_followups

            conflicts = [d for d in uow.open_discrepancies(study_oid, subject) if d.kind is DiscrepancyKind.EDC_CONFLICT]
            extra += conflict_followups(result.items, sent, conflicts)
        if self.hold_for_review is not None and changes:
            # review-before-send: held values stay out of the transaction and out of the sent state
            proposed = {c.item.key for c in changes}
            changes, held = self.hold_for_review(self.study, changes)
            held_keys = proposed - {c.item.key for c in changes}
            new_state = [s for s in new_state if s.key not in held_keys]
            extra += held
        for d in list(result.discrepancies) + extra:
            if uow.upsert_discrepancy(d):
                so.discrepancies_new += 1
                outcome.discrepancies_by_kind[d.kind.value] += 1
                uow.audit(_discrepancy_event(d, site, actor, now))
        for s in new_state:
            prev = sent.get(s.key)
            if s.frozen and (prev is None or not prev.frozen):
                uow.audit(AuditEvent(AuditAction.VALUE_FROZEN, actor=actor, study_oid=study_oid, subject_key=subject,
                                     site_oid=site, item=s.key, old_value=s.value, at=now, rule=s.rule,
                                     source=SourceRef(s.source_type, s.source_id, s.source_version, s.source_identity),
                                     reason="the source of the sent value was entered-in-error or deleted"))
        if changes:
            if batch is None:
                known, sequence = uow.subject_known(study_oid, subject), uow.next_sequence(study_oid, subject)
            else:
                known, sequence = batch.positions[subject]
            tx = SubjectTransaction(
                study_oid=study_oid, metadata_version_oid=self.study.metadata_version_oid, subject_key=subject,
                site_oid=site, subject_transaction_type=None if known else TransactionType.INSERT,
                changes=changes, sequence=sequence)
            file_oid = f"ESOURCE.{study_oid}.{subject}.{tx.sequence:06d}"
            odm = write_clinical_data([tx], file_type="Transactional", file_oid=file_oid, creation=now,
                                      pseudonymizer=self.pseudonymizer, metadata=self.study.metadata)
            so.outbox_id = uow.add_outbox(tx, odm)
            so.items_sent = len(changes)
            so.inserts = sum(1 for c in changes if c.transaction_type is TransactionType.INSERT)
            so.updates = len(changes) - so.inserts
            where = {"outbox_id": so.outbox_id, "sequence": tx.sequence}
            for c in changes:
                iv = c.item
                uow.audit(AuditEvent(
                    AuditAction.VALUE_MAPPED, actor=actor, study_oid=study_oid, subject_key=subject, site_oid=site,
                    item=iv.key, old_value=c.previous_value, new_value=iv.value, source=iv.source, rule=iv.rule,
                    reason=reason or c.reason_for_change or "first value from the source", at=now,
                    detail={**where, "transaction_type": c.transaction_type.value,
                            "conversions": list(iv.conversions)}))
            uow.audit(AuditEvent(AuditAction.TRANSFER_QUEUED, actor=actor, study_oid=study_oid, subject_key=subject,
                                 site_oid=site, at=now, reason=reason,
                                 detail={**where, "items": len(changes), "inserts": so.inserts,
                                         "updates": so.updates}))
        if batch is None:
            uow.put_sent_items(new_state)
        else:
            batch.states.extend(new_state)
        return so


def _changes(changed: set[str], deletions: list[str], sent: dict[ItemKey, SentItem]
             ) -> tuple[frozenset[str], frozenset[tuple[str, str | None, str, str | None]]]:
    """What an incremental run re-selects: the identities new or changed in the store (stale or
    repeated arrivals change nothing), retracted ones, and the findings buckets holding values sent
    from any of them (a changed reading may have left its bucket)."""
    changed = set(changed)
    for url in deletions:
        rtype, _, rid = url.partition("/")
        changed.add(f"{rtype}/{rid.split('/')[0]}")
    buckets = frozenset((k.study_event_oid, k.study_event_repeat_key, k.form_oid, k.item_group_repeat_key)
                        for k, item in sent.items() if item.source_identity in changed
                        or f"{item.source_type}/{item.source_id}" in changed)
    return frozenset(changed), buckets


@dataclass(frozen=True, slots=True)
class _FactsRead:
    """A subject run's first read: its facts inside these date ranges (None: all of them)."""

    dates: list[tuple[dt.date, dt.date]] | None


@dataclass(frozen=True, slots=True)
class _SentRead:
    """A subject run's second read: the item state of these buckets and of the items sent from these
    sources (buckets None: the subject's whole state, frozen items included)."""

    buckets: frozenset[tuple[str, str | None, str, str | None]] | None
    identities: frozenset[str]


def _finish(run: Generator[Any, Any, SubjectOutcome], sent: dict[ItemKey, SentItem]) -> SubjectOutcome:
    """Hand a subject run its item states; it does its writes and returns its outcome."""
    try:
        run.send(sent)
    except StopIteration as done:
        return done.value
    raise RuntimeError("a subject run asked for more reads than the two it declares")


@dataclass
class _BatchReads:
    """Per-subject reads done once for a whole batch, and the item states it writes at its end."""

    positions: dict[str, tuple[bool, int]]  # SubjectKey -> (subject known to the EDC, next sequence)
    frozen: dict[str, dict[ItemKey, SentItem]]
    stored: dict[str, tuple[list[StoredFact], set[str], list[StoredFact]]]  # store_facts' answers
    sent_from: dict[str, dict[ItemKey, SentItem]]  # items sent from the sources the batch changed
    states: list[SentItem] = field(default_factory=list)


@dataclass
class _PendingSubject:
    """A subject touched by a batch: its resources in arrival order, and the input it is reported with."""

    enrollment: Enrollment
    outcome: IngestOutcome
    resources: list[SourceResource] = field(default_factory=list)
    deletions: list[str] = field(default_factory=list)


def _discrepancy_event(d: Discrepancy, site: str, actor: str, now: dt.datetime) -> AuditEvent:
    held = d.held_value is not None
    return AuditEvent(
        AuditAction.VALUE_HELD if held else AuditAction.DISCREPANCY_OPENED, actor=actor, study_oid=d.study_oid,
        subject_key=d.subject_key, site_oid=site, new_value=d.held_value, source=d.source, rule=d.rule,
        reason=d.message, at=now,
        detail={"kind": d.kind.value, "severity": d.severity.value, "item_oid": d.item_oid,
                "study_event_oid": d.study_event_oid, "form_oid": d.form_oid,
                "item_group_repeat_key": d.item_group_repeat_key})


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
