"""Kafka intake in worker processes (`kafka.workers` > 1, PostgreSQL only): N members of the consumer
group, each a process of its own, so intake uses more than the one core a Python process gets.

Why processes: mapping, ODM writing and audit chaining are Python code; in one process they share
one interpreter lock, whatever the number of threads. Kafka already splits the work: a topic's
partitions are shared out among the group's members, and messages are keyed by patient, so a
subject's messages stay in one partition, i.e. with one worker, in order. PostgreSQL lets the
workers' units of work run side by side (races are settled by unique constraints, as between the
HTTP and Kafka intakes of one process). SQLite has one writer: workers there would only queue
behind each other, so settings refuse `kafka.workers` > 1 with SQLite.

Roles: the service process (`esource serve`) keeps the HTTP API, the dispatcher and /metrics; the
workers (`python -m esource.services.kafka_workers`) only consume. Each worker is a `KafkaIntake`
with the exactly-once rules of esource.adapters.kafka (offsets committed after the store, the
store de-duplicating by intake key and content), so a worker's crash, a restart or a rebalance
loses and duplicates nothing.

The pipe protocol (one JSON object per line):
- service -> worker, on stdin: `{"index": k, "settings": {...}}` (secrets included: a pipe, never a
  file or the command line), then nothing; end of file means the service is gone, and the worker
  stops (it also stops on SIGTERM). So a `kill -9` of the service does not leave consumers behind.
- worker -> service, on its stdout: `{"outbox": true}` after a commit that queued ODM transactions
  (the dispatcher's wake), and every `TICK_S` `{"ready": bool, "counters": [[metric, labels, delta],
  ...], "lag": [[topic, partition, lag], ...]}`: the counters the intake moved since the last tick
  and its consumer lag, added into the service's own metrics, so /metrics and /ready answer for all.
A worker that dies is started again once the broker can have noticed (the session timeout + 1 s,
doubling up to 30 s while it keeps dying: a member that joins while a dead one is still in the group
only causes a second rebalance); /ready says not ready meanwhile.

Workers leave the group one after the other: worker k stops `k * stagger` seconds after it was told
to (stagger = the session timeout + 1 s), and only while it is a settled member (not inside a
rebalance). Why: when every member of a group leaves inside one rebalance, the test broker (tansu
0.6) keeps the group waiting for that rebalance for good, and members that join later never get a
partition (measured with plain kafka-python consumers: two members leaving together, then any new
member: no assignment). Apache Kafka does not need it; it only makes a stop take a little longer.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from pydantic import SecretStr

if TYPE_CHECKING:
    from esource.bootstrap import Container
    from esource.observability import Metrics
    from esource.settings import KafkaSettings, Settings

log = logging.getLogger("esource.kafka")

#: How often a worker reports its counters, lag and readiness.
TICK_S = 0.5
#: Metrics a worker's intake moves (attribute names of `esource.observability.Metrics`).
FORWARDED_COUNTERS = ("messages", "resources", "items_mapped", "discrepancies", "dead_letters",
                      "dropped_not_enrolled")
RESTART_MIN_S, RESTART_MAX_S = 1.0, 30.0


def leave_stagger(kafka: KafkaSettings) -> float:
    """Seconds between two workers' leaving the group (and before a dead worker's restart): the
    session timeout + 1 s, time for the broker to settle the group without the one that left."""
    return kafka.session_timeout_ms / 1000.0 + 1.0


def settings_payload(settings: Settings) -> dict[str, Any]:
    """The settings as a worker rebuilds them (secrets revealed: they travel through a pipe). The
    enrollment file is left out: the service loaded it before starting workers."""

    def plain(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        return value

    # what was set only (a study's EDC entry overrides the default key by key: a full dump would set
    # every key of it, None over the default's url for instance)
    data = plain(settings.model_dump(by_alias=True, exclude_unset=True))
    data["enrollment_file"] = None
    return data


# ---------------------------------------------------------------------------------- service side

@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen | None = None
    ready: bool = False
    reported_at: float = 0.0
    lag: dict[tuple[str, str], float] = field(default_factory=dict)
    restarts: int = 0
    next_start: float = 0.0


class KafkaWorkerPool:
    """The service's side: starts `count` worker processes, restarts those that die, adds what they
    report into the service's metrics and wakes its dispatcher. Stands where a `KafkaIntake` stands
    in the service (`start`, `stop`, `ready`)."""

    def __init__(self, container: Container, count: int, *, command: list[str] | None = None) -> None:
        if count < 1:
            raise ValueError("a worker pool needs at least one worker")
        self.container = container
        self.metrics: Metrics = container.metrics
        self.count = count
        self.command = command or [sys.executable, "-m", "esource.services.kafka_workers"]
        self.on_outbox: Callable[[], Any] | None = getattr(container.dispatcher, "wake", None)
        self._settings = settings_payload(container.settings)
        self.stagger = leave_stagger(container.settings.kafka)
        self._workers = [_Worker(i) for i in range(count)]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._lag_labels: set[tuple[str, str]] = set()
        self._ready_window = max(container.settings.kafka.session_timeout_ms,
                                 10 * container.settings.kafka.poll_timeout_ms) / 1000.0 + 4 * TICK_S

    # -- lifecycle

    def start(self) -> None:
        if self._monitor is not None:
            raise RuntimeError("the worker pool is already started")
        for w in self._workers:
            self._spawn(w)
        self._monitor = threading.Thread(target=self._watch, name="esource-kafka-workers", daemon=True)
        self._monitor.start()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to every worker (each finishes or cuts its batch and commits what is done, one after
        the other: see the module docstring), then wait; a worker still running after `timeout` plus
        its turn is killed (the store de-duplicates its replay)."""
        self._stop.set()
        procs = [w.proc for w in self._workers if w.proc is not None]
        for p in procs:
            _terminate(p)
        deadline = time.monotonic() + timeout + 5 * self.stagger * (self.count - 1)
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("kafka worker did not stop in time: killed", extra={"count": p.pid})
                p.kill()
                p.wait(5)
        if self._monitor is not None:
            self._monitor.join(timeout)

    def ready(self) -> bool:
        """Every worker alive and, in its last report (recent), a member of the group that polled."""
        now = time.monotonic()
        with self._lock:
            return all(w.proc is not None and w.proc.poll() is None and w.ready
                       and now - w.reported_at <= self._ready_window for w in self._workers)

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers if w.proc is not None and w.proc.poll() is None]

    # -- workers

    def _spawn(self, w: _Worker) -> None:
        proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None)
        assert proc.stdin is not None
        try:
            proc.stdin.write((json.dumps({"index": w.index, "settings": self._settings}) + "\n").encode())
            proc.stdin.flush()
        except OSError:  # died at once: the monitor sees it
            pass
        with self._lock:
            w.proc, w.ready, w.reported_at = proc, False, time.monotonic()
        threading.Thread(target=self._read, args=(w, proc), name=f"esource-kafka-worker-{w.index}",
                         daemon=True).start()
        log.info("kafka worker started", extra={"count": w.index, "status": "started"})

    def _watch(self) -> None:
        while not self._stop.wait(TICK_S):
            for w in self._workers:
                if self._stop.is_set():
                    return
                p = w.proc
                if p is None or p.poll() is None:
                    continue
                now = time.monotonic()
                if w.next_start == 0.0:
                    w.restarts += 1
                    base = max(RESTART_MIN_S, self.stagger)
                    delay = min(max(RESTART_MAX_S, base), base * 2 ** (w.restarts - 1))
                    w.next_start = now + delay
                    log.error("kafka worker exited; starting it again",
                              extra={"count": w.index, "status": p.returncode, "duration_ms": int(delay * 1000)})
                    with self._lock:
                        w.ready = False
                        w.lag.clear()
                    self._publish_lag()
                elif now >= w.next_start and not self._stop.is_set():
                    w.next_start = 0.0
                    self._spawn(w)

    def _read(self, w: _Worker, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue  # not ours (a library printing): ignored
            if isinstance(msg, dict):
                self._apply(w, msg)

    def _apply(self, w: _Worker, msg: dict[str, Any]) -> None:
        if msg.get("outbox") and self.on_outbox is not None:
            self.on_outbox()
        if "counters" in msg:
            apply_counters(self.metrics, msg["counters"])
        if "lag" in msg:
            lag = parse_lag(msg["lag"])
            with self._lock:
                w.lag = lag
            self._publish_lag()
        if "ready" in msg:
            with self._lock:
                w.ready, w.reported_at = bool(msg["ready"]), time.monotonic()
            if msg.get("ready") and w.restarts:
                w.restarts = 0  # a worker that got going again starts its backoff afresh

    def _publish_lag(self) -> None:
        """The lag gauge is the workers' (a partition belongs to one of them at a time)."""
        gauge = self.metrics.consumer_lag
        with self._lock:
            merged: dict[tuple[str, str], float] = {}
            for w in self._workers:
                merged.update(w.lag)
            for labels in self._lag_labels - set(merged):
                try:
                    gauge.remove(*labels)
                except KeyError:
                    pass
            for labels, value in merged.items():
                gauge.labels(*labels).set(value)
            self._lag_labels = set(merged)


def apply_counters(metrics: Metrics, counters: list[Any]) -> None:
    """Add a worker's counter deltas into the service's metrics (unknown names are ignored)."""
    for entry in counters:
        try:
            name, labels, delta = entry
        except (TypeError, ValueError):
            continue
        if name not in FORWARDED_COUNTERS or not isinstance(labels, dict) or not delta or delta < 0:
            continue
        metric = getattr(metrics, name)
        (metric.labels(**labels) if labels else metric).inc(delta)


def parse_lag(entries: Any) -> dict[tuple[str, str], float]:
    """A worker's lag report as {(topic, partition): lag}; malformed entries are skipped, as in
    `apply_counters`."""
    out: dict[tuple[str, str], float] = {}
    for entry in entries if isinstance(entries, list) else []:
        try:
            topic, partition, value = entry
            out[(str(topic), str(partition))] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def _terminate(proc: subprocess.Popen) -> None:
    try:
        if proc.stdin is not None:
            proc.stdin.close()
    except OSError:
        pass
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------------------------- worker side

class CounterDeltas:
    """What a worker's counters moved since the previous call."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def __call__(self) -> list[list[Any]]:
        out: list[list[Any]] = []
        for name in FORWARDED_COUNTERS:
            for family in getattr(self.metrics, name).collect():
                for sample in family.samples:
                    if not sample.name.endswith("_total"):
                        continue
                    key = (name, tuple(sorted(sample.labels.items())))
                    delta = sample.value - self._last.get(key, 0.0)
                    if delta > 0:
                        self._last[key] = sample.value
                        out.append([name, dict(sample.labels), delta])
        return out


def lag_samples(metrics: Metrics) -> list[list[Any]]:
    return [[s.labels["topic"], s.labels["partition"], s.value]
            for family in metrics.consumer_lag.collect() for s in family.samples]


def worker_main() -> int:
    """A worker process: settings from stdin, a KafkaIntake until SIGTERM or the end of stdin."""
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # whatever else writes to stdout goes to the log stream, not into the protocol
    sys.stdout = sys.stderr
    line = sys.stdin.buffer.readline()
    if not line:
        return 0
    from esource.bootstrap import build
    from esource.observability import configure_logging
    from esource.runtime import settle_heap
    from esource.settings import Settings

    first = json.loads(line)
    index, settings = int(first.get("index", 0)), Settings(**first["settings"])
    configure_logging(settings.log.level, json_logs=settings.log.json_logs)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def parent_gone() -> None:
        sys.stdin.buffer.read()  # returns at end of file: the service closed the pipe or died
        stop.set()

    threading.Thread(target=parent_gone, name="esource-worker-parent", daemon=True).start()
    write_lock = threading.Lock()

    def send(msg: dict[str, Any]) -> None:
        with write_lock:
            try:
                out.write(json.dumps(msg) + "\n")
            except (OSError, ValueError):  # the service is gone
                stop.set()

    container = build(settings, connectors={})  # delivery is the service's: no connector here
    container.ingest.on_outbox = lambda: send({"outbox": True})
    settle_heap()
    from esource.adapters.kafka import KafkaIntake

    intake = KafkaIntake(container, settings.kafka)
    deltas = CounterDeltas(container.metrics)
    intake.start()

    def tick() -> None:
        send({"ready": intake.ready(), "counters": deltas(), "lag": lag_samples(container.metrics)})

    try:
        while not stop.wait(TICK_S):
            tick()
        # one after the other (module docstring): worker k leaves k staggers later, as a settled member
        stagger = leave_stagger(settings.kafka)
        turn = time.monotonic() + index * stagger
        give_up = turn + 4 * stagger
        while index and time.monotonic() < give_up and (time.monotonic() < turn or not intake.ready()):
            time.sleep(TICK_S)
            tick()
    finally:
        intake.stop(max(5.0, settings.kafka.session_timeout_ms / 1000.0))
        send({"ready": False, "counters": deltas(), "lag": []})
        container.close()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
