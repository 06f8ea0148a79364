"""The EDC contract: one suite, run against every connector through its harness (tests/contract/
harness.py; one `harness_<edc>.py` per EDC, collected by conftest.py).

Each test drives the real `Dispatcher` over real outbox rows made by the real use case (`Processor`:
FHIR in, ODM transactions out) and checks what the EDC holds through the harness. What every
connector must do:
- deliver: after a pass, the EDC's values equal esource's sent items, one write per transaction;
- retry transient faults (500, 503, 429 honouring Retry-After, a timeout, a dropped connection),
  before or after the EDC committed, without applying anything twice (write_count and values);
- keep each subject's transactions in sequence while other subjects flow;
- turn a permanent rejection into an EDC_REJECTED discrepancy carrying the vendor's code and message,
  holding the subject until a data manager re-queues the row or closes the discrepancy;
- on an authentication failure (the vendor's 401/403) stop sending to the endpoint, keep every
  transaction pending (no rejection, no discrepancy), probe once per re-check interval, resume when
  the credentials are accepted, and never show a credential;
- read a subject back in esource's keys (connectors with read-back);
- never overwrite a value site staff changed in the EDC (EDC_CONFLICT; connectors with read-back);
- survive a crash between the EDC's commit and esource's bookkeeping;
- soak: ESOURCE_SOAK_SIZE transactions (default 100 per connector) with ~30% injected transient
  faults, every value exactly once.

Conventions a harness must follow: `write_count()` grows by one per transaction the EDC applied
(never for a duplicate); `values()` uses esource's keys (repeat keys mapped back), every item the
EDC holds for the subject. A connector may accept a transaction whose SubjectData carries no data
(what is left when every item of a transaction was withheld for a conflict) as a no-op.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import threading
import time
from collections import Counter
from typing import Any

import orjson
import pytest

from esource.domain.model import DiscrepancyKind, Enrollment, ItemKey, Severity
from esource.intake.parse import parse_fhir
from esource.mapping.engine import MappingEngine
from esource.observability import Metrics
from esource.privacy import Pseudonymizer
from esource.services.conflicts import edc_values, item_path, odm_items
from esource.services.dispatch import Dispatcher, TransientDeliveryError
from esource.services.process import Processor, content_key, enroll, intake_key_for
from esource.study.study import load_study

STUDY, MDV = "CV01", "MDV.CV01.1"
MRN_SYSTEM = "http://hospital.example/mrn"
LOINC, UCUM = "http://loinc.org", "http://unitsofmeasure.org"
A, B = "001-0001", "002-0002"
DELIVERED = {"acked", "sent"}
WEIGHT = ("SE.BASELINE", None, "F.VS", "IG.VS", "WEIGHT", "IT.VS.VSORRES")
HEIGHT = ("SE.BASELINE", None, "F.VS", "IG.VS", "HEIGHT", "IT.VS.VSORRES")
HEART_RATE = ("SE.BASELINE", None, "F.VS", "IG.VS", "HR", "IT.VS.VSORRES")
SOAK_SIZE = int(os.environ.get("ESOURCE_SOAK_SIZE", "100"))
TRANSIENT_MODES = ("500", "503", "429", "timeout", "reset")


# ------------------------------------------------------------------------------------------ esource's side


class Sleeps:
    """The dispatcher's sleep: records each wait and moves the fake clock instead of waiting."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.clock.advance(seconds=seconds)


