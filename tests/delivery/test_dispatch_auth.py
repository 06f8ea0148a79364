"""The dispatcher when an EDC refuses esource's credentials (`EdcAuthenticationError`): the endpoint
stops, every row stays pending, one probe per re-check interval, never a credential shown; and the
rule for a subject's rows behind a rejected one. The connector here is an in-memory fake, so what it
was sent is known exactly; tests/contract runs the same through every vendor emulator."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from delivery_helpers import STUDY, Feeder
from esource.domain.model import Discrepancy, DiscrepancyKind
from esource.domain.ports import ConnectorCapabilities, DeliveryReceipt
from esource.observability import Metrics
from esource.services.dispatch import Dispatcher, EdcAuthenticationError, TransientDeliveryError

MDV = {STUDY: "MDV.CV01.1"}
SUBJECTS = ["001-0001", "001-0002", "001-0003", "001-0004"]
SECRET = "tok-3f9a-very-secret"


class FakeEdc:
    """Accepts every transaction, unless told to refuse the credentials (or to fail transiently)."""

    def __init__(self, name: str = "fake") -> None:
        self.name = name
        self.refuse = False
        self.transient = 0
        self.sent: list[tuple[str, int]] = []
        self.tried: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    def capabilities(self) -> ConnectorCapabilities:
        return ConnectorCapabilities(self.name, read_back=False, idempotency_key=True, integer_repeat_keys=False)

    def send(self, tx, odm: bytes) -> DeliveryReceipt:
        with self._lock:
            self.tried.append((tx.subject_key, tx.sequence))
            if self.refuse:
                raise EdcAuthenticationError("fake EDC: HTTP 401: invalid token (***)", status=401, code="401")
            if self.transient:
                self.transient -= 1
                raise TransientDeliveryError("fake EDC: HTTP 503")
            self.sent.append((tx.subject_key, tx.sequence))
        return DeliveryReceipt(True, reference=f"REF-{tx.subject_key}-{tx.sequence}")

    def read_back(self, study: str, subject: str) -> bytes | None:
        return None


@pytest.fixture
def feeder4(cv01, store, clock) -> Feeder:
    return Feeder(cv01, store, clock, SUBJECTS)


def sample(m: Metrics, name: str, **labels) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


def dispatcher(store, connector, clock, metrics=None, **kw) -> Dispatcher:
    kw.setdefault("workers", 1)
    kw.setdefault("sleep", lambda s: clock.advance(seconds=s))
    return Dispatcher(store.uow, {STUDY: connector}, MDV, metrics, clock=clock, base_delay=0.01, max_delay=1, **kw)


# ------------------------------------------------------------------------------------------ authentication


def test_a_refusal_stops_every_chain_of_the_endpoint_and_keeps_the_rows_pending(feeder4, store, clock, caplog):
    feeder4.rounds(2)
    edc = FakeEdc()
    edc.refuse = True
    metrics = Metrics()
    d = dispatcher(store, edc, clock, metrics, auth_recheck=300)
    caplog.set_level(logging.INFO, logger="esource.dispatch")
    report = d.drain()
    assert edc.tried == [(SUBJECTS[0], 1)]  # the other subjects were not tried with the refused credentials
    assert report.auth_failed == 1 and report.failed == report.rejected == report.sent == 0
    assert report.deferred == 8 and len(report.blocked_subjects) == 4
    rows = feeder4.outbox()
    assert {e.status for e in rows} == {"pending"}
    [refused] = [e for e in rows if e.attempts]
    assert refused.attempts == 1 and "EDC refused esource's credentials" in refused.last_error
    assert "until 2025-03-01T09:05:00+00:00" in refused.last_error
    with store.uow(read_only=True) as uow:
        assert uow.open_discrepancies(STUDY) == []
    assert sample(metrics, "esource_edc_circuit_open", connector="fake") == 1
    assert sample(metrics, "esource_deliveries_total", connector="fake", outcome="auth_failed") == 1
    assert sample(metrics, "esource_deliveries_total", connector="fake", outcome="transient") == 0
    [line] = [r for r in caplog.records if "credentials" in r.getMessage()]
    assert line.levelno == logging.ERROR and line.connector == "fake" and line.status == 401
    assert SECRET not in caplog.text
    [state] = d.endpoint_states()
    assert state["state"] == "auth_failed" and state["until"] == "2025-03-01T09:05:00+00:00"
    assert state["reason"].startswith("fake EDC: HTTP 401")


def test_one_probe_per_re_check_even_with_many_workers(feeder4, store, clock):
    feeder4.rounds(1)
    edc = FakeEdc()
    edc.refuse = True
    d = dispatcher(store, edc, clock, workers=4, auth_recheck=60)
    d.drain()
    first = len(edc.tried)
    assert 1 <= first <= 4  # chains already running when the first refusal came in may each have tried once
    assert d.drain().auth_failed == 0 and len(edc.tried) == first  # stopped: nothing more
    for probe in range(1, 4):
        clock.advance(seconds=61)
        report = d.drain()
        assert report.auth_failed == 1 and len(edc.tried) == first + probe  # exactly one probe each time
    edc.refuse = False
    clock.advance(seconds=61)
    report = d.drain()  # the probe goes through: the stop is lifted (chains already deferred go next pass)
    assert report.sent >= 1 and d.endpoint_states()[0]["state"] == "closed"
    d.drain()
    assert sorted(edc.sent) == [(s, 1) for s in SUBJECTS]


def test_a_transient_failure_of_the_probe_keeps_the_stop_and_the_next_pass_probes_again(feeder4, store, clock):
    feeder4.rounds(1)
    edc = FakeEdc()
    edc.refuse = True
    d = dispatcher(store, edc, clock, auth_recheck=60, max_attempts=3)
    d.drain()
    edc.refuse, edc.transient = False, 1  # the EDC is back, but the probe's first attempt meets a 503
    clock.advance(seconds=61)
    report = d.drain()
    assert report.retries == 1 and report.sent == 4  # retried within the probe; accepted: the stop is lifted
    assert d.endpoint_states()[0]["state"] == "closed"


def test_without_a_re_check_only_new_credentials_lift_the_stop(feeder4, store, clock):
    feeder4.rounds(1)
    edc = FakeEdc()
    edc.refuse = True
    d = dispatcher(store, edc, clock, auth_recheck=None)
    d.drain()
    clock.advance(days=30)
    assert d.drain().sent == 0 and len(edc.tried) == 1
    state = d.endpoint_states()[0]
    assert state["state"] == "auth_failed" and state["until"] is None
    fixed = FakeEdc()  # e.g. a connector built with the new token
    d.set_connector(STUDY, fixed)
    assert d.drain().sent == 4 and len(edc.tried) == 1
    assert {e.status for e in feeder4.outbox()} == {"acked"}


def test_a_refusal_met_by_another_chain_stops_the_retries_of_a_running_one(feeder4, store, clock):
    """While subject 1's row is retried (transient), subject 2's chain meets the refusal: the retrying
    stops at the next attempt instead of presenting the credentials again and again."""
    feeder4.rounds(1)
    gate = threading.Event()

    class Mixed(FakeEdc):
        def send(self, tx, odm):
            with self._lock:
                self.tried.append((tx.subject_key, tx.sequence))
            if tx.subject_key == SUBJECTS[0]:
                gate.wait(5)
                for _ in range(500):  # until the dispatcher has stopped the endpoint
                    if d.endpoint_states()[0]["state"] == "auth_failed":
                        break
                    time.sleep(0.01)
                raise TransientDeliveryError("HTTP 503")
            gate.set()
            raise EdcAuthenticationError("HTTP 401", status=401)

    edc = Mixed()
    d = Dispatcher(store.uow, {STUDY: edc}, MDV, clock=clock, sleep=lambda s: None, workers=2, max_attempts=50,
                   auth_recheck=60)
    report = d.drain()
    assert report.auth_failed == 1
    assert edc.tried.count((SUBJECTS[0], 1)) == 1  # no second attempt once the endpoint was stopped


# ------------------------------------------------------------------------------------------ behind a rejection


class RejectOnce(FakeEdc):
    def __init__(self, reject: set[tuple[str, int]]) -> None:
        super().__init__()
        self.reject = set(reject)

    def send(self, tx, odm):
        if (tx.subject_key, tx.sequence) in self.reject:
            self.reject.discard((tx.subject_key, tx.sequence))
            with self._lock:
                self.tried.append((tx.subject_key, tx.sequence))
            return DeliveryReceipt(False, permanent=True, code="E42", message="form locked")
        return super().send(tx, odm)


def _rejection_key(subject: str) -> tuple[str, ...]:
    return Discrepancy(kind=DiscrepancyKind.EDC_REJECTED, message="", study_oid=STUDY, subject_key=subject).key


def test_rows_behind_a_rejection_wait_for_the_data_manager_and_a_new_rejection_holds_again(feeder4, store, clock):
    a, b = SUBJECTS[0], SUBJECTS[1]
    feeder4.weight(a, 1)
    feeder4.weight(a, 2)
    feeder4.weight(a, 3)
    feeder4.weight(b, 1)
    edc = RejectOnce({(a, 2), (a, 3)})
    d = dispatcher(store, edc, clock)
    report = d.drain()
    assert (report.sent, report.rejected, report.deferred) == (2, 1, 1)  # a1 and b1 sent, a2 rejected, a3 held
    for status in ("open", "in_review"):
        with store.uow() as uow:
            uow.set_discrepancy_status(_rejection_key(a), status)
            uow.commit()
        clock.advance(days=1)
        assert d.drain().sent == 0  # held, however long
    with store.uow() as uow:  # the data manager gives a2 up: entered by hand in the EDC
        uow.set_discrepancy_status(_rejection_key(a), "resolved")
        uow.commit()
    report = d.drain()
    assert report.rejected == 1 and report.sent == 0  # a3 went, and was rejected in its turn
    with store.uow(read_only=True) as uow:
        assert uow.discrepancy_status(_rejection_key(a)) == "open"  # re-opened: the subject is held again
    feeder4.weight(a, 4)
    assert d.drain().sent == 0
    with store.uow() as uow:  # this time: fix and re-queue a3, close the discrepancy, in one unit of work
        [a3] = [e for e in uow.outbox_entries(statuses=("rejected",)) if e.sequence == 3]
        uow.set_outbox_status(a3.id, "pending")
        uow.set_discrepancy_status(_rejection_key(a), "resolved")
        uow.commit()
    assert d.drain().sent == 2
    assert [t for t in edc.sent if t[0] == a] == [(a, 1), (a, 3), (a, 4)]  # in sequence; a2 never sent again
    statuses = {e.sequence: e.status for e in feeder4.outbox() if e.subject_key == a}
    assert statuses == {1: "acked", 2: "rejected", 3: "acked", 4: "acked"}


def test_a_rejected_row_without_a_discrepancy_holds_its_subject():
    class Uow:
        def discrepancy_status(self, key):
            return None

    class Row:
        study_oid, subject_key = STUDY, "001-0001"

    d = Dispatcher(lambda **kw: Uow(), {}, MDV)
    assert d._held_by_rejections(Uow(), [Row()]) == {(STUDY, "001-0001")}
    assert d._held_by_rejections(object(), [Row()]) == {(STUDY, "001-0001")}  # a store without statuses
