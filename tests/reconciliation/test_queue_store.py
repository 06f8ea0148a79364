"""The queue in the store (SQLite, and PostgreSQL when ESOURCE_TEST_POSTGRES_DSN is set): filters with
the site from the enrollment, pagination with the total, conditional status transitions, and the
re-opening rule of upsert_discrepancy (same facts: stays closed; changed facts: re-opened)."""

from __future__ import annotations

import datetime as dt

import pytest

from recon_helpers import ACTOR, STUDY
from esource.domain.model import Discrepancy, DiscrepancyKind, SourceRef
from esource.reconciliation.model import DiscrepancyFilter, DiscrepancyNotFound, DiscrepancyStateError
from esource.store.errors import StoreError

A, B = "001-0001", "002-0001"


def disc(subject: str, kind: DiscrepancyKind = DiscrepancyKind.OUT_OF_RANGE, *, item: str = "IT.VS.VSORRES",
         form: str = "F.VS", test: str = "SYSBP", held: str | None = "300", version: str = "1",
         candidates: tuple = ()) -> Discrepancy:
    ref = SourceRef("Observation", f"bp-{subject}-{test}", version, f"Observation/bp-{subject}-{test}")
    return Discrepancy(kind=kind, message=f"{test} held", study_oid=STUDY, subject_key=subject, source=ref,
                       item_oid=item, study_event_oid="SE.BASELINE", form_oid=form, item_group_repeat_key=test,
                       held_value=held, candidates=candidates)


def seed(store, clock) -> dict[str, int]:
    """Four discrepancies: two subjects at two sites, two forms, created a day apart."""
    from esource.domain.model import Enrollment

    ids = {}
    with store.uow() as uow:
        uow.add_enrollment(Enrollment(STUDY, A, "SITE.001", (("sys", "a"),), dt.date(2024, 4, 1), dt.date(2024, 5, 1)))
        uow.add_enrollment(Enrollment(STUDY, B, "SITE.002", (("sys", "b"),), dt.date(2024, 4, 1), dt.date(2024, 5, 1)))
        uow.commit()
    for name, d in (("a_sys", disc(A)), ("a_lb", disc(A, item="IT.LB.LBORRES", form="F.LB", test="GLUC")),
                    ("b_sys", disc(B)), ("b_gender", disc(B, DiscrepancyKind.UNKNOWN_GENDER, item="IT.DM.SEX",
                                                          form="F.DM", test="", held=None))):
        with store.uow() as uow:
            assert uow.upsert_discrepancy(d) is True
            uow.commit()
            ids[name] = uow_id(store, d)
        clock.advance(days=1)
    return ids


def uow_id(store, d: Discrepancy) -> int:
    with store.uow(read_only=True) as uow:
        records, _ = uow.query_discrepancies(DiscrepancyFilter(STUDY, subject_keys=(d.subject_key,)))
    return next(r.id for r in records if r.discrepancy.key == d.key)


def query(store, **kw) -> tuple[list[int], int]:
    limit, offset = kw.pop("limit", None), kw.pop("offset", 0)
    with store.uow(read_only=True) as uow:
        records, total = uow.query_discrepancies(DiscrepancyFilter(STUDY, **kw), limit=limit, offset=offset)
    return [r.id for r in records], total


def test_filters_site_from_the_enrollment_and_pages_with_the_total(store, clock):
    ids = seed(store, clock)
    assert query(store) == ([ids["a_sys"], ids["a_lb"], ids["b_sys"], ids["b_gender"]], 4)
    assert query(store, site_oids=("SITE.002",)) == ([ids["b_sys"], ids["b_gender"]], 2)
    assert query(store, subject_keys=(A,), form_oid="F.LB") == ([ids["a_lb"]], 1)
    assert query(store, kinds=("unknown_gender",)) == ([ids["b_gender"]], 1)
    assert query(store, item_oid="IT.VS.VSORRES") == ([ids["a_sys"], ids["b_sys"]], 2)
    assert query(store, study_event_oid="SE.SCREEN") == ([], 0)
    # pagination: the page and the total of everything matching
    assert query(store, limit=2, offset=1) == ([ids["a_lb"], ids["b_sys"]], 4)
    # created range (age): the clock advanced a day between them
    start = dt.datetime(2025, 3, 1, 9, 0, tzinfo=dt.timezone.utc)
    assert query(store, created_from=start + dt.timedelta(days=1), created_to=start + dt.timedelta(days=3)) == (
        [ids["a_lb"], ids["b_sys"]], 2)
    # another study sees nothing
    with store.uow(read_only=True) as uow:
        assert uow.query_discrepancies(DiscrepancyFilter("CV02")) == ([], 0)


def test_a_record_carries_site_age_and_the_domain_discrepancy(store, clock):
    ids = seed(store, clock)
    with store.uow(read_only=True) as uow:
        rec = uow.get_discrepancy(ids["a_sys"])
        assert uow.get_discrepancy(999_999) is None
    assert rec.site_oid == "SITE.001" and rec.status == "open" and rec.assignee is None
    assert rec.discrepancy.held_value == "300" and rec.discrepancy.source.id == f"bp-{A}-SYSBP"
    assert rec.age(clock.now()) == dt.timedelta(days=4)
    shown = rec.to_json(clock.now())
    assert shown["age_days"] == 4 and shown["source"] == {"resourceType": "Observation", "versionId": "1",
                                                           "id": f"bp-{A}-SYSBP"}
    assert "identity" not in str(shown["source"])


