"""Crash test: a stream of FHIR events through Kafka into `esource serve` (a subprocess, delivering to
the sandbox EDC in its own subprocess), killed with SIGKILL at random points and restarted. When the
topic is drained and the outbox is empty, the sandbox EDC must hold exactly the values the engine
computes from all the events of each subject: no transaction missing, none applied twice, no change
sent twice.

On SQLite the service consumes in its own process; on PostgreSQL (ESOURCE_TEST_POSTGRES_DSN) it runs
two Kafka worker processes (kafka.workers: 2) and every other kill hits one of the workers instead of
the service (the service starts it again; a killed service takes its workers with it).

Size (defaults keep CI under ~3 minutes on 2 cores):
    ESOURCE_CRASH_EVENTS    events to stream (default 1500)
    ESOURCE_CRASH_KILLS     kill -9 / restart cycles (default 3)
    ESOURCE_CRASH_SUBJECTS  enrolled subjects the events spread over (default 30; the service re-maps all
                            of a subject's facts on every event, so events per subject drive the cost)
    ESOURCE_CRASH_SEED      random seed for events and kill points (default: random, printed on failure)

Full size (measured: 5 minutes on 2 cores, 4,834 transactions, 53,800 items, 40 re-sends recognised):
    ESOURCE_CRASH_EVENTS=5000 ESOURCE_CRASH_SUBJECTS=100 ESOURCE_CRASH_KILLS=10 \\
        .venv/bin/python -m pytest tests/kafka/test_kafka_crash.py -q -s
Keep events per subject around 50: the cost of an event grows with the facts its subject already has.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kafka import TopicPartition
from kafka_helpers import (
    MRN,
    free_port,
    group_offsets,
    mrn,
    stop_process,
    subject_enrollment,
    unique,
    vital_sign_events,
    wait_for_port,
)

from esource.intake.parse import parse_fhir
from esource.mapping.engine import MappingContext, MappingEngine
from esource.study.study import load_study

EVENTS = int(os.environ.get("ESOURCE_CRASH_EVENTS", "1500"))
KILLS = int(os.environ.get("ESOURCE_CRASH_KILLS", "3"))
SUBJECTS = max(5, int(os.environ.get("ESOURCE_CRASH_SUBJECTS", "30")))
SEED = int(os.environ.get("ESOURCE_CRASH_SEED", str(random.SystemRandom().randrange(1 << 30))))
PARTITIONS = 3
DRAIN_TIMEOUT = 120 + EVENTS * 0.12


def _esource_command() -> list[str]:
    script = Path(sys.executable).with_name("esource")
    return [str(script)] if script.exists() else [sys.executable, "-m", "esource.cli"]


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESOURCE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Service:
    """`esource serve --config FILE` as a subprocess that can be killed and restarted."""

    def __init__(self, config: Path, logs: Path, http_port: int) -> None:
        self.config, self.logs, self.http_port = config, logs, http_port
        self.proc: subprocess.Popen | None = None
        self.runs = 0

    def start(self) -> None:
        self.runs += 1
        log = open(self.logs / f"serve-{self.runs}.log", "wb")
        self.proc = subprocess.Popen([*_esource_command(), "serve", "--config", str(self.config)],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=_clean_env(), cwd=self.logs)
        log.close()

    def kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL: no shutdown hook, no final commit
        self.proc.wait(10)

    def assert_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"esource serve exited with {self.proc.returncode}:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 15)

    def tail(self, lines: int = 40) -> str:
        out = []
        for path in sorted(self.logs.glob("serve-*.log")):
            text = [line for line in path.read_text(errors="replace").splitlines()
                    if '"msg": "processed"' not in line][-lines:]  # INFO logs: one line per message
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)


class StoreReader:
    """Reads the service's store from outside (SQLite: read-only; nothing before the service made it)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine: Any = None

    def query(self, sql: str, **params: Any) -> list[tuple]:
        import sqlalchemy as sa

        if self._engine is None:
            if self.url.startswith("sqlite:///"):
                path = Path(self.url.removeprefix("sqlite:///"))
                if not path.exists():
                    return []
                self._engine = sa.create_engine(f"sqlite:///file:{path}?mode=ro&uri=true",
                                                connect_args={"timeout": 10})
            else:
                self._engine = sa.create_engine(self.url, pool_pre_ping=True)
        try:
            with self._engine.connect() as conn:
                return [tuple(r) for r in conn.execute(sa.text(sql), params)]
        except sa.exc.DBAPIError:
            return []  # not migrated yet

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


