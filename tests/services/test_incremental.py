"""Incremental runs read only the facts near the visits they re-select (clinical dates, issue 3's
steady-state latency). The property: whatever the order and content of the messages, the state an
incremental run leaves is the state a full re-map of every stored fact computes — a full `remap`
afterwards finds nothing to send and no new discrepancy."""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from esource.mapping.engine import NO_READING, MappingEngine
from esource.odm.xsd import validate_odm
from esource.store import Store
from esource.study.study import load_study
from process_helpers import MRN, bundle, ingest, make_processor, obs, outbox, patient

DAY1 = dt.date(2024, 5, 1)
# (LOINC, unit, a value in range, one out of the hard range) per test
TESTS = [("8867-4", "/min", 72, 400), ("29463-7", "kg", 81.2, 900), ("8480-6", "mm[Hg]", 128, 20),
         ("2345-7", "mg/dL", 95, 5000)]
STATUSES = ["final", "final", "final", "amended", "entered-in-error", "preliminary"]


def _when(day: int, hour: int) -> str:
    d = DAY1 + dt.timedelta(days=day - 1 if day >= 1 else day)
    return f"{d.isoformat()}T{hour:02d}:00:00+02:00"


message = st.lists(
    st.tuples(st.integers(0, 5),  # observation id (a small pool: later messages amend earlier ones)
              st.integers(0, len(TESTS) - 1),
              st.sampled_from([-20, -3, 1, 1, 2, 28, 29, 31, 60, 85, 86, 170, 200]),  # study day
              st.integers(7, 9),  # hour
              st.booleans(),  # in range
              st.sampled_from(STATUSES)),
    min_size=1, max_size=4)


def _messages(spec: list[list[tuple]]) -> list[bytes]:
    versions: dict[int, int] = {}
    out = []
    for msg in spec:
        resources = [patient()]
        for oid, test, day, hour, ok, status in msg:
            code, unit, good, bad = TESTS[test]
            versions[oid] = versions.get(oid, 0) + 1
            resources.append(obs(f"o{oid}", code, good if ok else bad, unit, _when(day, hour),
                                 str(versions[oid]), status))
        out.append(bundle(*resources))
    return out


class _Clock:
    def now(self) -> dt.datetime:
        return dt.datetime(2025, 3, 1, 9, 0, tzinfo=dt.timezone.utc)


def _check_incremental_equals_full(store: Store, messages: list[bytes]) -> None:
    processor = make_processor(load_study("CV01"), store, _Clock())
    for i, data in enumerate(messages):
        ingest(processor, data, f"k{i}")
    (again,) = processor.remap(["001-0007"])
    assert (again.items_sent, again.discrepancies_new) == (0, 0), (
        "a full re-map found values or discrepancies the incremental runs had missed")
    for entry in outbox(store):
        assert validate_odm(entry.odm) == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=st.lists(message, min_size=1, max_size=6))
# found by CI: o0, held out of range at Screening beside o1, is amended to Day 1. Screening holds only
# o1 now (a new discrepancy sourced from it), though no value was ever sent from o0 there
@example(spec=[[(0, 0, -20, 7, False, "final")],
               [(0, 0, -20, 7, False, "final"), (1, 0, -20, 7, False, "final")],
               [(0, 0, 1, 7, False, "final")]])
def test_an_incremental_run_leaves_the_state_a_full_remap_computes(spec):
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(f"sqlite:///{Path(tmp) / 'esource.db'}", clock=_Clock())
        try:
            _check_incremental_equals_full(store, _messages(spec))
        finally:
            store.dispose()


def test_a_reading_amended_to_another_visit_is_re_selected_in_both(store):
    """The scenario the window must get right on both databases: a Week 12 reading moved to Week 4
    frees Week 12 for the other candidate, which is outside the new reading's own window."""
    messages = [
        bundle(patient(), obs("a", "8867-4", 70, "/min", _when(85, 8)), obs("b", "8867-4", 75, "/min", _when(88, 8))),
        bundle(patient(), obs("a", "8867-4", 71, "/min", _when(29, 8), "2", "amended")),
    ]
    _check_incremental_equals_full(store, messages)
    with store.uow(read_only=True) as uow:
        state = {(k.study_event_oid, k.item_oid): s.value for k, s in uow.sent_items("CV01", "001-0007").items()
                 if k.item_group_repeat_key == "HR"}
    assert state[("SE.WEEK4", "IT.VS.VSORRES")] == "71"
    assert state[("SE.WEEK12", "IT.VS.VSORRES")] == "75", "Week 12 now takes the other reading"


def test_facts_far_from_the_changed_visits_are_not_read(store, clock):
    """What makes the cost independent of the history: a new Week 24 reading reads the Week 24
    window, the Patient and undated facts, and nothing from the earlier visits."""
    processor = make_processor(load_study("CV01"), store, clock)
    history = [obs(f"h{d}", "8867-4", 70, "/min", _when(d, 8)) for d in (-3, 1, 29, 85)]
    ingest(processor, bundle(patient(), *history), "k1")
    read: list[int] = []
    original = store.uow

    def spying_uow(*args, **kwargs):
        """Counts the facts read per subject, one by one (`facts`) or for a whole batch (`facts_of`,
        which on SQLite asks `facts` subject by subject)."""
        uow = original(*args, **kwargs)
        facts, facts_of = uow.facts, uow.facts_of
        batch = [False]

        def counted(*a, **kw):
            out = facts(*a, **kw)
            if not batch[0]:
                read.append(len(out))
            return out

        def counted_of(*a, **kw):
            batch[0] = True
            try:
                out = facts_of(*a, **kw)
            finally:
                batch[0] = False
            read.extend(len(v) for v in out.values())
            return out
        uow.facts, uow.facts_of = counted, counted_of
        return uow

    processor.uow_factory = spying_uow
    w24 = obs("w24", "8867-4", 66, "/min", _when(169, 8))
    w24["subject"] = {"identifier": {"system": MRN[0], "value": MRN[1]}}
    ingest(processor, bundle(w24), "k2")
    assert read == [2], "the new reading and the (undated) Patient, none of the history"
    read.clear()
    ingest(processor, bundle(patient(), obs("w24b", "8867-4", 67, "/min", _when(170, 8))), "k3")
    assert read == [3], "an unchanged Patient changes nothing"
    read.clear()
    changed = patient()
    changed["birthDate"] = "1961-07-15"
    ingest(processor, bundle(changed), "k4")
    assert read == [7], "a changed Patient may change birth-date masking everywhere: everything is read"


@pytest.mark.parametrize("resource,expected", [
    ({"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": "http://loinc.org",
                                                                             "code": "8867-4"}]},
      "effectiveDateTime": "2024-05-03T08:00:00+02:00"}, dt.date(2024, 5, 3)),
    ({"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": "http://loinc.org",
                                                                             "code": "8867-4"}]},
      "effectiveDateTime": "2024-05"}, None),  # not precise to the day: read by every run
    ({"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": "http://loinc.org",
                                                                             "code": "8867-4"}]},
      "effectiveDateTime": "yesterday"}, None),  # invalid: its discrepancy is raised by every run
    ({"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": "http://loinc.org",
                                                                             "code": "72166-2"}]},
      "effectiveDateTime": "2024-05-03"}, NO_READING),  # no test of this map
    ({"resourceType": "Condition", "onsetDateTime": "2024-05-03"}, None),
])
def test_clinical_dates(resource, expected):
    engine = MappingEngine(load_study("CV01"))
    assert engine.clinical_date(resource["resourceType"], resource) == expected
