"""Outbox dispatch: deliver committed ODM transactions to the study's EDC connector with
exactly-once effect.

    dispatcher = Dispatcher(store.uow, {"CV01": SandboxConnector(url)}, {"CV01": "MDV.CV01.1"}, metrics)
    report = dispatcher.drain()                 # one pass (tests, the backfill CLI)
    dispatcher.run_forever(stop_event)          # the service's background thread

The rules:
- Rows go out in id order, strictly in sequence per subject: a subject's rows form a chain, sent one
  after the other; a row that does not get through holds back the subject's later rows, while other
  subjects' chains keep flowing (`workers` chains run at once; 1 = strictly sequential).
- Transient faults (the connector raises — `TransientDeliveryError` or anything else) are retried with
  tenacity: exponential backoff with jitter, at most `max_attempts` attempts, waiting at least the
  EDC's Retry-After. A Retry-After longer than `max_delay` is not slept through: the row is left
  `failed` and the study's connector paused until then. After the last attempt the row stays
  `failed` (visible, with its last error and attempt count) and is retried on a later pass once the
  subject's cool-down (`max_delay`) has passed — a row is never dropped.
- A permanent rejection (a receipt with `accepted=False, permanent=True`) makes the row `rejected`
  and opens (or re-opens) the subject's `EDC_REJECTED` discrepancy with the vendor's code and message.
  The rule for the subject's later rows: they are held — never sent past the rejected row, however
  long — while that discrepancy is open or in review (or missing). A data manager ends the hold in one
  of two ways: (a) re-queue the rejected row (status `pending`, e.g. after fixing the cause in the
  EDC) and close the discrepancy, in one unit of work: the row goes first, then the later rows, in
  sequence; (b) close the discrepancy (resolved or dismissed) WITHOUT re-queueing: the row stays
  `rejected` for good (never sent again; what it carried is the data manager's to enter by hand) and
  the later rows go. Why: later rows are diffs against what esource sent before, so they must not
  overtake a row that may still be sent, but a row a data manager gave up must not hold the subject
  forever. A later rejection re-opens the discrepancy and holds the subject again. Other subjects
  are never held.
- Authentication failures are not about one transaction: a connector raises `EdcAuthenticationError`
  (HTTP 401/403, as each vendor answers a wrong password, token or API right) and the dispatcher
  stops sending to that connector (every study routed to the same connector instance) instead of
  rejecting or retrying: the row stays `pending` (last_error says why), so does everything behind it,
  nothing becomes a discrepancy. After `auth_recheck` seconds exactly one row goes as a probe (no
  burst of failed logins that could lock the EDC account); an answer other than a refusal of the
  credentials lifts the stop. A restart with new credentials (or `set_connector`) starts afresh;
  `auth_recheck=None` (or 0) waits for that. `endpoint_states()` reports `auth_failed` meanwhile;
  the log line and the row's error carry the vendor's code and message, never a credential.
- No duplicates: connectors de-duplicate on the transaction key (study/subject/sequence), so sending
  again after an ambiguous failure (a timeout after the EDC committed, a crash between the send and
  the status update) is safe: the EDC answers with its original receipt.
- Acknowledgements are recorded off the delivery path in the background loop (`run_forever`): a
  worker hands the acked row to a recorder thread and goes on to the subject's next row; the
  recorder writes every ack waiting (status, TRANSFER_SENT/ACKNOWLEDGED audit entries stamped at the
  EDC's answer) in one transaction, and only then lets a later pass look at the subject again. Why:
  one write transaction per row made the workers queue behind the intake's for the database's write
  lock (SQLite has one), so delivery, not mapping, set the latency. A crash before the recording
  re-sends the row after restart, which the EDC answers as a duplicate (rule above). Any other write
  of a chain (failure, rejection, conflict, refusal) first waits for the acks before it, so the
  trail stays in order. `drain()` records each ack at once, as before.
- `wake()` (the intake calls it after committing outbox rows) starts the next pass at once instead
  of at the next poll.
- Conflicts (esource/services/conflicts.py): before a row that Updates items goes out, the subject
  is read back from the EDC (connectors with `capabilities().read_back`; on every attempt). An
  Updated item whose EDC value is neither the value esource last sent nor the one proposed was
  changed by site staff: it is withheld (the rest goes; the reduced ODM replaces the row's), an
  `EDC_CONFLICT` discrepancy is opened and the item's state frozen. A failing read-back is a
  transient failure of the attempt (nothing is sent unchecked). Connectors without read-back are
  not checked. `check_conflicts=False` turns the check off.
- A circuit breaker per study: after `breaker_threshold` rows in a row exhausted their attempts, the
  connector is left alone for `breaker_cooldown` seconds (`esource_edc_circuit_open` is 1 meanwhile,
  and while the connector is stopped for its credentials).
- Metrics: `esource_deliveries_total{connector,outcome}` per attempt (accepted, duplicate, rejected,
  transient, auth_failed), per row given up (gave_up) and per row with items withheld for a conflict
  (conflict);
  `esource_delivery_latency_seconds` from the outbox row's creation to the EDC's acknowledgement;
  `esource_outbox_depth{status}` for pending/failed/rejected.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, stop_any
from tenacity.wait import wait_exponential, wait_random

from esource.domain.audit import AuditAction, AuditEvent
from esource.domain.model import Discrepancy, DiscrepancyKind, ItemKey, Severity, SubjectTransaction
from esource.domain.ports import Clock, DeliveryReceipt, EdcConnector, SystemClock
from esource.errors import EsourceError
from esource.observability import Metrics
from esource.services import conflicts

log = logging.getLogger("esource.dispatch")

ANY_STUDY = "*"
"""Key of a connector (or metadata version) that serves every study without one of its own."""


class TransientDeliveryError(EsourceError):
    """A delivery that may succeed later: the EDC was unreachable, slow, overloaded or out of order.
    `retry_after` (seconds) is the EDC's own Retry-After when it gave one; `ambiguous` is True when
    the EDC may have applied the transaction anyway (a timeout after the request was sent)."""

    def __init__(self, message: str, *, retry_after: float | None = None, code: str | None = None,
                 ambiguous: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.code = code
        self.ambiguous = ambiguous


class EdcAuthenticationError(TransientDeliveryError):
    """The EDC refused esource's credentials (a wrong or expired password or token, an account without
    API rights): no transaction of this endpoint can go until they change. Connectors raise it with
    the vendor's status, code and message, never a credential. A subclass of TransientDeliveryError,
    so code that does not know it keeps the row instead of rejecting it."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.status = status