def _workers_of(pid: int) -> list[int]:
    """The Kafka worker processes of the service `pid` (the child processes of any of its threads)."""
    out: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(p) for p in children.read_text().split()]
        except OSError:
            pass
    return out


def expected_items(events: list[tuple[int, bytes]]) -> dict[str, dict[tuple, str]]:
    """What the EDC must finally hold: the engine run once over all the events of each subject (the
    newest version of each source record), as the service does on every message."""
    study = load_study("CV01")
    engine = MappingEngine(study)
    by_subject: dict[int, dict[str, Any]] = defaultdict(dict)
    for i, (n, data) in enumerate(events):
        for res in parse_fhir(data, f"event {i}").resources:
            by_subject[n].pop(res.ref.identity, None)
            by_subject[n][res.ref.identity] = res
    out: dict[str, dict[tuple, str]] = {}
    today = dt.datetime.now(dt.timezone.utc).date()
    for n, resources in by_subject.items():
        enrollment = subject_enrollment(n)
        result = engine.map_subject(enrollment, list(resources.values()), MappingContext(today=today))
        out[enrollment.subject_key] = {
            (k.study_event_oid, k.study_event_repeat_key, k.form_oid, k.item_group_oid, k.item_group_repeat_key,
             k.item_oid): iv.value
            for iv in result.items for k in [iv.key]}
    return out


