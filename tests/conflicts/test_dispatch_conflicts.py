"""The dispatcher's conflict check on a real store (SQLite, and PostgreSQL when ESOURCE_TEST_POSTGRES_DSN
is set) with an in-memory EDC: what is read back and when, what is withheld, what is persisted, and
the ambiguous cases (an answer lost after the EDC committed, a failing read-back)."""

from __future__ import annotations

import pytest
from sqlalchemy import update

from esource.domain.model import DiscrepancyKind, ItemKey
from esource.observability import Metrics
from esource.services.conflicts import item_path, odm_items
from esource.services.dispatch import Dispatcher
from esource.store.schema import OutboxRow

A, B = "001-0001", "001-0002"
WEIGHT = item_path("SE.BASELINE", None, "F.VS", "IG.VS", "WEIGHT", "IT.VS.VSORRES")
HEIGHT = item_path("SE.BASELINE", None, "F.VS", "IG.VS", "HEIGHT", "IT.VS.VSORRES")
WEIGHT_KEY = ItemKey("CV01", A, "SE.BASELINE", None, "F.VS", "IG.VS", "WEIGHT", "IT.VS.VSORRES")


def dispatcher(store, connector, clock, **kw) -> Dispatcher:
    kw.setdefault("workers", 1)
    kw.setdefault("base_delay", 0.01)
    return Dispatcher(store.uow, {"CV01": connector}, {"CV01": "MDV.CV01.1"}, kw.pop("metrics", None), clock=clock,
                      sleep=lambda s: clock.advance(seconds=s), **kw)


def conflicts(store, subject: str = A) -> list:
    with store.uow(read_only=True) as uow:
        return [d for d in uow.open_discrepancies("CV01", subject) if d.kind is DiscrepancyKind.EDC_CONFLICT]


def frozen(store, key: ItemKey = WEIGHT_KEY) -> bool:
    with store.uow(read_only=True) as uow:
        return uow.sent_items(key.study_oid, key.subject_key)[key].frozen


def test_the_outbox_row_remembers_the_values_its_updates_replace(feeder):
    feeder.weight(A, 1)
    feeder.ingest(A, feeder.weight_obs(A, 2), feeder.height_obs(A, 1))
    first, second = feeder.outbox()
    assert first.previous_values == {}  # Inserts only
    assert second.previous_values == {WEIGHT: "70.5"}  # the height is an Insert


def test_only_rows_with_updates_are_read_back_and_only_from_connectors_that_can(feeder, store, clock, fake_edc,
                                                                                make_fake_edc):
    feeder.weight(A, 1)
    feeder.weight(B, 1)
    d = dispatcher(store, fake_edc, clock)
    assert d.drain().sent == 2 and fake_edc.reads == 0
    feeder.weight(A, 2)
    assert d.drain().sent == 1 and fake_edc.reads == 1
    # a connector without read-back is never asked: the Update goes, whatever the EDC holds
    blind = make_fake_edc(read_back=False)
    blind.values = fake_edc.values
    blind.seen = dict(fake_edc.seen)
    blind.site_edit(A, WEIGHT, "99.9")
    feeder.weight(A, 3)
    report = dispatcher(store, blind, clock).drain()
    assert report.sent == 1 and report.conflicts == 0 and blind.reads == 0
    assert blind.values[A][WEIGHT] == "71.5" and conflicts(store) == []


def test_the_check_can_be_turned_off_and_a_read_back_of_none_skips_it(feeder, store, clock, fake_edc):
    feeder.weight(A, 1)
    dispatcher(store, fake_edc, clock).drain()
    fake_edc.site_edit(A, WEIGHT, "99.9")
    feeder.weight(A, 2)
    report = dispatcher(store, fake_edc, clock, check_conflicts=False).drain()
    assert report.sent == 1 and fake_edc.reads == 0 and fake_edc.values[A][WEIGHT] == "71.0"
    fake_edc.site_edit(A, WEIGHT, "99.9")
    fake_edc.read_none = True  # the EDC does not know the subject: nothing to compare
    feeder.weight(A, 3)
    assert dispatcher(store, fake_edc, clock).drain().sent == 1 and fake_edc.reads == 1
    assert conflicts(store) == []