@dataclass
class DispatchReport:
    """What one pass did. `sent` counts accepted transactions (duplicates included)."""

    sent: int = 0
    rejected: int = 0
    failed: int = 0  # rows left `failed` this pass (attempts exhausted, Retry-After too long, shutdown)
    retries: int = 0  # transient failures that were retried
    duplicates: int = 0  # accepted by the EDC as already received (nothing applied twice)
    conflicts: int = 0  # items withheld because site staff changed them in the EDC (EDC_CONFLICT)
    deferred: int = 0  # rows not attempted: subject or connector backing off, or held behind a failed row
    unroutable: int = 0  # rows of a study without a connector
    auth_failed: int = 0  # rows the EDC refused for esource's credentials (left pending; the endpoint stopped)
    blocked_subjects: set[tuple[str, str]] = field(default_factory=set)
    references: list[str] = field(default_factory=list)

    def merge(self, other: DispatchReport) -> None:
        for name in ("sent", "rejected", "failed", "retries", "duplicates", "conflicts", "deferred", "unroutable",
                     "auth_failed"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.blocked_subjects |= other.blocked_subjects
        self.references.extend(other.references)


class _Retryable(Exception):
    """Internal: one failed attempt, carrying the connector's exception (the only thing retried)."""

    def __init__(self, cause: BaseException, retry_after: float | None) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.retry_after = retry_after


@dataclass
class _Circuit:
    failures: int = 0  # consecutive rows that exhausted their attempts
    open_until: dt.datetime | None = None


@dataclass
class _AuthStop:
    """A connector the EDC refused the credentials of: nothing goes until `until` (None: until restart),
    then one probe row at a time."""

    name: str
    since: dt.datetime
    until: dt.datetime | None
    reason: str
    probing: bool = False


_DELIVERED, _FAILED, _REJECTED, _DEFERRED, _AUTH = "delivered", "failed", "rejected", "deferred", "auth_failed"


class Dispatcher:
    """Delivers outbox rows to the EDC connectors (one per study OID, `"*"` for any study)."""

    def __init__(
        self,
        uow_factory: Callable[..., Any],
        connectors: Mapping[str, EdcConnector],
        metadata_versions: Mapping[str, str],
        metrics: Metrics | None = None,
        *,
        max_attempts: int = 6,
        base_delay: float = 0.5,
        max_delay: float = 30.0,
        workers: int = 4,
        batch_size: int = 1000,
        breaker_threshold: int = 3,
        breaker_cooldown: float | None = None,
        clock: Clock | None = None,
        sleep: Callable[[float], Any] | None = None,
        check_conflicts: bool = True,
        auth_recheck: float | None = 900.0,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.uow_factory = uow_factory
        self.connectors = dict(connectors)
        self.metadata_versions = dict(metadata_versions)
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.workers = workers
        self.batch_size = batch_size
        self.breaker_threshold = breaker_threshold
        self.breaker_cooldown = max_delay if breaker_cooldown is None else breaker_cooldown
        self.check_conflicts = check_conflicts
        self.auth_recheck = auth_recheck or None  # seconds; None: only a restart or set_connector lifts the stop
        self.clock: Clock = clock or SystemClock()
        self._halt = threading.Event()  # set while the service stops: sleeps end, retries stop
        self._sleep = sleep or (lambda seconds: self._halt.wait(seconds))
        # base_delay * 2^(attempt-1), capped, plus up to base_delay of jitter (tenacity 8.2 and 9 alike)
        self._backoff = wait_exponential(multiplier=base_delay, max=max_delay) + wait_random(0, base_delay)
        self._lock = threading.Lock()
        self._in_flight: set[tuple[str, str]] = set()
        self._not_before: dict[tuple[str, str], dt.datetime] = {}
        self._circuits: dict[str, _Circuit] = {}
        self._auth: dict[int, _AuthStop] = {}  # by id() of the connector instance the EDC refused
        self._names: dict[str, str] = {}
        self._read_back: dict[str, bool] = {}
        self._warned: set[str] = set()
        self._recorder: _AckRecorder | None = None  # run_forever's: acks recorded in batches
        self._wake = threading.Event()
        self.totals = DispatchReport()  # what every chain did since start (run_forever included)

    # ------------------------------------------------------------------------------------ public

    def drain(self, limit: int | None = None) -> DispatchReport:
        """One pass over the outbox: every deliverable row is tried (with retries) before returning."""
        if self.workers == 1:
            report = self._pass(limit or self.batch_size, executor=None, wait=True)
        else:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="esource-dispatch") as pool:
                report = self._pass(limit or self.batch_size, executor=pool, wait=True)
        self._refresh_depth()
        return report

    def run_forever(self, stop: threading.Event, poll_interval: float = 0.2) -> None:
        """Deliver until `stop` is set (the service's background thread). Subjects whose chain is still
        running are left for a later poll; the outbox is not re-read while every worker is busy."""
        self._halt = stop
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="esource-dispatch")
        self._recorder = _AckRecorder(self)
        error_pause = poll_interval
        log.info("dispatcher started", extra={"count": self.workers})
        try:
            while not stop.is_set():
                self._wake.clear()
                with self._lock:
                    busy = len(self._in_flight)
                if busy < self.workers:
                    try:
                        self._pass(self.batch_size, executor=pool, wait=False)
                        error_pause = poll_interval
                    except Exception:  # the store is unavailable, say: keep going, slower
                        log.exception("dispatcher pass failed")
                        error_pause = min(max(error_pause * 2, poll_interval), 10.0)
                        stop.wait(error_pause)
                        continue
                self._wake.wait(poll_interval)
        finally:
            pool.shutdown(wait=True)
            recorder, self._recorder = self._recorder, None
            recorder.close(timeout=10.0)  # what the EDC acknowledged is recorded before stopping
            with self._lock:
                self._in_flight.clear()
            self._halt = threading.Event()
            log.info("dispatcher stopped")

    def wake(self) -> None:
        """New rows are in the outbox: start the next pass now (run_forever), not at the next poll."""
        self._wake.set()

    def set_connector(self, study: str, connector: EdcConnector) -> None:
        """Route a study to another connector (e.g. with new credentials): it starts without any stop."""
        with self._lock:
            self.connectors[study] = connector
            self._names.pop(study, None)
            self._read_back.pop(study, None)

    def endpoint_states(self) -> list[dict[str, Any]]:
        """Each connector's state now, for operators and readiness: `closed` (delivering), `open` (the
        breaker pauses it), or `auth_failed` (the EDC refused the credentials), with its studies,
        until when, and why (the vendor's code and message; never a credential)."""
        now = self.clock.now()
        out: dict[int, dict[str, Any]] = {}
        for study, connector in list(self.connectors.items()):
            entry = out.setdefault(id(connector), {"connector": self._name(study, connector), "studies": [],
                                                   "state": "closed", "until": None, "reason": None})
            entry["studies"].append(study)
            with self._lock:
                stop = self._auth.get(id(connector))
                circuit = self._circuits.get(study)
            if stop is not None:
                entry.update(state="auth_failed", until=stop.until.isoformat() if stop.until else None,
                             reason=stop.reason, since=stop.since.isoformat())
            elif circuit is not None and circuit.open_until is not None and now < circuit.open_until:
                entry.update(state="open", until=circuit.open_until.isoformat())
        return list(out.values())

    # ------------------------------------------------------------------------------------ a pass

    def _reader(self) -> Any:
        try:
            return self.uow_factory(read_only=True)
        except TypeError:
            return self.uow_factory()

    def _pass(self, limit: int, *, executor: ThreadPoolExecutor | None, wait: bool) -> DispatchReport:
        report = DispatchReport()
        with self._lock:
            busy = set(self._in_flight)  # taken BEFORE reading: a chain finished since then has committed
        with self._reader() as uow:
            entries = uow.outbox_entries(statuses=("pending", "failed"), limit=limit)
            rejected = uow.outbox_entries(statuses=("rejected",))
            blocked = self._held_by_rejections(uow, rejected)
        self._set_depth(entries, rejected, limit)
        chains: dict[tuple[str, str], list[Any]] = {}
        for e in entries:  # id order: chains start in the order their first row was written
            chains.setdefault((e.study_oid, e.subject_key), []).append(e)
        now = self.clock.now()
        futures: list[Future[DispatchReport]] = []
        for subject, rows in chains.items():
            study = subject[0]
            if subject in blocked:
                report.blocked_subjects.add(subject)
                report.deferred += len(rows)
                continue
            if subject in busy:
                continue  # its chain is running; the next poll sees what it left
            connector = self._connector(study)
            if connector is None:
                report.unroutable += len(rows)
                if study not in self._warned:  # once per study, not on every poll
                    self._warned.add(study)
                    log.warning("no EDC connector for the study: its rows stay pending",
                                extra={"study": study, "count": len(rows)})
                continue
            not_before = self._not_before.get(subject)
            if (not_before is not None and now < not_before) or self._circuit_open(study, now):
                report.deferred += len(rows)
                report.blocked_subjects.add(subject)
                continue
            probe = self._auth_gate(connector, now)
            if probe is None:  # the EDC refused the credentials: nothing goes to it
                report.deferred += len(rows)
                report.blocked_subjects.add(subject)
                continue
            rows.sort(key=lambda r: r.sequence)
            with self._lock:
                self._in_flight.add(subject)
            if executor is None:
                done = self._chain(subject, rows, connector, probe)
                report.merge(done)
                with self._lock:
                    self.totals.merge(done)
            else:
                fut = executor.submit(self._chain, subject, rows, connector, probe)
                fut.add_done_callback(self._chain_done)
                futures.append(fut)
        if wait:
            for fut in futures:
                report.merge(fut.result())
        return report

    def _chain_done(self, fut: Future[DispatchReport]) -> None:
        exc = fut.exception()
        if exc is not None:
            log.error("delivery chain failed", exc_info=exc)
            return
        with self._lock:
            self.totals.merge(fut.result())

    def _chain(self, subject: tuple[str, str], rows: list[Any], connector: EdcConnector,
               probe: bool = False) -> DispatchReport:
        """One subject's rows, in sequence; stops at the first row that does not get through. A `probe`
        chain may send while its connector is stopped for its credentials (see `_auth_gate`)."""
        report = DispatchReport()
        try:
            for i, e in enumerate(rows):
                if (self._halt.is_set() or self._circuit_open(e.study_oid, self.clock.now())
                        or (not probe and self._auth_stopped(connector))):
                    outcome = _DEFERRED
                else:
                    outcome = self._deliver(e, connector, report, probe=probe)
                if outcome != _DELIVERED:
                    held = len(rows) - i - (0 if outcome in (_DEFERRED, _AUTH) else 1)
                    report.deferred += held
                    report.blocked_subjects.add(subject)
                    break
        finally:
            recorder = self._recorder
            with self._lock:
                if recorder is None:
                    self._in_flight.discard(subject)
                stop = self._auth.get(id(connector))
                if probe and stop is not None:
                    stop.probing = False  # the probe is over (the stop was renewed, or nothing was sent)
            if recorder is not None:
                recorder.put(subject)  # a pass may take the subject once its acks are recorded
        return report

    # ------------------------------------------------------------------------------------ one row

    def _deliver(self, e: Any, connector: EdcConnector, report: DispatchReport, *, probe: bool = False) -> str:
        study, subject = e.study_oid, e.subject_key
        name = self._name(study, connector)
        mdv = self.metadata_versions.get(study) or self.metadata_versions.get(ANY_STUDY, "")
        tx = SubjectTransaction(study, mdv, subject, e.site_oid, None, [], e.sequence)
        attempts = 0
        last: _Retryable | None = None
        odm: bytes = e.odm
        previous = getattr(e, "previous_values", None) or {}
        check = bool(previous) and self.check_conflicts and self._can_read_back(study, connector)

        def attempt() -> DeliveryReceipt:
            nonlocal attempts, last, odm
            if last is not None and self._halt.is_set():
                raise last  # stopping: the backoff was cut short, do not send again
            attempts += 1
            try:
                if check:
                    odm = self._withhold_conflicts(e, odm, previous, connector, name, report)
                receipt = connector.send(tx, odm)
                if not receipt.accepted and not receipt.permanent:
                    raise TransientDeliveryError(f"not accepted: {receipt.code}: {receipt.message}", code=receipt.code)
            except EdcAuthenticationError:
                raise  # not retried: the whole endpoint stops (below)
            except Exception as exc:  # transient by the port's contract: retried
                self._count(name, "transient")
                error = _describe(exc)
                log.info("delivery attempt failed", extra={"study": study, "subject_key": subject,
                                                            "outbox_id": e.id, "sequence": e.sequence,
                                                            "attempt": attempts, "reason": error[:200],
                                                            "connector": name})
                self._acks_first()
                with self.uow_factory() as uow:
                    uow.set_outbox_status(e.id, "failed", error=error, attempted=True)
                    uow.commit()
                last = _Retryable(exc, getattr(exc, "retry_after", None))
                raise last from exc
            return receipt

        def before_sleep(_state: RetryCallState) -> None:
            report.retries += 1

        retrying = Retrying(
            stop=stop_any(stop_after_attempt(self.max_attempts), self._stop_retrying(study, connector, probe)),
            wait=self._wait,
            retry=retry_if_exception_type(_Retryable),
            sleep=self._sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            receipt = retrying(attempt)
        except _Retryable as exhausted:
            return self._gave_up(e, name, exhausted, attempts, report)
        except EdcAuthenticationError as refused:
            return self._auth_refused(e, connector, name, refused, report)
        self._auth_ok(connector, name)  # the EDC took the credentials (accepted, or rejected the data)

        now = self.clock.now()
        if receipt.accepted:
            duplicate = _is_duplicate(receipt)
            ack = _Ack(e, name, attempts, duplicate, receipt.reference, now)
            recorder = self._recorder
            if recorder is not None:
                recorder.put(ack)
            else:
                self._record_acks([ack])
            self._count(name, "duplicate" if duplicate else "accepted")
            if self.metrics is not None:
                self.metrics.delivery_latency.labels(name).observe(max(0.0, (now - _aware(e.created_at)).total_seconds()))
            report.sent += 1
            report.duplicates += duplicate
            if receipt.reference:
                report.references.append(receipt.reference)
            self._healthy(study, subject)
            log.debug("delivered", extra={"study": study, "subject_key": subject, "outbox_id": e.id,
                                          "sequence": e.sequence, "attempt": attempts, "connector": name,
                                          "status": "duplicate" if duplicate else "accepted"})
            return _DELIVERED

        # permanent rejection: the row, and a discrepancy for a data manager, in one unit of work
        code = receipt.code or "rejected"
        message = receipt.message or "(no message)"
        self._acks_first()
        with self.uow_factory() as uow:
            uow.set_outbox_status(e.id, "rejected", error=f"{code}: {message}", attempted=True)
            self._record_rejection(uow, e, name, code, message)
            self._audit(uow, AuditAction.TRANSFER_REJECTED, e, name, reason=f"{code}: {message}", code=code,
                        message=message, attempts=attempts)
            uow.commit()
        self._count(name, "rejected")
        report.rejected += 1
        self._healthy(study, subject)  # the EDC answered: it is up
        log.warning("EDC rejected a transaction: subject blocked until a data manager acts",
                    extra={"study": study, "subject_key": subject, "outbox_id": e.id, "sequence": e.sequence,
                           "reason": code, "connector": name})
        return _REJECTED

    def _withhold_conflicts(self, e: Any, odm: bytes, previous: dict[str, str], connector: EdcConnector, name: str,
                            report: DispatchReport) -> bytes:
        """Read the subject back and withhold the Updated items site staff changed in the EDC (see
        esource/services/conflicts.py). Returns the ODM to send (the row's, or a reduced one, which
        then replaces the row's ODM in the outbox with the discrepancies and frozen states)."""
        study, subject = e.study_oid, e.subject_key
        snapshot = connector.read_back(study, subject)  # raises: a transient failure of this attempt
        if snapshot is None:
            return odm  # the EDC does not know the subject: nothing to compare
        found = conflicts.find_conflicts(odm, subject, previous, conflicts.edc_values(snapshot, subject))
        if not found:
            return odm
        reduced, remaining = conflicts.strip_items(odm, subject, (c.path for c in found))
        withheld = ", ".join(c.path for c in found)
        self._acks_first()
        with self.uow_factory() as uow:
            states = uow.sent_items(study, subject)
            for c in found:
                key = ItemKey(study, subject, *c.key)
                state = states.get(key)
                conflicts.record_conflict(uow, conflicts.conflict_discrepancy(
                    c, study, subject, state, connector=name, outbox_id=e.id, sequence=e.sequence))
                conflicts.freeze(uow, key, state)
            uow.replace_outbox_odm(e.id, reduced, item_count=remaining,
                                   note=f"conflict: withheld {withheld} (changed in the EDC by site staff; "
                                        "see the EDC_CONFLICT discrepancies)")
            uow.commit()
        report.conflicts += len(found)
        self._count(name, "conflict")
        log.warning("EDC values changed by site staff: items withheld, discrepancies opened",
                    extra={"study": study, "subject_key": subject, "outbox_id": e.id, "sequence": e.sequence,
                           "count": len(found), "connector": name})
        return reduced

    def _can_read_back(self, study: str, connector: EdcConnector) -> bool:
        known = self._read_back.get(study)
        if known is None:
            try:
                known = bool(connector.capabilities().read_back)
            except Exception:
                known = False
            self._read_back[study] = known
        return known

    def _audit(self, uow: Any, action: AuditAction, e: Any, name: str, *, reason: str | None = None,
               at: dt.datetime | None = None, **detail: Any) -> None:
        """A transfer audit entry, in the unit of work that records the row's new status."""
        uow.audit(AuditEvent(action, study_oid=e.study_oid, subject_key=e.subject_key, site_oid=e.site_oid,
                             reason=reason, at=at or self.clock.now(),
                             detail={"outbox_id": e.id, "sequence": e.sequence, "connector": name, **detail}))

    def _record_acks(self, acks: list[_Ack]) -> None:
        """Rows the EDC accepted: status and audit entries (stamped when the EDC answered), one
        transaction for all of them."""
        with self.uow_factory() as uow:
            for status in ("acked", "sent"):
                uow.set_outbox_statuses([a.entry.id for a in acks if bool(a.reference) is (status == "acked")], status,
                                        attempted=True)
            for a in acks:
                e, name = a.entry, a.connector
                self._audit(uow, AuditAction.TRANSFER_SENT, e, name, at=a.at, attempts=a.attempts,
                            duplicate=a.duplicate)
                if a.reference:
                    self._audit(uow, AuditAction.TRANSFER_ACKNOWLEDGED, e, name, at=a.at, edc_reference=a.reference,
                                duplicate=a.duplicate)
            uow.commit()

    def _acks_first(self) -> None:
        """Before any other write of a chain: the acks handed to the recorder are recorded (trail order)."""
        recorder = self._recorder
        if recorder is not None:
            recorder.flush()

    def _released(self, subjects: list[tuple[str, str]]) -> None:
        with self._lock:
            self._in_flight.difference_update(subjects)
        self._wake.set()  # their later rows may go now

    def _record_rejection(self, uow: Any, e: Any, name: str, code: str, message: str) -> None:
        d = Discrepancy(
            kind=DiscrepancyKind.EDC_REJECTED,
            severity=Severity.ERROR,
            study_oid=e.study_oid,
            subject_key=e.subject_key,
            message=(f"The EDC ({name}) rejected transaction {e.study_oid}/{e.subject_key}/{e.sequence} "
                     f"(outbox #{e.id}, {e.item_count} item(s)) with code {code}: {message}. The subject's later "
                     "transactions are held until a data manager acts."),
            candidates=({"outbox_id": e.id, "sequence": e.sequence, "connector": name, "code": code,
                         "edc_message": message},),
            rule=f"edc:{name}",
        )
        if not uow.upsert_discrepancy(d):
            # one EDC_REJECTED discrepancy per subject: a new rejection re-opens a closed one
            status_of = getattr(uow, "discrepancy_status", None)
            set_status = getattr(uow, "set_discrepancy_status", None)
            if status_of and set_status and status_of(d.key) not in ("open", "in_review", None):
                set_status(d.key, "open")

    def _gave_up(self, e: Any, name: str, last: _Retryable, attempts: int, report: DispatchReport) -> str:
        study, subject = e.study_oid, e.subject_key
        self._acks_first()
        with self.uow_factory() as uow:  # the row is already 'failed' (each attempt set it): audit it with it
            uow.set_outbox_status(e.id, "failed")
            self._audit(uow, AuditAction.TRANSFER_FAILED, e, name, reason=_describe(last.cause)[:500],
                        attempts=attempts)
            uow.commit()
        now = self.clock.now()
        report.failed += 1
        self._count(name, "gave_up")
        with self._lock:
            self._not_before[(study, subject)] = now + dt.timedelta(seconds=self.max_delay)
            circuit = self._circuits.setdefault(study, _Circuit())
            if last.retry_after is not None and last.retry_after > self.max_delay:
                until = now + dt.timedelta(seconds=last.retry_after)
                circuit.open_until = max(circuit.open_until or until, until)
            elif not self._halt.is_set():
                circuit.failures += 1
                if circuit.failures >= self.breaker_threshold:
                    circuit.open_until = now + dt.timedelta(seconds=self.breaker_cooldown)
            opened = circuit.open_until is not None and now < circuit.open_until
        if opened and self.metrics is not None:
            self.metrics.circuit_open.labels(name).set(1)
        log.warning("delivery failed; the row stays 'failed' and is retried later",
                    extra={"study": study, "subject_key": subject, "outbox_id": e.id, "sequence": e.sequence,
                           "attempt": attempts, "reason": _describe(last.cause)[:200], "connector": name})
        return _FAILED

    # ------------------------------------------------------------------------------------ policy

    def _wait(self, state: RetryCallState) -> float:
        """Exponential backoff with jitter, but never shorter than the EDC's Retry-After."""
        delay = min(float(self._backoff(state)), self.max_delay)
        exc = state.outcome.exception() if state.outcome is not None else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            delay = max(delay, float(retry_after))
        return delay

    def _stop_retrying(self, study: str, connector: EdcConnector, probe: bool) -> Callable[[RetryCallState], bool]:
        def stop(state: RetryCallState) -> bool:
            if self._halt.is_set() or (not probe and self._auth_stopped(connector)):
                return True  # stopping, or another chain met a refusal of the credentials
            exc = state.outcome.exception() if state.outcome is not None else None
            retry_after = getattr(exc, "retry_after", None)
            if retry_after is not None and retry_after > self.max_delay:
                return True  # not slept through: the connector pauses instead
            return self._circuit_open(study, self.clock.now())

        return stop

    def _held_by_rejections(self, uow: Any, rejected: list[Any]) -> set[tuple[str, str]]:
        """Subjects held behind a rejected row: those whose EDC_REJECTED discrepancy is still open, in
        review, or unknown (see the module docstring: closing it without re-queueing lets them go)."""
        status_of = getattr(uow, "discrepancy_status", None)
        held: set[tuple[str, str]] = set()
        for subject in {(e.study_oid, e.subject_key) for e in rejected}:
            if status_of is not None:
                key = Discrepancy(kind=DiscrepancyKind.EDC_REJECTED, message="", study_oid=subject[0],
                                  subject_key=subject[1]).key
                if status_of(key) in ("resolved", "dismissed"):
                    continue
            held.add(subject)
        return held

    def _auth_gate(self, connector: EdcConnector, now: dt.datetime) -> bool | None:
        """False: the connector is not stopped; True: stopped, but this chain is the one probe allowed
        once the re-check time has come; None: stopped, nothing goes."""
        with self._lock:
            stop = self._auth.get(id(connector))
            if stop is None:
                return False
            if stop.until is None or now < stop.until or stop.probing:
                return None
            stop.probing = True
            return True

    def _auth_stopped(self, connector: EdcConnector) -> bool:
        with self._lock:
            return id(connector) in self._auth

    def _auth_refused(self, e: Any, connector: EdcConnector, name: str, refused: EdcAuthenticationError,
                      report: DispatchReport) -> str:
        """The EDC refused the credentials: the row stays pending, the connector stops (see the docstring)."""
        now = self.clock.now()
        until = now + dt.timedelta(seconds=self.auth_recheck) if self.auth_recheck else None
        reason = _describe(refused)[:500]
        self._acks_first()
        with self.uow_factory() as uow:
            uow.set_outbox_status(e.id, "pending", attempted=True,
                                  error=f"EDC refused esource's credentials ({reason}); delivery to {name} stopped "
                                        + (f"until {until.isoformat()}" if until else "until esource restarts"))
            uow.commit()
        with self._lock:
            first = id(connector) not in self._auth
            self._auth[id(connector)] = _AuthStop(name, now if first else self._auth[id(connector)].since, until,
                                                   reason)
        report.auth_failed += 1
        self._count(name, "auth_failed")
        if self.metrics is not None:
            self.metrics.circuit_open.labels(name).set(1)
        log.error("EDC refused esource's credentials: delivery to the endpoint stopped, every transaction kept "
                  "pending", extra={"connector": name, "study": e.study_oid, "outbox_id": e.id,
                                    "status": getattr(refused, "status", None), "reason": reason})
        return _AUTH

    def _auth_ok(self, connector: EdcConnector, name: str) -> None:
        with self._lock:
            stop = self._auth.pop(id(connector), None)
        if stop is not None:
            if self.metrics is not None:
                self.metrics.circuit_open.labels(name).set(0)
            log.warning("EDC accepted esource's credentials again: delivery resumed", extra={"connector": name})

    def _circuit_open(self, study: str, now: dt.datetime) -> bool:
        with self._lock:
            c = self._circuits.get(study)
            return c is not None and c.open_until is not None and now < c.open_until

    def _healthy(self, study: str, subject: str) -> None:
        with self._lock:
            self._not_before.pop((study, subject), None)
            c = self._circuits.get(study)
            was_open = c is not None and c.open_until is not None
            if c is not None:
                c.failures = 0
                c.open_until = None
        if was_open and self.metrics is not None:
            self.metrics.circuit_open.labels(self._names.get(study, study)).set(0)

    # ------------------------------------------------------------------------------------ helpers

    def _connector(self, study: str) -> EdcConnector | None:
        return self.connectors.get(study) or self.connectors.get(ANY_STUDY)

    def _name(self, study: str, connector: EdcConnector) -> str:
        name = self._names.get(study)
        if name is None:
            try:
                name = connector.capabilities().name
            except Exception:
                name = type(connector).__name__
            self._names[study] = name
        return name

    def _count(self, connector: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.deliveries.labels(connector, outcome).inc()

    def _set_depth(self, entries: list[Any], rejected: list[Any], limit: int) -> None:
        """Depth from what a pass read (exact while the backlog is under the batch size)."""
        if self.metrics is None:
            return
        pending = sum(1 for e in entries if e.status == "pending")
        self.metrics.outbox_depth.labels("pending").set(pending)
        self.metrics.outbox_depth.labels("failed").set(len(entries) - pending)
        self.metrics.outbox_depth.labels("rejected").set(len(rejected))

    def _refresh_depth(self) -> None:
        if self.metrics is None:
            return
        with self._reader() as uow:
            counts = getattr(uow, "outbox_counts", None)
            if counts is not None:
                by_status = counts()
                for status in ("pending", "failed", "rejected"):
                    self.metrics.outbox_depth.labels(status).set(by_status.get(status, 0))
                return
            entries = uow.outbox_entries(statuses=("pending", "failed"), limit=self.batch_size)
            rejected = uow.outbox_entries(statuses=("rejected",))
        self._set_depth(entries, rejected, self.batch_size)


@dataclass(frozen=True, slots=True)
class _Ack:
    """A row the EDC accepted, waiting to be recorded."""

    entry: Any
    connector: str
    attempts: int
    duplicate: bool
    reference: str | None
    at: dt.datetime


class _AckRecorder:
    """run_forever's recorder of acknowledgements (see the module docstring): a thread that writes
    whatever acks are waiting in one transaction, then releases the subjects whose chains ended
    before them. A failing store is retried with a growing pause; nothing acked is dropped while
    the dispatcher runs (at stop, what cannot be recorded is re-sent after restart as a duplicate)."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher
        self._cond = threading.Condition()
        self._queue: list[_Ack | tuple[str, str]] = []  # acks, and subjects to release after the acks before them
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="esource-dispatch-acks", daemon=True)
        self._thread.start()

    def put(self, item: _Ack | tuple[str, str]) -> None:
        """An ack to record, or a subject whose chain ended: released once the acks before it are recorded."""
        with self._cond:
            self._queue.append(item)
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything handed over so far is recorded (False: `timeout` passed first)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue, timeout)

    def close(self, timeout: float) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        pause = 0.05
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closing)
                if not self._queue:
                    return
                batch = list(self._queue)  # stays queued (flush waits) until recorded
                closing = self._closing
            acks = [a for a in batch if isinstance(a, _Ack)]
            try:
                if acks:
                    self._dispatcher._record_acks(acks)
                pause = 0.05
            except Exception:
                log.exception("recording delivered transactions failed; retrying", extra={"count": len(acks)})
                if not closing:
                    self._dispatcher._halt.wait(pause)
                    pause = min(pause * 2, 5.0)
                    if not self._dispatcher._halt.is_set():
                        continue
                # stopping with the store unavailable: the rows stay pending and are re-sent after
                # restart, the EDC answering with its original receipt
            with self._cond:
                del self._queue[:len(batch)]
                self._cond.notify_all()
            self._dispatcher._released([s for s in batch if not isinstance(s, _Ack)])


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, TransientDeliveryError) else f"{type(exc).__name__}: {text}"


def _is_duplicate(receipt: DeliveryReceipt) -> bool:
    return receipt.code == "duplicate"


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.timezone.utc)


def drain_outbox(uow_factory: Callable[..., Any], connector: EdcConnector, metadata_version_oid: str,
                 *, limit: int = 1000, max_attempts: int = 1, **options: Any) -> DispatchReport:
    """One pass with one connector for every study (the original helper; one attempt per row by
    default, so a failing EDC does not make it wait)."""
    dispatcher = Dispatcher(uow_factory, {ANY_STUDY: connector}, {ANY_STUDY: metadata_version_oid},
                            max_attempts=max_attempts, workers=options.pop("workers", 1), **options)
    return dispatcher.drain(limit=limit)
