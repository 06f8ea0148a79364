"""Kafka worker processes (kafka.workers > 1): settings, the pipe protocol, and the pool's care of its
workers — tested with a stand-in worker script (the real workers, on a real broker and PostgreSQL,
run in tests/kafka/test_kafka_crash.py)."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from esource.errors import StudyConfigError
from esource.observability import Metrics
from esource.services.kafka_workers import (
    CounterDeltas,
    KafkaWorkerPool,
    apply_counters,
    lag_samples,
    parse_lag,
    settings_payload,
)
from esource.settings import Settings, load_settings

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


pytestmark = pytest.mark.usefixtures("clean_esource_env")


def test_more_than_one_worker_needs_postgresql():
    with pytest.raises(StudyConfigError, match="needs PostgreSQL") as e:
        load_settings(mode="demo", kafka={"workers": 2})
    assert "kafka.workers is 2" in str(e.value)
    assert load_settings(mode="demo", database_url=PG, kafka={"workers": 2}).kafka.workers == 2
    assert load_settings(mode="demo").kafka.workers == 1
    with pytest.raises(StudyConfigError):
        load_settings(mode="demo", database_url=PG, kafka={"workers": 0})


def test_the_settings_a_worker_rebuilds_are_the_services_without_the_enrollment_file(monkeypatch, tmp_path):
    monkeypatch.setenv("ESOURCE_AUTH_SECRET", "s" * 40)
    monkeypatch.setenv("ESOURCE_PSEUDONYM_KEY", "p" * 20)
    monkeypatch.setenv("ESOURCE_EDC__STUDIES__CV01__API_KEY", "edc-key-from-env")
    enrollment = tmp_path / "enrollment.yaml"
    s = load_settings(database_url=PG, enrollment_file=enrollment, maps_dir=tmp_path,
                      kafka={"bootstrap": "k:9092", "workers": 3, "topics": "a,b"},
                      edc={"connector": "sandbox", "url": "http://edc:8090"}, log={"json": False})
    payload = settings_payload(s)
    json.dumps(payload)  # what goes down the pipe
    monkeypatch.delenv("ESOURCE_AUTH_SECRET")
    monkeypatch.delenv("ESOURCE_PSEUDONYM_KEY")
    monkeypatch.delenv("ESOURCE_EDC__STUDIES__CV01__API_KEY")
    rebuilt = Settings(**json.loads(json.dumps(payload)))  # no environment: everything came through
    assert rebuilt.auth_secret.get_secret_value() == "s" * 40
    assert rebuilt.pseudonym_key.get_secret_value() == "p" * 20
    assert rebuilt.edc.for_study("CV01").api_key.get_secret_value() == "edc-key-from-env"
    assert rebuilt.enrollment_file is None and s.enrollment_file == enrollment
    assert rebuilt.model_dump(exclude={"enrollment_file"}) == s.model_dump(exclude={"enrollment_file"})
    assert rebuilt.log.json_logs is False and rebuilt.kafka.topics == ["a", "b"]


def test_counter_deltas_carry_what_moved_since_the_last_tick_into_the_services_metrics():
    worker, service = Metrics(), Metrics()
    deltas = CounterDeltas(worker)
    worker.messages.labels("kafka", "processed").inc(3)
    worker.items_mapped.labels("CV01", "Insert").inc(40)
    worker.dropped_not_enrolled.inc(2)
    worker.delivery_latency.labels("sandbox").observe(0.3)  # not the intake's: not forwarded
    service.messages.labels("kafka", "processed").inc(5)  # the service's own (HTTP, another worker)
    first = deltas()
    apply_counters(service, json.loads(json.dumps(first)))
    worker.messages.labels("kafka", "processed").inc(1)
    worker.messages.labels("kafka", "dead_letter").inc(1)
    second = deltas()
    assert sorted((n, tuple(sorted(lab.items())), d) for n, lab, d in second) == [
        ("messages", (("channel", "kafka"), ("outcome", "dead_letter")), 1.0),
        ("messages", (("channel", "kafka"), ("outcome", "processed")), 1.0)]
    apply_counters(service, second)
    assert deltas() == []
    value = service.registry.get_sample_value
    assert value("esource_messages_consumed_total", {"channel": "kafka", "outcome": "processed"}) == 9
    assert value("esource_messages_consumed_total", {"channel": "kafka", "outcome": "dead_letter"}) == 1
    assert value("esource_items_mapped_total", {"study": "CV01", "transaction_type": "Insert"}) == 40
    assert value("esource_resources_not_enrolled_total") == 2
    assert value("esource_delivery_latency_seconds_count", {"connector": "sandbox"}) is None
    # whatever else comes down the pipe is ignored, never applied
    apply_counters(service, [["outbox_depth", {"status": "pending"}, 5], ["messages", {}, -1], "junk", [1, 2]])
    assert value("esource_outbox_depth", {"status": "pending"}) is None
    worker.consumer_lag.labels("t", "0").set(7)
    assert lag_samples(worker) == [["t", "0", 7.0]]
    assert parse_lag(json.loads(json.dumps(lag_samples(worker)))) == {("t", "0"): 7.0}
    assert parse_lag([["t", "1", "x"], ["t", "2"], "junk", ["t", 3, 4]]) == {("t", "3"): 4.0}
    assert parse_lag("junk") == {}


# a stand-in worker speaking the pipe protocol (the pool under test is the real one): it notes its pid
# and the consumer group it was given in FAKE_STATE, reports every 0.1 s, and notes when it stops
FAKE_WORKER = textwrap.dedent("""
    import json, os, signal, sys, threading, time
    first = json.loads(sys.stdin.readline())
    settings = first["settings"]
    out = sys.stdout
    state = os.environ["FAKE_STATE"]
    with open(state, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "group": settings["kafka"].get("group"), "index": first["index"]})
                + "\\n")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    n = 0
    while not stop.wait(0.1):
        n += 1
        msg = {"ready": True, "counters": [["messages", {"channel": "kafka", "outcome": "processed"}, 1]],
               "lag": [["topic", str(os.getpid() % 1000), n]]}
        if n == 1:
            msg["outbox"] = True
        print(json.dumps(msg), file=out, flush=True)
        print("not json", file=out, flush=True)
    with open(state, "a") as f:
        f.write(json.dumps({"stopped": os.getpid()}) + "\\n")