def test_a_site_edit_is_withheld_discrepancy_opened_item_frozen_and_the_reduced_odm_kept(feeder, store, clock,
                                                                                        fake_edc):
    feeder.weight(A, 1)
    feeder.ingest(A, feeder.height_obs(A, 1))
    metrics = Metrics()
    d = dispatcher(store, fake_edc, clock, metrics=metrics)
    d.drain()
    fake_edc.site_edit(A, WEIGHT, "99.9")
    feeder.ingest(A, feeder.weight_obs(A, 2), feeder.height_obs(A, 2))
    [row] = feeder.outbox(("pending",))
    report = d.drain()
    assert (report.sent, report.conflicts) == (1, 1)
    assert fake_edc.values[A][WEIGHT] == "99.9" and fake_edc.values[A][HEIGHT] == "171.0"
    [sent] = [e for e in feeder.outbox() if e.id == row.id]
    assert sent.status == "acked" and sent.item_count == 1 and sent.attempts == 1
    assert sent.odm == fake_edc.bodies[-1][1]  # what went is what the outbox keeps
    assert [i.path for i in odm_items(sent.odm)] == [HEIGHT]
    assert sent.last_error.startswith(f"conflict: withheld {WEIGHT}")
    [c] = conflicts(store)
    assert c.candidates[0]["outbox_id"] == row.id and c.candidates[0]["sequence"] == row.sequence
    assert c.rule == "edc:fake:conflict" and c.held_value == "71.0"
    assert frozen(store)
    assert metrics.registry.get_sample_value("esource_deliveries_total",
                                             {"connector": "fake", "outcome": "conflict"}) == 1


def test_an_answer_lost_after_the_commit_is_not_mistaken_for_a_site_edit(feeder, store, clock, fake_edc):
    feeder.weight(A, 1)
    d = dispatcher(store, fake_edc, clock)
    d.drain()
    feeder.weight(A, 2)
    fake_edc.lose_answers = 1  # applied, answer lost: the retry reads back esource's own new value
    report = d.drain()
    assert (report.sent, report.retries, report.duplicates, report.conflicts) == (1, 1, 1, 0)
    assert fake_edc.reads == 2 and conflicts(store) == [] and not frozen(store)
    assert len({body for key, body in fake_edc.bodies if key == (A, 2)}) == 1  # the same bytes both times


def test_a_withheld_row_whose_send_fails_sends_the_same_reduced_bytes_later(feeder, store, clock, fake_edc):
    feeder.weight(A, 1)
    feeder.ingest(A, feeder.height_obs(A, 1))
    d = dispatcher(store, fake_edc, clock, max_attempts=1)
    d.drain()
    fake_edc.site_edit(A, WEIGHT, "99.9")
    feeder.ingest(A, feeder.weight_obs(A, 2), feeder.height_obs(A, 2))
    fake_edc.lose_answers = 1
    report = d.drain()
    assert (report.sent, report.failed, report.conflicts) == (0, 1, 1)
    clock.advance(minutes=5)
    report = d.drain()  # read back again: the weight is gone from the row, the height is the row's own value
    assert (report.sent, report.duplicates, report.conflicts, report.rejected) == (1, 1, 0, 0)
    bodies = [body for key, body in fake_edc.bodies if key == (A, 3)]
    assert len(bodies) == 2 and bodies[0] == bodies[1]
    assert len(conflicts(store)) == 1