def test_kill_dash_nine_while_streaming_loses_nothing_and_sends_nothing_twice(kafka_broker, topics, tmp_path,
                                                                              producer_factory, store_url):
    workers = 2 if store_url.startswith("postgresql") else 1
    context = f"seed={SEED} events={EVENTS} subjects={SUBJECTS} kills={KILLS} workers={workers}"
    if shutil.which(_esource_command()[0]) is None and not Path(_esource_command()[0]).exists():
        pytest.fail(f"the esource command is not installed ({_esource_command()[0]})")
    rng = random.Random(SEED)
    topic, dlq = topics("crash-updates", "crash-dlq", partitions=PARTITIONS)
    group = unique("esource-crash")

    # the sandbox EDC, in its own process for the whole test
    edc_port, http_port = free_port(), free_port()
    edc_db, store = tmp_path / "sandbox-edc.sqlite", StoreReader(store_url)
    edc = subprocess.Popen([*_esource_command(), "sandbox-edc", "--host", "127.0.0.1", "--port", str(edc_port),
                            "--db", str(edc_db)], stdout=open(tmp_path / "sandbox.log", "wb"),
                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_clean_env())
    service: Service | None = None
    try:
        wait_for_port(edc_port, 30, edc)
        enrollment_file = tmp_path / "enrollment.yaml"
        enrollment_file.write_text(yaml.safe_dump({"study": "CV01", "subjects": [
            {"subject_key": e.subject_key, "site_oid": e.site_oid,
             "identifiers": [{"system": MRN, "value": mrn(n)}],
             "consent": e.consent_date.isoformat(), "day1": e.day1.isoformat()}
            for n in range(1, SUBJECTS + 1) for e in [subject_enrollment(n)]]}))
        config = tmp_path / "esource.yaml"
        config.write_text(yaml.safe_dump({
            "mode": "demo",
            "database_url": store_url,
            "studies": ["CV01"],
            "enrollment_file": str(enrollment_file),
            "http": {"host": "127.0.0.1", "port": http_port},
            "kafka": {"bootstrap": kafka_broker, "topics": [topic], "group": group, "dlq_topic": dlq,
                      "session_timeout_ms": 2000, "heartbeat_interval_ms": 500, "poll_timeout_ms": 200,
                      # small batches: the store moves in steps of at most 100 messages, so the kill
                      # points land while messages are being processed, not after one big batch
                      "max_poll_records": 50, "batch_max_records": 100, "workers": workers},
            "edc": {"connector": "sandbox", "url": f"http://127.0.0.1:{edc_port}", "timeout_s": 10},
            "log": {"level": "INFO"},  # in the test's files only: the tail is shown on failure
        }))
        events = vital_sign_events(EVENTS, SUBJECTS, SEED)

        # stream the events (keyed by patient) while the service runs and gets killed
        producer = producer_factory(linger_ms=20)
        per_partition: Counter = Counter()
        feed_error: list[BaseException] = []

        def feed() -> None:
            try:
                for start in range(0, len(events), 100):
                    futures = [producer.send(topic, key=mrn(n).encode(), value=data,
                                             headers=[("source-system", b"crash-test")])
                               for n, data in events[start:start + 100]]
                    producer.flush()
                    for f in futures:
                        per_partition[f.get(10).partition] += 1
                    time.sleep(0.2)
            except BaseException as exc:  # reported by the main thread
                feed_error.append(exc)

        feeder = threading.Thread(target=feed, name="crash-feeder")
        service = Service(config, tmp_path, http_port)
        service.start()
        feeder.start()

        # kill -9 at random points of the processing (by how many messages the store has taken in)
        def processed() -> int:
            rows = store.query("SELECT count(*) FROM intake WHERE intake_key LIKE :k", k=f"%kafka:{topic}:%")
            return rows[0][0] if rows else 0

        kill_points = sorted(int(EVENTS * rng.uniform(0.05, 0.85)) for _ in range(KILLS))
        kills_done: list[tuple[int, float]] = []
        for n, point in enumerate(kill_points):
            deadline = time.monotonic() + DRAIN_TIMEOUT
            while processed() < point:
                service.assert_alive()
                assert time.monotonic() < deadline, f"no progress to {point} messages ({context})\n{service.tail()}"
                time.sleep(0.05)
            time.sleep(rng.uniform(0, 0.5))  # land anywhere in the processing, dispatching and committing
            assert service.proc is not None
            running = _workers_of(service.proc.pid)
            if workers > 1 and n % 2 == 1 and running:
                os.kill(rng.choice(running), signal.SIGKILL)  # one worker: the service starts it again
                kills_done.append((processed(), time.monotonic()))
                continue
            service.kill()
            kills_done.append((processed(), time.monotonic()))
            time.sleep(rng.uniform(0, 1.0))
            service.start()
        feeder.join(120)
        assert not feed_error, feed_error
        assert sum(per_partition.values()) == EVENTS

        # wait until the topic is drained (group offsets at the end) and the outbox is empty
        ends = {TopicPartition(topic, p): n for p, n in per_partition.items()}
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while True:
            service.assert_alive()
            committed = group_offsets(kafka_broker, group)
            undelivered = store.query("SELECT count(*) FROM outbox WHERE status NOT IN ('sent', 'acked')")
            if all(committed.get(tp) == n for tp, n in ends.items()) and undelivered and undelivered[0][0] == 0:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"not drained after {DRAIN_TIMEOUT:.0f} s ({context}): committed {committed}, "
                                     f"ends {ends}, undelivered {undelivered}\n{service.tail()}")
            time.sleep(0.5)

        # the service says it is ready (Kafka intake included) and its consumer lag is 0 everywhere
        # (lag is published from the first fetch answer of each partition: a consumer that restarted after
        # the topic was drained publishes it a moment after it joins). The drain can end before the broker
        # evicts the member a kill -9 left behind (after session_timeout_ms): the rebalance that follows
        # takes the partitions away for a moment, and /ready says so; it must be back within 30 s.
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as client:
            deadline = time.monotonic() + 30
            while True:
                ready = client.get("/ready")
                if (ready.status_code == 200 and ready.json().get("kafka") == "ok") or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert ready.status_code == 200 and ready.json().get("kafka") == "ok", ready.text
            deadline = time.monotonic() + 30
            while True:
                metrics = client.get("/metrics").raise_for_status().text
                lag_lines = [line for line in metrics.splitlines()
                             if line.startswith("esource_kafka_consumer_lag{") and f'topic="{topic}"' in line]
                if len(lag_lines) == PARTITIONS or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        assert len(lag_lines) == PARTITIONS and all(line.endswith(" 0.0") for line in lag_lines), lag_lines

        with httpx.Client(base_url=f"http://127.0.0.1:{edc_port}", timeout=30) as client:
            transactions = client.get("/studies/CV01/transactions").raise_for_status().json()
            items = client.get("/studies/CV01/items").raise_for_status().json()
            audit = client.get("/studies/CV01/audit").raise_for_status().json()
        service.stop()
        assert service.proc is not None and service.proc.returncode is not None
    finally:
        if service is not None:
            service.stop()
        stop_process(edc, 10)

    # 1. every message was taken in exactly once, none was dead-lettered
    intake_keys = [k for (k,) in store.query("SELECT intake_key FROM intake")]
    assert len([k for k in intake_keys if f"kafka:{topic}:" in k]) == EVENTS, context
    assert store.query("SELECT count(*) FROM dead_letter")[0][0] == 0, context
    outbox = store.query("SELECT subject_key, sequence, status FROM outbox ORDER BY subject_key, sequence")
    store.close()
    assert all(status in ("sent", "acked") for _s, _q, status in outbox)

    # 2. the EDC applied each transaction of the outbox once, in sequence, none missing, none extra
    applied = {(t["subject"], t["sequence"]) for t in transactions}
    assert len(applied) == len(transactions) == len(outbox), context
    assert applied == {(s, q) for s, q, _status in outbox}, context
    by_subject: dict[str, list[int]] = defaultdict(list)
    for s, q, _status in outbox:
        by_subject[s].append(q)
    for s, seqs in by_subject.items():
        assert seqs == list(range(1, len(seqs) + 1)), (s, context)
    # a delivery whose acknowledgement the service had not recorded when it died (in flight, or acked
    # and waiting for the ack recorder, which writes acks in batches: several per dispatcher worker) is
    # sent again after the restart and recognised by its transaction key (answered with the original
    # receipt, nothing applied). Only a death re-sends: a transaction at most once per killed service
    resent = sum(t["duplicates_seen"] for t in transactions)
    assert service is not None
    assert max((t["duplicates_seen"] for t in transactions), default=0) <= service.runs - 1, context

    # 3. no change was applied twice: along each item's audit trail, every change changes the value
    trail: dict[tuple, list[Any]] = defaultdict(list)
    for a in audit:
        trail[(a["subject"], a["event"], a["event_repeat"], a["form"], a["group"], a["group_repeat"], a["item"])
              ].append(a["value"])
    for path, values in trail.items():
        assert all(x != y for x, y in zip(values, values[1:])), (path, values, context)

    # 4. the EDC holds exactly what the engine computes from all events of each subject
    expected = expected_items(events)
    held: dict[str, dict[tuple, str]] = defaultdict(dict)
    for it in items:
        held[it["subject"]][(it["event"], it["event_repeat"], it["form"], it["group"], it["group_repeat"],
                             it["item"])] = it["value"]
    assert set(held) == set(expected), context
    for subject, values in expected.items():
        assert held[subject] == values, (subject, context)
    assert sum(len(v) for v in expected.values()) > EVENTS, context  # the comparison covers real data
    print(f"\ncrash test: {context}; kills after {[k for k, _ in kills_done]} messages; "
          f"{len(transactions)} transactions, {len(items)} items, {resent} re-sent deliveries recognised")