""")


def _container(settings: Settings) -> SimpleNamespace:
    woken: list[float] = []
    return SimpleNamespace(settings=settings, metrics=Metrics(),
                           dispatcher=SimpleNamespace(wake=lambda: woken.append(time.monotonic())), woken=woken)


def _wait(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _states(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_the_pool_starts_its_workers_sums_their_reports_restarts_the_dead_and_stops_them(tmp_path, monkeypatch):
    script, state = tmp_path / "fake_worker.py", tmp_path / "state.jsonl"
    script.write_text(FAKE_WORKER)
    monkeypatch.setenv("FAKE_STATE", str(state))
    settings = load_settings(mode="demo", database_url=PG,
                             kafka={"bootstrap": "127.0.0.1:1", "workers": 2, "group": "g-test",
                                    "session_timeout_ms": 2000, "heartbeat_interval_ms": 500})
    container = _container(settings)
    pool = KafkaWorkerPool(container, 2, command=[sys.executable, str(script)])
    assert pool.stagger == 3.0  # the session timeout + 1 s: a dead worker's restart waits that long
    pool.stagger = 0.2
    pool.start()
    try:
        _wait(pool.ready)
        assert len(pool.pids) == 2 and len({s["pid"] for s in _states(state)}) == 2
        assert all(s["group"] == "g-test" for s in _states(state))  # the settings came down the pipe
        assert sorted(s["index"] for s in _states(state)) == [0, 1]
        assert container.woken  # a worker's commit that queued transactions wakes the dispatcher
        value = container.metrics.registry.get_sample_value
        _wait(lambda: (value("esource_messages_consumed_total", {"channel": "kafka", "outcome": "processed"})
                       or 0) >= 6)
        lags = {s.labels["partition"] for f in container.metrics.consumer_lag.collect() for s in f.samples}
        assert lags == {str(p % 1000) for p in pool.pids}  # one lag series per worker's partition

        # a worker that dies: not ready meanwhile, its lag series gone, started again
        victim = pool.pids[0]
        os.kill(victim, signal.SIGKILL)
        _wait(lambda: not pool.ready())
        _wait(lambda: str(victim % 1000) not in {s.labels["partition"] for f in container.metrics.consumer_lag.collect()
                                                 for s in f.samples})
        _wait(lambda: pool.ready() and victim not in pool.pids and len(pool.pids) == 2)
        assert len({s["pid"] for s in _states(state) if "pid" in s}) == 3
        running = set(pool.pids)
    finally:
        pool.stop(5)
    stopped = {s["stopped"] for s in _states(state) if "stopped" in s}
    assert running <= stopped and victim not in stopped  # SIGTERM and the closed pipe let the workers finish
    assert pool.pids == []


def test_a_worker_stops_when_the_service_is_gone(tmp_path, monkeypatch):
    """The end of its stdin (the service closed it or died: kill -9 closes it too) stops a worker."""
    script, state = tmp_path / "fake_worker.py", tmp_path / "state.jsonl"
    script.write_text(FAKE_WORKER)
    monkeypatch.setenv("FAKE_STATE", str(state))
    settings = load_settings(mode="demo", database_url=PG, kafka={"bootstrap": "127.0.0.1:1", "workers": 2})
    pool = KafkaWorkerPool(_container(settings), 1, command=[sys.executable, str(script)])
    pool.start()
    try:
        _wait(pool.ready)
        worker = pool._workers[0].proc
        assert worker is not None and worker.stdin is not None
        worker.stdin.close()  # as the kernel does when the service dies
        worker.wait(10)
        assert {s.get("stopped") for s in _states(state)} >= {worker.pid}
    finally:
        pool._stop.set()
        pool.stop(5)


def test_the_real_worker_without_settings_exits_at_once():
    """`python -m esource.services.kafka_workers` whose service closed the pipe before sending the
    settings exits cleanly, without consuming anything."""
    import subprocess

    done = subprocess.run([sys.executable, "-m", "esource.services.kafka_workers"], input=b"", capture_output=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout == b""