class World:
    """esource's side: enrolled subjects, FHIR ingested through the real use case (so the outbox
    holds the ODM transactions production would send), and dispatchers delivering to the harness."""

    def __init__(self, study: Any, store: Any, clock: Any, edc: Any, subjects: list[str]) -> None:
        self.study, self.store, self.clock, self.edc = study, store, clock, edc
        self.processor = Processor(study, MappingEngine(study), store.uow, Pseudonymizer(b"contract-key-0123456789ab"),
                                   clock)
        self.sleeps = Sleeps(clock)
        self._n = 0
        self.subjects: list[str] = []
        self.enroll(subjects)

    def enroll(self, subjects: list[str]) -> None:
        enroll(self.store.uow, [Enrollment(STUDY, s, "SITE.001" if s.startswith("001") else "SITE.002",
                                           ((MRN_SYSTEM, f"MRN-{s}"),), dt.date(2024, 4, 15), dt.date(2024, 5, 1))
                                for s in subjects])
        self.subjects.extend(subjects)

    # -- FHIR in -------------------------------------------------------------------------------------

    @staticmethod
    def patient(subject: str) -> dict:
        return {"resourceType": "Patient", "id": f"p-{subject}", "identifier": [{"system": MRN_SYSTEM,
                                                                                 "value": f"MRN-{subject}"}],
                "gender": "female" if subject[-1] in "13579" else "male", "birthDate": "1961-07-14"}

    @staticmethod
    def obs(subject: str, oid: str, code: str, value: float, unit: str, version: int,
            when: str = "2024-05-01T09:00:00+02:00") -> dict:
        return {"resourceType": "Observation", "id": oid, "meta": {"versionId": str(version)},
                "status": "final" if version == 1 else "amended", "code": {"coding": [{"system": LOINC, "code": code}]},
                "subject": {"reference": f"Patient/p-{subject}"}, "effectiveDateTime": when,
                "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit}}

    def ingest(self, subject: str, *resources: dict) -> Any:
        items = (self.patient(subject), *resources)
        data = orjson.dumps({"resourceType": "Bundle", "type": "collection",
                             "entry": [{"fullUrl": f"http://ehr.example/fhir/{r['resourceType']}/{r['id']}",
                                        "resource": r} for r in items]})
        self._n += 1
        return self.processor.ingest(parse_fhir(data, "contract"), intake_key_for("contract", self._n,
                                                                                   content_key(data)))

    def weight_obs(self, subject: str, version: int, value: float | None = None) -> dict:
        return self.obs(subject, f"wt-{subject}", "29463-7", 70.0 + version * 0.5 if value is None else value, "kg",
                        version)

    def height_obs(self, subject: str, version: int, value: float | None = None) -> dict:
        return self.obs(subject, f"ht-{subject}", "8302-2", 169.0 + version if value is None else value, "cm", version)

    def weight(self, subject: str, version: int, value: float | None = None) -> Any:
        """Baseline weight: version 1 is the subject's first transaction (Inserts), later versions Update."""
        return self.ingest(subject, self.weight_obs(subject, version, value))

    def height(self, subject: str, version: int = 1, value: float | None = None) -> Any:
        return self.ingest(subject, self.height_obs(subject, version, value))

    def heart_rate(self, subject: str, value: float = 72) -> Any:
        return self.ingest(subject, self.obs(subject, f"hr-{subject}", "8867-4", value, "/min", 1))

    def rounds(self, versions: int, subjects: list[str] | None = None) -> None:
        """`versions` weight transactions per subject, interleaved across subjects."""
        for v in range(1, versions + 1):
            for s in subjects or self.subjects:
                self.weight(s, v)

    # -- esource's state -------------------------------------------------------------------------------

    def outbox(self, statuses: tuple[str, ...] | None = None) -> list:
        with self.store.uow(read_only=True) as uow:
            return uow.outbox_entries(statuses=statuses)

    def sent_items(self, subject: str) -> dict[ItemKey, Any]:
        with self.store.uow(read_only=True) as uow:
            return uow.sent_items(STUDY, subject)

    def expected(self, subject: str) -> dict[tuple, str]:
        """What the EDC must hold for the subject: esource's sent items (frozen ones excluded: the
        EDC keeps the site's value there), in the harness's keys."""
        return {path_of(k): s.value for k, s in self.sent_items(subject).items() if not s.frozen}

    def discrepancies(self, subject: str, kind: Any = None) -> list:
        with self.store.uow(read_only=True) as uow:
            found = uow.open_discrepancies(STUDY, subject)
        return [d for d in found if kind is None or d.kind is kind]

    def dispatcher(self, connector: Any = None, **options: Any) -> Dispatcher:
        options.setdefault("workers", 1)
        options.setdefault("base_delay", 0.01)
        options.setdefault("max_delay", 1.0)
        options.setdefault("max_attempts", 6)
        return Dispatcher(self.store.uow, {STUDY: connector or self.edc.connector}, {STUDY: MDV},
                          options.pop("metrics", None), clock=self.clock, sleep=self.sleeps, **options)


def path_of(key: ItemKey) -> tuple:
    return (key.study_event_oid, key.study_event_repeat_key, key.form_oid, key.item_group_oid,
            key.item_group_repeat_key, key.item_oid)


@pytest.fixture(scope="session")
def contract_study() -> Any:
    return load_study(STUDY)


@pytest.fixture
def world(contract_study, store, clock, edc) -> World:
    return World(contract_study, store, clock, edc, ["001-0001", "002-0002"])


# ------------------------------------------------------------------------------------------ helpers


def key(subject: str, path: tuple) -> ItemKey:
    return ItemKey(STUDY, subject, *path)


def assert_all_delivered(world: World, edc: Any, *, writes: int | None = None) -> None:
    rows = world.outbox()
    assert {e.status for e in rows} <= DELIVERED, [(e.subject_key, e.sequence, e.status, e.last_error) for e in rows]
    for subject in {e.subject_key for e in rows}:
        assert edc.values(STUDY, subject) == world.expected(subject), subject
    assert edc.write_count() == (len(rows) if writes is None else writes)


class FlakyFor:
    """Wraps a connector: the first `n` sends of `subject` fail transiently; records what got through."""

    def __init__(self, inner: Any, subject: str, n: int) -> None:
        self.inner, self.subject, self.n = inner, subject, n
        self.tried: list[tuple[str, int]] = []
        self.delivered: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    def capabilities(self) -> Any:
        return self.inner.capabilities()

    def send(self, tx: Any, odm: bytes) -> Any:
        with self._lock:
            self.tried.append((tx.subject_key, tx.sequence))
            fail = tx.subject_key == self.subject and self.n > 0
            self.n -= fail
        if fail:
            raise TransientDeliveryError(f"EDC busy for subject {tx.subject_key}")
        receipt = self.inner.send(tx, odm)
        with self._lock:
            self.delivered.append((tx.subject_key, tx.sequence))
        return receipt

    def read_back(self, study: str, subject: str) -> bytes | None:
        return self.inner.read_back(study, subject)


# ------------------------------------------------------------------------------------------ delivery


def test_delivers_every_transaction_and_the_edc_holds_what_esource_sent(edc, world):
    world.weight(A, 1)
    world.weight(B, 1)
    world.height(A)
    world.weight(A, 2)  # an Update (the value esource sent is unchanged at the EDC: no conflict)
    report = world.dispatcher().drain()
    assert (report.sent, report.rejected, report.failed, report.retries, report.conflicts) == (4, 0, 0, 0, 0)
    assert_all_delivered(world, edc, writes=4)
    assert edc.values(STUDY, A)[WEIGHT] == "71.0" and edc.values(STUDY, A)[HEIGHT] == "170.0"
    assert edc.values(STUDY, "009-9999") == {}
    assert world.discrepancies(A) == [] and world.discrepancies(B) == []
    assert world.dispatcher().drain().sent == 0  # nothing left to do


@pytest.mark.parametrize("after_commit", [False, True], ids=["before-commit", "after-commit"])
@pytest.mark.parametrize("mode", TRANSIENT_MODES)
def test_transient_faults_are_retried_and_nothing_is_applied_twice(edc, world, mode, after_commit):
    retry_after = 1 if mode in ("429", "503") else None
    d = world.dispatcher()
    # first transactions (subject Insert), then Updates (read back before each attempt where supported)
    for phase in (1, 2):
        world.weight(A, phase)
        world.weight(B, phase)
        edc.inject(mode, 2, retry_after=retry_after, after_commit=after_commit)
        report = d.drain()
        assert (report.sent, report.failed, report.rejected, report.retries) == (2, 0, 0, 2), report
        assert report.conflicts == 0
        edc.clear_faults()
    assert_all_delivered(world, edc, writes=4)
    if mode == "429":
        assert len([w for w in world.sleeps.waits if w >= 1]) >= 4  # Retry-After honoured on every retry
    assert world.discrepancies(A) == [] and world.discrepancies(B) == []


def test_order_per_subject_is_kept_while_another_subject_flows(edc, world):
    world.rounds(3)  # A1 B1 A2 B2 A3 B3
    flaky = FlakyFor(edc.connector, A, 3)
    d = world.dispatcher(flaky, max_attempts=3, workers=2)
    report = d.drain()
    assert (report.sent, report.failed, report.deferred) == (3, 1, 2)
    assert [t for t in flaky.tried if t[0] == A] == [(A, 1)] * 3  # A2, A3 held behind A1
    assert flaky.delivered == [(B, 1), (B, 2), (B, 3)]
    assert edc.values(STUDY, A) == {}
    assert edc.values(STUDY, B) == world.expected(B)
    world.clock.advance(minutes=5)  # past the subject's cool-down
    assert d.drain().sent == 3
    assert [t for t in flaky.delivered if t[0] == A] == [(A, 1), (A, 2), (A, 3)]
    assert_all_delivered(world, edc, writes=6)


# ------------------------------------------------------------------------------------------ rejections


def test_a_rejection_opens_a_discrepancy_with_the_vendors_words_and_holds_the_subject(edc, world):
    world.weight(A, 1)
    world.weight(B, 1)
    world.weight(A, 2)
    edc.inject("reject")
    d = world.dispatcher()
    report = d.drain()
    assert (report.sent, report.rejected, report.deferred) == (1, 1, 1)
    assert report.blocked_subjects == {(STUDY, A)}
    rows = {(e.subject_key, e.sequence): e for e in world.outbox()}
    assert rows[(A, 1)].status == "rejected" and rows[(A, 2)].status == "pending"
    assert rows[(B, 1)].status in DELIVERED
    [disc] = world.discrepancies(A)
    assert disc.kind is DiscrepancyKind.EDC_REJECTED and disc.severity is Severity.ERROR
    vendor = disc.candidates[0]
    assert vendor["code"] and vendor["edc_message"] and vendor["sequence"] == 1
    assert rows[(A, 1)].last_error == f"{vendor['code']}: {vendor['edc_message']}"
    assert f"with code {vendor['code']}: {vendor['edc_message']}" in disc.message
    assert edc.values(STUDY, A) == {} and edc.write_count() == 1  # nothing of A applied
    world.clock.advance(hours=2)
    assert d.drain().sent == 0  # still held, however long
    with world.store.uow() as uow:  # a data manager fixes it and re-queues the row
        uow.set_discrepancy_status(disc.key, "resolved")
        uow.set_outbox_status(rows[(A, 1)].id, "pending")
        uow.commit()
    edc.clear_faults()
    assert d.drain().sent == 2
    assert_all_delivered(world, edc, writes=3)


def test_closing_a_rejection_without_re_queueing_lets_the_later_rows_go(edc, world):
    """The rule for a subject's later rows (esource/services/dispatch.py): held while the EDC_REJECTED
    discrepancy is open or in review; closed without a re-queue, the rejected row stays rejected and
    is never sent again, the later rows go in sequence."""
    world.weight(A, 1)
    assert world.dispatcher().drain().sent == 1
    world.height(A)  # A2: rejected below
    world.heart_rate(A)  # A3: held behind A2
    edc.inject("reject")
    d = world.dispatcher()
    report = d.drain()
    assert (report.sent, report.rejected, report.deferred) == (0, 1, 1)
    [disc] = world.discrepancies(A)
    with world.store.uow() as uow:
        uow.set_discrepancy_status(disc.key, "in_review")  # a data manager looks at it: still held
        uow.commit()
    edc.clear_faults()
    assert d.drain().sent == 0
    with world.store.uow() as uow:
        uow.set_discrepancy_status(disc.key, "dismissed")  # entered by hand in the EDC, or given up
        uow.commit()
    report = d.drain()
    assert (report.sent, report.rejected, report.deferred) == (1, 0, 0)
    rows = {e.sequence: e.status for e in world.outbox() if e.subject_key == A}
    assert rows[1] in DELIVERED and rows[2] == "rejected" and rows[3] in DELIVERED
    values = edc.values(STUDY, A)
    assert HEIGHT not in values and values[HEART_RATE] == "72" and values[WEIGHT] == "70.5"
    assert edc.write_count() == 2
    assert d.drain().sent == 0  # the rejected row is never sent again


class CountingSends:
    """Wraps a connector: counts sends (each one presents esource's credentials to the EDC)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.sends = 0

    def capabilities(self) -> Any:
        return self.inner.capabilities()

    def send(self, tx: Any, odm: bytes) -> Any:
        self.sends += 1
        return self.inner.send(tx, odm)

    def read_back(self, study: str, subject: str) -> bytes | None:
        return self.inner.read_back(study, subject)


def test_an_authentication_failure_stops_the_endpoint_and_keeps_every_transaction_pending(edc, world, caplog):
    world.weight(A, 1)
    world.weight(B, 1)
    world.weight(A, 2)
    edc.inject("auth", 1000)  # the EDC refuses esource's credentials until further notice
    counting = CountingSends(edc.connector)
    name = counting.capabilities().name
    metrics = Metrics()
    d = world.dispatcher(counting, metrics=metrics, auth_recheck=600)
    caplog.set_level(logging.DEBUG, logger="esource")

    report = d.drain()
    assert report.auth_failed == 1 and (report.sent, report.rejected, report.failed, report.retries) == (0, 0, 0, 0)
    assert counting.sends == 1  # one refusal stops the endpoint: no retry, no other subject tried
    assert {e.status for e in world.outbox()} == {"pending"}
    assert world.discrepancies(A) == [] and world.discrepancies(B) == []
    assert edc.values(STUDY, A) == {} and edc.values(STUDY, B) == {} and edc.write_count() == 0
    [state] = d.endpoint_states()
    assert (state["state"], state["studies"], state["connector"]) == ("auth_failed", [STUDY], name)
    [refused] = [e for e in world.outbox() if e.last_error]
    assert (refused.subject_key, refused.sequence) == (A, 1) and "credentials" in refused.last_error
    assert metrics.registry.get_sample_value("esource_edc_circuit_open", {"connector": name}) == 1
    assert metrics.registry.get_sample_value("esource_deliveries_total",
                                             {"connector": name, "outcome": "auth_failed"}) == 1

    world.clock.advance(seconds=599)  # before the re-check nothing is sent, however often it passes
    assert d.drain().sent == 0 and d.drain().sent == 0 and counting.sends == 1
    world.clock.advance(seconds=2)  # the re-check: one probe, refused again: stopped again
    report = d.drain()
    assert report.auth_failed == 1 and counting.sends == 2 and d.endpoint_states()[0]["state"] == "auth_failed"
    assert {e.status for e in world.outbox()} == {"pending"}

    edc.clear_faults()  # the credentials are fixed at the EDC
    assert d.drain().sent == 0  # esource waits for the next re-check
    world.clock.advance(seconds=601)
    report = d.drain()
    assert report.sent == 3 and report.auth_failed == 0
    assert_all_delivered(world, edc, writes=3)
    assert d.endpoint_states()[0]["state"] == "closed"
    assert metrics.registry.get_sample_value("esource_edc_circuit_open", {"connector": name}) == 0
    assert world.discrepancies(A) == [] and world.discrepancies(B) == []

    shown = caplog.text + repr(d.endpoint_states()) + repr(edc.connector) + "".join(
        e.last_error or "" for e in world.outbox())
    assert "refused esource's credentials" in caplog.text
    for secret in getattr(edc, "secrets", ()):
        assert secret not in shown


# ------------------------------------------------------------------------------------------ read-back and conflicts


def _needs_read_back(edc: Any) -> None:
    if not edc.connector.capabilities().read_back:
        pytest.skip(f"{edc.name}: the connector has no read-back (the conflict check is skipped by design)")


def test_read_back_returns_the_subject_in_esource_keys(edc, world):
    _needs_read_back(edc)
    world.weight(A, 1)
    world.height(A)
    world.weight(A, 2)
    world.dispatcher().drain()
    snapshot = edc.connector.read_back(STUDY, A)
    assert snapshot is not None
    assert edc_values(snapshot, A) == {item_path(*p): v for p, v in world.expected(A).items()}
    assert edc.connector.read_back(STUDY, "009-9999") is None


def test_a_value_changed_by_site_staff_is_never_overwritten(edc, world):
    _needs_read_back(edc)
    world.weight(A, 1)  # 70.5
    world.height(A)  # 170.0
    assert world.dispatcher().drain().sent == 2
    edc.site_edit(STUDY, A, WEIGHT, "99.9")

    # the source changes both: the weight is withheld (conflict), the height still goes
    world.ingest(A, world.weight_obs(A, 2), world.height_obs(A, 2))  # 71.0, 171.0
    [row] = world.outbox(("pending",))
    assert row.previous_values == {item_path(*WEIGHT): "70.5", item_path(*HEIGHT): "170.0"}
    d = world.dispatcher()
    report = d.drain()
    assert (report.sent, report.rejected, report.failed, report.conflicts) == (1, 0, 0, 1)
    values = edc.values(STUDY, A)
    assert values[WEIGHT] == "99.9" and values[HEIGHT] == "171.0"
    [disc] = world.discrepancies(A, DiscrepancyKind.EDC_CONFLICT)
    assert disc.item_oid == "IT.VS.VSORRES" and disc.study_event_oid == "SE.BASELINE"
    assert disc.item_group_repeat_key == "WEIGHT" and disc.held_value == "71.0"
    assert disc.source is not None and disc.source.resource_type == "Observation"
    c = disc.candidates[0]
    assert (c["edc_value"], c["last_sent_value"], c["proposed_value"]) == ("99.9", "70.5", "71.0")
    assert "'99.9'" in disc.message and "'71.0'" in disc.message
    assert world.discrepancies(A, DiscrepancyKind.EDC_REJECTED) == []
    state = world.sent_items(A)
    assert state[key(A, WEIGHT)].frozen and not state[key(A, HEIGHT)].frozen
    [sent] = [e for e in world.outbox() if e.id == row.id]
    assert sent.status in DELIVERED and sent.item_count == 1 and sent.last_error.startswith("conflict:")
    assert [i.key for i in odm_items(sent.odm)] == [HEIGHT]

    # a later source change of the frozen item is not sent either
    outcome = world.weight(A, 3)
    assert outcome.subjects[0].items_sent == 0
    assert d.drain().sent == 0
    assert edc.values(STUDY, A)[WEIGHT] == "99.9"

    # every item of a transaction withheld: the (empty) transaction still goes, the chain continues
    edc.site_edit(STUDY, A, HEIGHT, "180.0")
    world.height(A, 3)  # 172.0
    report = d.drain()
    assert (report.sent, report.conflicts, report.rejected) == (1, 1, 0)
    world.heart_rate(A)
    assert d.drain().sent == 1
    values = edc.values(STUDY, A)
    assert values[WEIGHT] == "99.9" and values[HEIGHT] == "180.0" and values[HEART_RATE] == "72"
    assert {k: v for k, v in values.items() if k not in (WEIGHT, HEIGHT)} == world.expected(A)
    assert {d.item_group_repeat_key for d in world.discrepancies(A, DiscrepancyKind.EDC_CONFLICT)} == {"WEIGHT",
                                                                                                      "HEIGHT"}
    assert {e.status for e in world.outbox()} <= DELIVERED


# ------------------------------------------------------------------------------------------ crashes


class CrashAfterSend:
    """The process 'dies' after the EDC applied the transaction, before esource recorded it."""

    class Crash(BaseException):
        pass

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def capabilities(self) -> Any:
        return self.inner.capabilities()

    def send(self, tx: Any, odm: bytes) -> Any:
        self.inner.send(tx, odm)
        raise self.Crash()

    def read_back(self, study: str, subject: str) -> bytes | None:
        return self.inner.read_back(study, subject)


@pytest.mark.parametrize("first", [1, 2], ids=["insert", "update"])
def test_a_crash_between_the_edcs_commit_and_esources_bookkeeping_is_safe(edc, world, first):
    world.weight(A, 1)
    if first == 2:
        world.dispatcher().drain()
    world.weight(A, 2)
    with pytest.raises(CrashAfterSend.Crash):
        world.dispatcher(CrashAfterSend(edc.connector)).drain()
    assert [e.status for e in world.outbox() if e.sequence >= first] == ["pending"] * (3 - first)
    report = world.dispatcher().drain()  # the restarted service sends the same transaction again
    assert report.sent == 3 - first and report.conflicts == 0 and report.rejected == 0
    assert_all_delivered(world, edc, writes=2)


# ------------------------------------------------------------------------------------------ soak


class Chaos:
    """Wraps the harness's connector: before ~`rate` of the sends, the harness injects one transient
    fault (a random supported mode, half of them after the EDC committed)."""

    def __init__(self, edc: Any, rate: float, seed: int) -> None:
        self.edc, self.inner, self.rate = edc, edc.connector, rate
        self.rng = random.Random(seed)
        self.modes = list(TRANSIENT_MODES)
        self.injected: Counter[str] = Counter()
        self._lock = threading.Lock()

    def capabilities(self) -> Any:
        return self.inner.capabilities()

    def send(self, tx: Any, odm: bytes) -> Any:
        with self._lock:
            while self.modes and self.rng.random() < self.rate:
                mode, after = self.rng.choice(self.modes), self.rng.random() < 0.5
                try:
                    self.edc.inject(mode, 1, retry_after=0, after_commit=after)
                except pytest.skip.Exception:
                    self.modes.remove(mode)  # a mode this EDC cannot have: pick another
                    continue
                self.injected[mode + ("+after_commit" if after else "")] += 1
                break
        return self.inner.send(tx, odm)

    def read_back(self, study: str, subject: str) -> bytes | None:
        return self.inner.read_back(study, subject)


def test_soak_every_value_exactly_once_under_transient_faults(edc, world):
    started = time.monotonic()
    subjects = [f"00{1 + i % 2}-{i + 10:04d}" for i in range(10)]
    world.enroll(subjects)
    world.rounds(max(1, SOAK_SIZE // len(subjects)), subjects)
    rows = world.outbox()
    fed = time.monotonic() - started
    chaos = Chaos(edc, rate=0.3, seed=20250301)
    d = world.dispatcher(chaos, workers=4)
    passes = 0
    while world.outbox(("pending", "failed")):
        passes += 1
        assert passes <= 20, f"{len(world.outbox(('pending', 'failed')))} rows undelivered after 20 passes"
        d.drain()
        world.clock.advance(minutes=5)  # past every cool-down and open circuit
    edc.clear_faults()
    assert_all_delivered(world, edc, writes=len(rows))
    total = sum(chaos.injected.values())
    assert total >= 0.15 * len(rows), chaos.injected
    assert d.totals.conflicts == 0 and d.totals.rejected == 0
    assert all(world.discrepancies(s) == [] for s in subjects)
    print(f"\nsoak[{edc.name}]: {len(rows)} transactions ({fed:.1f}s to produce), {total} injected faults "
          f"{dict(chaos.injected)}, {d.totals.retries} retries, {d.totals.duplicates} duplicates recognised, "
          f"{passes} pass(es), {time.monotonic() - started:.1f}s in all")


def test_every_harness_module_imports(broken_harness_modules):
    """Guard: a broken harness_*.py is reported here too (its contract tests fail in setup)."""
    assert broken_harness_modules == {}, "\n\n".join(f"{m}:\n{e}" for m, e in broken_harness_modules.items())