def test_a_failing_read_back_is_a_transient_failure_nothing_goes_unchecked(feeder, store, clock, fake_edc):
    feeder.weight(A, 1)
    d = dispatcher(store, fake_edc, clock, max_attempts=2)
    d.drain()
    fake_edc.site_edit(A, WEIGHT, "99.9")
    feeder.weight(A, 2)
    fake_edc.fail_reads = 2
    report = d.drain()
    assert (report.sent, report.failed) == (0, 1)
    [row] = feeder.outbox(("failed",))
    assert "read-back: HTTP 503" in row.last_error and row.attempts == 2
    assert len(fake_edc.bodies) == 1  # nothing sent without the check
    clock.advance(minutes=5)
    report = d.drain()
    assert (report.sent, report.conflicts) == (1, 1)
    assert fake_edc.values[A][WEIGHT] == "99.9"


def test_a_value_cleared_in_the_edc_is_a_conflict_too(feeder, store, clock, fake_edc):
    feeder.weight(A, 1)
    d = dispatcher(store, fake_edc, clock)
    d.drain()
    fake_edc.site_edit(A, WEIGHT, None)
    feeder.weight(A, 2)
    assert d.drain().conflicts == 1
    [c] = conflicts(store)
    assert c.candidates[0]["edc_value"] is None and "holds no value" in c.message
    assert WEIGHT not in fake_edc.values[A]


def test_every_pending_update_of_an_edited_item_is_withheld_and_a_closed_conflict_reopens(feeder, store, clock,
                                                                                        fake_edc):
    feeder.weight(A, 1)
    d = dispatcher(store, fake_edc, clock)
    d.drain()
    fake_edc.site_edit(A, WEIGHT, "99.9")
    feeder.weight(A, 2)
    feeder.weight(A, 3)  # queued before the dispatcher saw the conflict
    report = d.drain()
    assert (report.sent, report.conflicts) == (2, 2)
    [c] = conflicts(store)  # one discrepancy per item and source, holding the latest proposal
    assert c.held_value == "71.5" and c.candidates[0]["last_sent_value"] == "71.0"
    assert fake_edc.values[A][WEIGHT] == "99.9"
    # a data manager dismisses it and unfreezes; the site edits again before the next source change
    with store.uow() as uow:
        uow.set_discrepancy_status(c.key, "dismissed")
        state = uow.sent_items("CV01", A)[WEIGHT_KEY]
        uow.put_sent_item(type(state)(state.key, "99.9", state.source_identity, state.source_version,
                                      state.source_type, state.source_id, state.rule, frozen=False))
        uow.commit()
    fake_edc.site_edit(A, WEIGHT, "88.8")
    feeder.weight(A, 4)
    assert d.drain().conflicts == 1
    [again] = conflicts(store)
    assert again.key == c.key and again.candidates[0]["edc_value"] == "88.8" and again.held_value == "72.0"


def test_rows_queued_before_migration_0003_are_not_checked(feeder, store, clock, fake_edc):
    feeder.weight(A, 1)
    d = dispatcher(store, fake_edc, clock)
    d.drain()
    fake_edc.site_edit(A, WEIGHT, "99.9")
    feeder.weight(A, 2)
    with store.uow() as uow:  # what such a row looks like: no previous values
        uow.session.execute(update(OutboxRow.__table__).values(previous_values=None))
        uow.commit()
    assert feeder.outbox(("pending",))[0].previous_values == {}
    assert d.drain().sent == 1 and fake_edc.reads == 0


@pytest.mark.parametrize("workers", [1, 4])
def test_conflicts_of_several_subjects_at_once(feeder, store, clock, fake_edc, workers):
    for s in (A, B):
        feeder.weight(s, 1)
    d = dispatcher(store, fake_edc, clock, workers=workers)
    d.drain()
    for s in (A, B):
        fake_edc.site_edit(s, WEIGHT, "99.9")
        feeder.weight(s, 2)
        feeder.weight(s, 3)
    report = d.drain()
    assert (report.sent, report.conflicts, report.rejected) == (4, 4, 0)
    assert len(conflicts(store, A)) == 1 and len(conflicts(store, B)) == 1
    assert all(fake_edc.values[s][WEIGHT] == "99.9" for s in (A, B))
