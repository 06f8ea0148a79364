"""Soak: a few hundred real transactions (ESOURCE_SOAK_SIZE, default 300) delivered over loopback HTTP
by 4 workers while ~30% of deliveries hit an injected transient fault — 500, 503, 429, a dropped
connection, a timeout, a slow answer — half of them after the EDC committed. The end state must be
exactly once: every row acknowledged, every transaction key applied once, the EDC holding exactly
the values the transactions describe, each subject's transactions received in sequence."""

from __future__ import annotations

import os
import time
from collections import Counter

from delivery_helpers import STUDY, Feeder, edc_state, expected_state
from esource.connectors.sandbox import SandboxConnector
from esource.observability import Metrics
from esource.services.dispatch import Dispatcher

SIZE = int(os.environ.get("ESOURCE_SOAK_SIZE", "300"))
SUBJECTS = 10


def test_soak_exactly_once_under_transient_faults(cv01, store, clock, sandbox):
    started = time.monotonic()
    subjects = [f"00{1 + i % 2}-{i + 1:04d}" for i in range(SUBJECTS)]
    feeder = Feeder(cv01, store, clock, subjects)
    feeder.rounds(max(1, SIZE // SUBJECTS))
    rows = feeder.outbox()
    assert len(rows) == max(1, SIZE // SUBJECTS) * SUBJECTS
    fed = time.monotonic() - started

    sandbox.faults(modes=["500", "503", "429", "reset", "timeout", "slow"], count=None, rate=0.3, seed=20250301,
                   after_commit=0.5, retry_after=0, delay=0.4)
    metrics = Metrics()
    connector = SandboxConnector(sandbox.url, timeout=0.25)
    dispatcher = Dispatcher(store.uow, {STUDY: connector}, {STUDY: cv01.metadata_version_oid}, metrics,
                            workers=4, max_attempts=6, clock=clock, sleep=lambda s: clock.advance(seconds=s))
    passes = 0
    try:
        while True:
            passes += 1
            dispatcher.drain()
            left = feeder.outbox(("pending", "failed"))
            if not left:
                break
            assert passes < 20, f"{len(left)} rows still undelivered after {passes} passes"
            clock.advance(minutes=5)  # past every cool-down and open circuit
    finally:
        sandbox.clear_faults()
        connector.close()

    rows = feeder.outbox()
    assert {e.status for e in rows} == {"acked"}
    txs = sandbox.transactions()
    keys = [t["key"] for t in txs]
    assert len(keys) == len(set(keys)) == len(rows)
    applied = Counter(a["transaction"] for a in sandbox.audit())
    assert applied == Counter({f"{e.study_oid}/{e.subject_key}/{e.sequence}": e.item_count for e in rows})
    assert edc_state(sandbox.items()) == expected_state(rows)
    for s in subjects:
        seqs = [t["sequence"] for t in txs if t["subject"] == s]
        assert seqs == list(range(1, len(seqs) + 1))
    injected = sandbox.fault_state()["injected"]
    total_faults = sum(injected.values())
    assert total_faults >= 0.15 * len(rows), injected
    assert any("+after_commit" in k for k in injected) and any("+after_commit" not in k for k in injected)
    reg = metrics.registry
    assert reg.get_sample_value("esource_deliveries_total", {"connector": "sandbox", "outcome": "transient"}) >= 1
    accepted = sum(reg.get_sample_value("esource_deliveries_total", {"connector": "sandbox", "outcome": o}) or 0
                   for o in ("accepted", "duplicate"))
    assert accepted == len(rows)
    assert dispatcher.totals.duplicates >= 1  # answers lost after the commit were recognised, not re-applied
    elapsed = time.monotonic() - started
    print(f"\nsoak: {len(rows)} transactions ({fed:.1f}s to produce), {total_faults} injected faults "
          f"{dict(injected)}, {dispatcher.totals.retries} retries, {dispatcher.totals.duplicates} duplicates "
          f"recognised, {passes} pass(es), {elapsed:.1f}s in all")
    if SIZE <= 300:
        assert elapsed < 30