def test_transitions_are_conditional_and_record_the_resolution(store, clock):
    ids = seed(store, clock)
    i = ids["a_sys"]
    with store.uow() as uow:
        rec = uow.transition_discrepancy(i, from_statuses=("open",), status="in_review", assignee="dm1")
        uow.commit()
    assert (rec.status, rec.assignee) == ("in_review", "dm1")
    with store.uow() as uow:
        rec = uow.transition_discrepancy(i, from_statuses=("open", "in_review"), status="resolved",
                                         resolution="accepted", actor=ACTOR, reason="ok", value="300")
        uow.commit()
    assert (rec.resolution, rec.resolved_by, rec.resolution_reason, rec.resolution_value) == ("accepted", ACTOR, "ok",
                                                                                              "300")
    assert rec.resolved_at == clock.now() and rec.assignee == "dm1"
    # a second decision on the closed discrepancy loses, and its unit of work keeps nothing
    with store.uow() as uow, pytest.raises(DiscrepancyStateError):
        uow.transition_discrepancy(i, from_statuses=("open", "in_review"), status="dismissed", resolution="dismissed")
    with store.uow() as uow, pytest.raises(DiscrepancyNotFound):
        uow.transition_discrepancy(999_999, from_statuses=("open",), status="in_review")
    with store.uow() as uow, pytest.raises(StoreError):
        uow.transition_discrepancy(ids["b_sys"], from_statuses=("open",), status="resolved")  # no resolution
    assert query(store, statuses=("resolved",)) == ([i], 1)
    assert query(store, assignee="dm1") == ([i], 1)
    assert query(store, unassigned=True)[1] == 3


def test_same_facts_keep_a_closed_discrepancy_closed_and_changed_facts_reopen_it(store, clock):
    ids = seed(store, clock)
    i = ids["a_sys"]
    with store.uow() as uow:
        uow.transition_discrepancy(i, from_statuses=("open",), status="dismissed", resolution="dismissed",
                                   actor=ACTOR, reason="known artefact")
        uow.commit()
    # every message re-runs the map: the same discrepancy comes back, also with a reworded message
    for again in (disc(A), Discrepancy(**{**_fields(disc(A)), "message": "SYSBP held (reworded)"})):
        with store.uow() as uow:
            assert uow.upsert_discrepancy(again) is False
            uow.commit()
        with store.uow(read_only=True) as uow:
            rec = uow.get_discrepancy(i)
        assert (rec.status, rec.resolution) == ("dismissed", "dismissed")
    # a new version of the source with another held value: the decision no longer applies
    with store.uow() as uow:
        assert uow.upsert_discrepancy(disc(A, held="310", version="2")) is True
        uow.commit()
    with store.uow(read_only=True) as uow:
        rec = uow.get_discrepancy(i)
    assert (rec.status, rec.resolution, rec.resolved_by, rec.resolution_reason) == ("open", None, None, None)
    assert rec.discrepancy.held_value == "310"


def test_without_a_held_value_the_candidates_are_the_facts(store, clock):
    ids = seed(store, clock)
    tied = disc(A, DiscrepancyKind.AMBIGUOUS_DATA, held=None, candidates=({"value": "120"}, {"value": "130"}))
    with store.uow() as uow:
        uow.upsert_discrepancy(tied)
        uow.commit()
    i = uow_id(store, tied)
    with store.uow() as uow:
        uow.transition_discrepancy(i, from_statuses=("open",), status="resolved", resolution="overridden",
                                   actor=ACTOR, reason="picked 120", value="120")
        uow.commit()
        assert uow.upsert_discrepancy(tied) is False
        assert uow.upsert_discrepancy(disc(A, DiscrepancyKind.AMBIGUOUS_DATA, held=None,
                                           candidates=({"value": "120"}, {"value": "140"}))) is True
        uow.commit()
    assert ids and query(store, kinds=("ambiguous_data",), statuses=("open",)) == ([i], 1)


def test_a_status_set_back_to_open_forgets_the_resolution(store, clock):
    ids = seed(store, clock)
    d = disc(B)
    with store.uow() as uow:
        uow.transition_discrepancy(ids["b_sys"], from_statuses=("open",), status="resolved", resolution="repushed",
                                   actor=ACTOR, reason="sent again")
        uow.set_discrepancy_status(d.key, "open")  # what the dispatcher does on a new rejection
        uow.commit()
        rec = uow.get_discrepancy(ids["b_sys"])
    assert (rec.status, rec.resolution, rec.resolved_at) == ("open", None, None)


def test_review_policies_are_stored_per_form_and_removable(store, clock):
    with store.uow() as uow:
        assert uow.set_review_policy(STUDY, "F.LB", "adjudicate", changed_by=ACTOR, reason="lab review") is None
        assert uow.set_review_policy(STUDY, "F.VS", "adjudicate", changed_by=ACTOR, reason="vs review") is None
        assert uow.set_review_policy(STUDY, "F.VS", "auto", changed_by=ACTOR, reason="done") == "adjudicate"
        uow.commit()
    with store.uow() as uow:
        assert {f: m for f, (m, _by, _at) in uow.review_policies(STUDY).items()} == {"F.LB": "adjudicate",
                                                                                     "F.VS": "auto"}
        assert uow.set_review_policy(STUDY, "F.LB", None, changed_by=ACTOR, reason="back to the map") == "adjudicate"
        with pytest.raises(StoreError):
            uow.set_review_policy(STUDY, "F.DM", "sometimes", changed_by=ACTOR, reason="x")
        uow.commit()
    with store.uow(read_only=True) as uow:
        assert list(uow.review_policies(STUDY)) == ["F.VS"]
        assert uow.review_policies("CV02") == {}


def _fields(d: Discrepancy) -> dict:
    return {name: getattr(d, name) for name in Discrepancy.__dataclass_fields__}
