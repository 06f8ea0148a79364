"""The outbox dispatcher on a real store (SQLite, and PostgreSQL when ESOURCE_TEST_POSTGRES_DSN is set)
delivering real outbox rows to the sandbox EDC over loopback HTTP: exactly-once effect under every
fault mode, order per subject, rejections, crashes, Retry-After, the circuit breaker, metrics and the
background loop."""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import pytest

from delivery_helpers import STUDY, Feeder, edc_state, expected_state, free_port, snapshot_state
from esource.connectors.odm_file import OdmFileConnector
from esource.connectors.sandbox import SandboxConnector
from esource.domain.model import DiscrepancyKind, Severity
from esource.observability import Metrics
from esource.odm.xsd import validate_odm
from esource.services.dispatch import Dispatcher, TransientDeliveryError, drain_outbox

A, B = "001-0001", "001-0002"
MDV = {STUDY: "MDV.CV01.1"}


class Sleeps:
    """Injected sleep: records each wait and moves the fake clock instead of waiting."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.clock.advance(seconds=seconds)


@pytest.fixture
def connector(sandbox):
    c = SandboxConnector(sandbox.url, timeout=0.3)
    yield c
    c.close()


@pytest.fixture
def sleeps(clock) -> Sleeps:
    return Sleeps(clock)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def make(store, connector, clock, sleeps, metrics=None, **kw) -> Dispatcher:
    kw.setdefault("workers", 1)
    return Dispatcher(store.uow, {STUDY: connector}, MDV, metrics, clock=clock, sleep=sleeps, **kw)


def sample(m: Metrics, name: str, **labels) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


def assert_exactly_once(feeder: Feeder, sandbox) -> None:
    """Every outbox row acknowledged, each transaction key applied once, and the EDC holds exactly the
    values the transactions describe."""
    rows = feeder.outbox()
    assert {e.status for e in rows} == {"acked"}, [(e.subject_key, e.sequence, e.status, e.last_error) for e in rows]
    txs = sandbox.transactions()
    keys = [t["key"] for t in txs]
    assert sorted(keys) == sorted(f"{e.study_oid}/{e.subject_key}/{e.sequence}" for e in rows)
    assert len(set(keys)) == len(keys)
    applied = Counter(a["transaction"] for a in sandbox.audit() if a["action"] != "SiteEdit")
    assert applied == Counter({f"{e.study_oid}/{e.subject_key}/{e.sequence}": e.item_count for e in rows})
    assert edc_state(sandbox.items()) == expected_state(rows)
    for subject in {e.subject_key for e in rows}:  # the EDC received each subject's rows in sequence
        seqs = [t["sequence"] for t in txs if t["subject"] == subject]
        assert seqs == sorted(seqs)


def test_delivers_every_row_and_the_read_back_equals_what_was_sent(feeder, sandbox, connector, store, clock, sleeps,
                                                                     metrics):
    feeder.weight(A, 1)
    feeder.weight(B, 1)
    clock.advance(seconds=3)
    feeder.weight(A, 2)
    feeder.height(A)
    clock.advance(seconds=2)
    report = make(store, connector, clock, sleeps, metrics).drain()
    assert (report.sent, report.rejected, report.failed, report.retries) == (4, 0, 0, 0)
    assert report.references == ["SBX-1", "SBX-2", "SBX-3", "SBX-4"]  # id order: A1, B1, A2, A3
    assert_exactly_once(feeder, sandbox)
    rows = feeder.outbox()
    for subject in (A, B):
        odm = connector.read_back(STUDY, subject)
        assert validate_odm(odm) == []
        assert snapshot_state(odm) == {k: v for k, v in expected_state(rows).items() if k[0] == subject}
    assert all(e.attempts == 1 and e.sent_at is not None for e in rows)
    assert sample(metrics, "esource_deliveries_total", connector="sandbox", outcome="accepted") == 4
    assert sample(metrics, "esource_delivery_latency_seconds_count", connector="sandbox") == 4
    # latency runs from the outbox row's creation to the acknowledgement: 5 s, 5 s, 2 s, 2 s
    assert sample(metrics, "esource_delivery_latency_seconds_sum", connector="sandbox") == pytest.approx(14)
    assert sample(metrics, "esource_outbox_depth", status="pending") == 0
    assert sleeps.waits == []
    # a second pass has nothing to do
    assert make(store, connector, clock, sleeps).drain().sent == 0


@pytest.mark.parametrize("after_commit", [False, True], ids=["before-commit", "after-commit"])
@pytest.mark.parametrize("mode", ["500", "503", "429", "timeout", "reset", "slow"])
def test_every_fault_mode_ends_exactly_once(feeder, sandbox, connector, store, clock, sleeps, metrics, mode,
                                            after_commit):
    feeder.rounds(2)  # A1, B1, A2, B2
    sandbox.faults(mode=mode, count=3, retry_after=1, delay=0.5, after_commit=after_commit)
    report = make(store, connector, clock, sleeps, metrics).drain()
    assert report.sent == 4 and report.failed == 0
    assert_exactly_once(feeder, sandbox)
    assert sum(sandbox.fault_state()["injected"].values()) == 3
    assert report.retries == 3
    assert sample(metrics, "esource_deliveries_total", connector="sandbox", outcome="transient") == 3
    # an answer lost after the commit comes back as a duplicate of the original receipt (the EDC also
    # counts duplicates it received while a fault was still failing them)
    duplicates_seen = sum(t["duplicates_seen"] for t in sandbox.transactions())
    if after_commit:
        assert report.duplicates >= 1 and duplicates_seen >= report.duplicates
    elif mode != "slow":  # a slow answer may land after the client gave up: then the retry is a duplicate
        assert report.duplicates == 0 and duplicates_seen == 0
    if mode == "429":
        assert all(w >= 1 for w in sleeps.waits)  # Retry-After honoured
    assert len(sleeps.waits) == 3


def test_exhausted_attempts_leave_the_row_failed_and_hold_only_that_subject(feeder, sandbox, connector, store, clock,
                                                                            sleeps, metrics):
    feeder.weight(A, 1)
    feeder.weight(A, 2)
    feeder.weight(B, 1)
    sandbox.faults(mode="503", count=4, retry_after=0)
    d = make(store, connector, clock, sleeps, metrics, max_attempts=4, base_delay=0.5, max_delay=30)
    report = d.drain()
    assert (report.sent, report.failed, report.retries) == (1, 1, 3)
    assert report.blocked_subjects == {(STUDY, A)}
    rows = {(e.subject_key, e.sequence): e for e in feeder.outbox()}
    assert rows[(A, 1)].status == "failed" and rows[(A, 1)].attempts == 4
    assert "HTTP 503" in rows[(A, 1)].last_error
    assert rows[(A, 2)].status == "pending" and rows[(A, 2)].attempts == 0  # held behind A1
    assert rows[(B, 1)].status == "acked"  # another subject flows
    # exponential backoff with jitter: 0.5..1, 1..1.5, 2..2.5
    assert [int(w * 2) / 2 for w in sleeps.waits] == [0.5, 1.0, 2.0]
    assert sample(metrics, "esource_deliveries_total", connector="sandbox", outcome="gave_up") == 1
    # the failed row is retried on a later pass once the subject's cool-down is over
    assert d.drain().sent == 0
    clock.advance(seconds=31)
    report = d.drain()
    assert report.sent == 2 and report.failed == 0
    assert_exactly_once(feeder, sandbox)


class FlakyFor:
    """Wraps a connector: the first `n` sends of `subject` fail transiently."""

    def __init__(self, inner, subject: str, n: int) -> None:
        self.inner, self.subject, self.n = inner, subject, n
        self.sent: list[tuple[str, int]] = []

    def capabilities(self):
        return self.inner.capabilities()

    def send(self, tx, odm):
        self.sent.append((tx.subject_key, tx.sequence))
        if tx.subject_key == self.subject and self.n > 0:
            self.n -= 1
            raise TransientDeliveryError("EDC busy for this subject")
        return self.inner.send(tx, odm)

    def read_back(self, study, subject):
        return self.inner.read_back(study, subject)


@pytest.mark.parametrize("workers", [1, 4])
def test_order_per_subject_under_faults_while_another_subject_flows(feeder, sandbox, connector, store, clock, sleeps,
                                                                    workers):
    feeder.rounds(3)  # A1 B1 A2 B2 A3 B3
    flaky = FlakyFor(connector, A, 3)
    d = Dispatcher(store.uow, {STUDY: flaky}, MDV, clock=clock, sleep=sleeps, max_attempts=3, workers=workers)
    report = d.drain()
    assert report.sent == 3 and report.failed == 1 and report.deferred == 2
    assert [s for s in flaky.sent if s[0] == A] == [(A, 1)] * 3
    assert [s for s in flaky.sent if s[0] == B] == [(B, 1), (B, 2), (B, 3)]
    clock.advance(minutes=1)
    assert d.drain().sent == 3
    assert [s for s in flaky.sent if s[0] == A] == [(A, 1)] * 4 + [(A, 2), (A, 3)]
    assert_exactly_once(feeder, sandbox)


def test_a_rejection_opens_a_discrepancy_and_blocks_the_subject(feeder, sandbox, connector, store, clock, sleeps,
                                                               metrics):
    feeder.weight(A, 1)
    feeder.weight(B, 1)
    d = make(store, connector, clock, sleeps, metrics)
    d.drain()
    # site staff enter the height in the EDC before esource sends it: the Insert is refused
    httpx.put(f"{sandbox.url}/studies/{STUDY}/subjects/{A}/items",
              json={"path": "SE.BASELINE/F.VS/IG.VS[HEIGHT]/IT.VS.VSORRES", "value": "171"}).raise_for_status()
    feeder.height(A)
    feeder.weight(A, 2)
    feeder.weight(B, 2)
    report = d.drain()
    assert (report.sent, report.rejected, report.deferred) == (1, 1, 1)
    assert report.blocked_subjects == {(STUDY, A)}
    rows = {(e.subject_key, e.sequence): e for e in feeder.outbox()}
    assert rows[(A, 2)].status == "rejected" and rows[(A, 2)].last_error.startswith("409: Insert of subject 001-0001")
    assert rows[(A, 3)].status == "pending"
    assert rows[(B, 2)].status == "acked"
    with store.uow(read_only=True) as uow:
        [disc] = uow.open_discrepancies(STUDY, A)
    assert disc.kind is DiscrepancyKind.EDC_REJECTED and disc.severity is Severity.ERROR
    assert "with code 409: Insert of subject 001-0001, SE.BASELINE/F.VS/IG.VS[HEIGHT]/IT.VS.VSORRES" in disc.message
    assert "already has a value (entered by site staff)" in disc.message
    assert disc.candidates[0]["code"] == "409" and disc.candidates[0]["sequence"] == 2
    assert sample(metrics, "esource_deliveries_total", connector="sandbox", outcome="rejected") == 1
    assert sample(metrics, "esource_outbox_depth", status="rejected") == 1
    # blocked on later passes too, even long after
    clock.advance(hours=2)
    report = d.drain()
    assert report.sent == 0 and report.blocked_subjects == {(STUDY, A)}
    # a data manager resolves it in the EDC (the site's value goes) and re-queues the row: the subject flows
    with store.uow() as uow:
        uow.set_discrepancy_status(disc.key, "resolved")
        uow.set_outbox_status(rows[(A, 2)].id, "pending")
        uow.commit()
    _remove_site_value(sandbox)
    report = d.drain()
    assert report.sent == 2 and report.rejected == 0
    assert_exactly_once(feeder, sandbox)


def _remove_site_value(sandbox) -> None:
    # the sandbox has no delete endpoint: reach into its store, as a site would fix the EDC by hand
    edc = sandbox.app.state.sandbox
    with edc._lock:
        edc._db.execute("DELETE FROM item WHERE edited_by_site = 1")


def test_a_second_rejection_reopens_the_subjects_discrepancy(feeder, sandbox, connector, store, clock, sleeps):
    feeder.weight(A, 1)
    d = make(store, connector, clock, sleeps)
    sandbox.faults(mode="reject", message="form F.VS is locked")
    d.drain()
    with store.uow() as uow:
        [disc] = uow.open_discrepancies(STUDY, A)
        assert "form F.VS is locked" in disc.message and "code 422" in disc.message
        uow.set_discrepancy_status(disc.key, "dismissed")
        [row] = uow.outbox_entries(statuses=("rejected",))
        uow.set_outbox_status(row.id, "pending")
        uow.commit()
    sandbox.faults(mode="reject", status=404, message="site SITE.001 is closed")
    d.drain()
    with store.uow(read_only=True) as uow:
        [disc] = uow.open_discrepancies(STUDY, A)
    assert "site SITE.001 is closed" in disc.message and "code 404" in disc.message


class CrashAfterSend:
    """The process 'dies' after the EDC applied the transaction, before esource recorded it."""

    class Crash(BaseException):
        pass

    def __init__(self, inner) -> None:
        self.inner = inner

    def capabilities(self):
        return self.inner.capabilities()

    def send(self, tx, odm):
        self.inner.send(tx, odm)
        raise self.Crash()

    def read_back(self, study, subject):
        return None


def test_a_crash_between_send_and_status_update_is_safe(feeder, sandbox, connector, store, clock, sleeps):
    feeder.weight(A, 1)
    feeder.weight(A, 2)
    with pytest.raises(CrashAfterSend.Crash):
        make(store, CrashAfterSend(connector), clock, sleeps).drain()
    assert [e.status for e in feeder.outbox()] == ["pending", "pending"]
    assert len(sandbox.transactions()) == 1
    # the restarted service sends the same transaction again: the EDC recognises it
    report = make(store, connector, clock, sleeps).drain()
    assert report.sent == 2 and report.duplicates == 1 and report.references == ["SBX-1", "SBX-2"]
    assert sandbox.transactions()[0]["duplicates_seen"] == 1
    assert_exactly_once(feeder, sandbox)


def test_a_long_retry_after_pauses_the_connector_instead_of_sleeping(feeder, sandbox, connector, store, clock, sleeps,
                                                                     metrics):
    feeder.rounds(1)
    sandbox.faults(mode="429", count=1, retry_after=120)
    d = make(store, connector, clock, sleeps, metrics, max_delay=30)
    report = d.drain()
    assert report.sent == 0 and report.failed == 1 and report.deferred == 1
    assert sleeps.waits == []
    assert sample(metrics, "esource_edc_circuit_open", connector="sandbox") == 1
    clock.advance(seconds=60)
    assert d.drain().sent == 0  # still paused
    clock.advance(seconds=61)
    assert d.drain().sent == 2
    assert sample(metrics, "esource_edc_circuit_open", connector="sandbox") == 0
    assert_exactly_once(feeder, sandbox)


def test_the_circuit_opens_after_consecutive_failed_rows(feeder, sandbox, store, clock, sleeps, metrics):
    feeder.rounds(1)
    extra = Feeder(feeder.study, store, clock, ["001-0003", "001-0004"])
    extra.rounds(1)
    dead = SandboxConnector(f"http://127.0.0.1:{free_port()}", timeout=0.2)
    d = Dispatcher(store.uow, {STUDY: dead}, MDV, metrics, clock=clock, sleep=sleeps, max_attempts=2,
                   breaker_threshold=2, breaker_cooldown=60, workers=1)
    report = d.drain()
    assert report.failed == 2 and report.deferred == 2 and report.sent == 0
    assert sample(metrics, "esource_edc_circuit_open", connector="sandbox") == 1
    assert [e.status for e in feeder.outbox()] == ["failed", "failed", "pending", "pending"]
    # the EDC is back; once the cool-down is over everything goes
    d.connectors[STUDY] = SandboxConnector(sandbox.url, timeout=0.3)
    assert d.drain().sent == 0
    clock.advance(seconds=61)
    assert d.drain().sent == 4
    assert sample(metrics, "esource_edc_circuit_open", connector="sandbox") == 0
    assert_exactly_once(feeder, sandbox)


def test_rows_of_a_study_without_connector_stay_pending(feeder, store, clock, sleeps):
    feeder.weight(A, 1)
    d = Dispatcher(store.uow, {}, MDV, clock=clock, sleep=sleeps)
    report = d.drain()
    assert report.unroutable == 1 and report.sent == 0
    assert [e.status for e in feeder.outbox()] == ["pending"]


def test_run_forever_delivers_in_the_background_and_stops_promptly(feeder, sandbox, connector, store, metrics):
    feeder.rounds(2)
    stop = threading.Event()
    d = Dispatcher(store.uow, {STUDY: connector}, MDV, metrics, workers=2, base_delay=0.01, max_delay=0.05)
    sandbox.faults(mode="500", count=2)
    thread = threading.Thread(target=d.run_forever, args=(stop,), kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        _wait_until(lambda: {e.status for e in feeder.outbox()} == {"acked"})
        feeder.weight(A, 3)  # rows written while the loop runs are picked up
        feeder.height(B)
        _wait_until(lambda: {e.status for e in feeder.outbox()} == {"acked"} and len(feeder.outbox()) == 6)
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
    assert_exactly_once(feeder, sandbox)
    assert d.totals.sent == 6 and d.totals.retries == 2
    assert sample(metrics, "esource_deliveries_total", connector="sandbox", outcome="accepted") == 6

    # stopping interrupts a long backoff instead of waiting for it; the row stays failed, not lost
    sandbox.faults(mode="503", count=None, retry_after=0)
    feeder.weight(B, 3)
    slow = Dispatcher(store.uow, {STUDY: connector}, MDV, workers=1, base_delay=20, max_delay=25)
    stop = threading.Event()
    thread = threading.Thread(target=slow.run_forever, args=(stop,), kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    _wait_until(lambda: any(e.attempts for e in feeder.outbox(("failed",))))
    time.sleep(0.1)  # now inside the 20 s backoff
    stop.set()
    thread.join(5)
    assert not thread.is_alive()  # well before the 20 s backoff would have ended
    [row] = feeder.outbox(("failed",))
    assert row.subject_key == B and row.attempts == 1 and "HTTP 503" in row.last_error


def test_run_forever_records_acks_off_the_delivery_path_and_keeps_the_trail_in_order(feeder, sandbox, connector,
                                                                                      store, metrics):
    """The background loop hands acks to its recorder; a later write of the same chain (here the
    rejection of the next row) waits for them, so the trail reads sent-then-rejected, as it happened."""
    feeder.weight(A, 1)
    Dispatcher(store.uow, {STUDY: connector}, MDV, workers=1).drain()
    httpx.put(f"{sandbox.url}/studies/{STUDY}/subjects/{A}/items",  # site staff got there first: row 3 is refused
              json={"path": "SE.BASELINE/F.VS/IG.VS[HEIGHT]/IT.VS.VSORRES", "value": "171"}).raise_for_status()
    feeder.weight(A, 2)
    feeder.height(A)
    feeder.weight(B, 1)
    stop = threading.Event()
    d = Dispatcher(store.uow, {STUDY: connector}, MDV, metrics, workers=2, base_delay=0.01, max_delay=0.05)
    record = d._record_acks

    def slow_recording(acks):  # the recorder lags well behind the EDC's answers
        time.sleep(0.3)
        record(acks)

    d._record_acks = slow_recording
    thread = threading.Thread(target=d.run_forever, args=(stop,), kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        _wait_until(lambda: sorted(e.status for e in feeder.outbox()) == ["acked", "acked", "acked", "rejected"])
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    rows = {(e.subject_key, e.sequence): e for e in feeder.outbox()}
    assert rows[(A, 2)].status == "acked" and rows[(A, 3)].status == "rejected" and rows[(B, 1)].status == "acked"
    with store.uow(read_only=True) as uow:
        trail = [(e.event.action.value, e.event.detail.get("outbox_id"))
                 for e in uow.audit_entries(study_oid=STUDY, subject_key=A)[0]
                 if e.event.action.value.startswith("transfer.") and e.event.action.value != "transfer.queued"]
    assert trail[2:] == [("transfer.sent", rows[(A, 2)].id), ("transfer.acknowledged", rows[(A, 2)].id),
                         ("transfer.rejected", rows[(A, 3)].id)]
    assert d.totals.sent == 2 and d.totals.rejected == 1
    assert sample(metrics, "esource_deliveries_total", connector="sandbox", outcome="accepted") == 2


def test_wake_starts_a_pass_at_once_instead_of_at_the_next_poll(feeder, sandbox, connector, store):
    """With an hour between polls, a row written later goes only because the intake wakes the loop."""
    feeder.weight(A, 1)
    stop = threading.Event()
    d = Dispatcher(store.uow, {STUDY: connector}, MDV, workers=2)
    thread = threading.Thread(target=d.run_forever, args=(stop,), kwargs={"poll_interval": 3600}, daemon=True)
    thread.start()
    try:
        _wait_until(lambda: [e.status for e in feeder.outbox()] == ["acked"])  # the first pass runs at start
        time.sleep(0.3)  # the loop is asleep now (the recorder's own wake-up has been used)
        feeder.weight(B, 1)
        time.sleep(0.3)
        assert [e.status for e in feeder.outbox(("pending",))] == ["pending"]  # nobody woke it
        d.wake()
        _wait_until(lambda: {e.status for e in feeder.outbox()} == {"acked"}, timeout=10)
    finally:
        stop.set()
        d.wake()
        thread.join(10)
    assert not thread.is_alive()
    assert_exactly_once(feeder, sandbox)


def _wait_until(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def test_drain_outbox_wrapper_still_works(feeder, store, tmp_path):
    feeder.rounds(2)
    report = drain_outbox(store.uow, OdmFileConnector(tmp_path / "drop"), "MDV.CV01.1")
    assert report.sent == 4
    assert sorted(p.name for p in (tmp_path / "drop").iterdir()) == [
        f"{STUDY}_{A}_000001.xml", f"{STUDY}_{A}_000002.xml", f"{STUDY}_{B}_000001.xml", f"{STUDY}_{B}_000002.xml"]
    assert {e.status for e in feeder.outbox()} == {"acked"}
