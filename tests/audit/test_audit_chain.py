"""The store's audit trail (SQLite, and PostgreSQL when ESOURCE_TEST_POSTGRES_DSN is set): events are
chained at commit, vanish on rollback, read-only units of work record reads, queries filter and page,
and concurrent appenders keep one unbroken chain."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import threading

import pytest
from audit_helpers import key, mapped, raw_rows, record

from esource.audit.chain import GENESIS_HASH, canonical_bytes, entry_hash
from esource.audit.verify import verify_chain
from esource.domain.audit import AuditAction, AuditEvent, user_actor
from esource.domain.model import SourceRef
from esource.store import Store
from esource.store.errors import StoreError


def test_events_are_chained_when_the_unit_of_work_commits(store, clock):
    with store.uow() as uow:
        uow.audit(mapped("128"))
        uow.audit(AuditEvent(AuditAction.TRANSFER_QUEUED, study_oid="CV01", subject_key="001-0001",
                             site_oid="SITE.001", detail={"outbox_id": 1, "sequence": 1}))
        assert raw_rows(store) == []  # buffered: nothing written before the commit
        uow.commit()
    rows = raw_rows(store)
    assert [r["id"] for r in rows] == [1, 2]
    assert rows[0]["prev_hash"] == GENESIS_HASH
    assert rows[1]["prev_hash"] == rows[0]["hash"]
    assert all(r["hash"] == entry_hash(r) for r in rows)
    assert rows[0]["at"] == clock.now()  # the unit of work's clock when the event has no time
    with store.uow(read_only=True) as uow:
        assert uow.audit_head() == (2, rows[1]["hash"])
        entries = uow.audit_range(1)
    e = entries[0]
    assert e.event.action is AuditAction.VALUE_MAPPED and e.event.item == key()
    assert e.event.new_value == "128" and e.event.rule == "F.VS/SYSBP/result"
    assert e.event.source == SourceRef("Observation", "obs-1", "1", "Observation/obs-1")
    assert e.event.detail["conversions"] == ["rounded half-up to 0 decimal(s): 128"]
    assert (e.prev_hash, e.hash) == (GENESIS_HASH, rows[0]["hash"])


def test_the_chain_continues_across_units_of_work_and_commits(store):
    record(store, mapped("1"))
    with store.uow() as uow:
        uow.audit(mapped("2"))
        uow.commit()
        uow.audit(mapped("3"))  # work after a commit is a new transaction
        uow.commit()
    rows = raw_rows(store)
    assert [r["new_value"] for r in rows] == ["1", "2", "3"]
    assert [r["prev_hash"] for r in rows[1:]] == [r["hash"] for r in rows[:-1]]
    assert verify_chain(store).intact


def test_events_of_a_rolled_back_unit_of_work_vanish(store):
    record(store, mapped("kept"))
    with store.uow() as uow:
        uow.audit(mapped("rolled back"))
        uow.rollback()
        uow.audit(mapped("after rollback"))
        uow.commit()
    with store.uow() as uow:
        uow.audit(mapped("never committed"))
    with pytest.raises(RuntimeError), store.uow() as uow:
        uow.audit(mapped("failed"))
        raise RuntimeError("the use case failed")
    assert [r["new_value"] for r in raw_rows(store)] == ["kept", "after rollback"]
    assert verify_chain(store).entries == 2


def test_a_patient_source_keeps_neither_its_id_nor_its_identifier(store):
    record(store, AuditEvent(AuditAction.VALUE_MAPPED, study_oid="CV01", subject_key="001-0001",
                             item=key(item="IT.DM.SEX", group_repeat=None), new_value="F",
                             source=SourceRef("Patient", "MRN-778899", "3", "Patient|http://mrn|MRN-778899")))
    (row,) = raw_rows(store)
    assert (row["source_type"], row["source_id"], row["source_version"], row["source_identity"]) == \
        ("Patient", None, "3", None)
    assert "MRN-778899" not in json.dumps(row, default=str)


def test_a_read_only_unit_of_work_records_reads_in_a_write_transaction_of_its_own(store):
    record(store, mapped("128"))
    with store.uow(read_only=True) as uow:
        uow.audit(AuditEvent(AuditAction.DATA_READ, actor=user_actor("cra1"), study_oid="CV01",
                             subject_key="001-0001", detail={"endpoint": "GET /x"}))
        assert len(raw_rows(store)) == 1  # written when the unit of work closes
        with pytest.raises(StoreError, match="read-only"):
            uow.audit(mapped("a change cannot be recorded by a read"))
    rows = raw_rows(store)
    assert [(r["id"], r["action"], r["actor"]) for r in rows] == [(1, "value.mapped", "system"),
                                                                   (2, "data.read", "user:cra1")]
    assert rows[1]["prev_hash"] == rows[0]["hash"]
    # a read that failed returned nothing: it is not recorded
    with pytest.raises(LookupError), store.uow(read_only=True) as uow:
        uow.audit(AuditEvent(AuditAction.DATA_READ, actor=user_actor("cra1"), study_oid="CV01"))
        raise LookupError("no such subject")
    assert len(raw_rows(store)) == 2
    assert verify_chain(store).intact


def test_naive_times_and_unstorable_details_are_refused(store):
    with store.uow() as uow:
        with pytest.raises(StoreError, match="timezone-aware"):
            uow.audit(mapped("1", at=dt.datetime(2025, 1, 1)))
        with pytest.raises(StoreError, match="detail"):
            uow.audit(mapped("1", blob=object()))
        uow.audit(mapped("1", ratio=0.5))  # a float is kept as text: the canonical form has no floats
        uow.commit()
    (row,) = raw_rows(store)
    detail = row["detail"] if isinstance(row["detail"], dict) else json.loads(row["detail"])
    assert detail["ratio"] == "0.5"


def test_queries_filter_page_and_count(store, clock):
    t0 = clock.now()
    record(store, mapped("120", subject="001-0001", site="SITE.001"))
    clock.advance(hours=1)
    record(store, mapped("80", subject="001-0001", item=key(group_repeat="DIABP")))
    clock.advance(hours=1)
    record(store, mapped("130", subject="002-0001", site="SITE.002", item=key("002-0001"), actor=user_actor("dm")))
    clock.advance(hours=1)
    record(store, AuditEvent(AuditAction.MESSAGE_RECEIVED, study_oid="CV01", detail={"intake_key": "k"}),
           AuditEvent(AuditAction.MESSAGE_RECEIVED, study_oid="CV02"))
    with store.uow(read_only=True) as uow:
        def ids(**kw):
            entries, total = uow.audit_entries(**kw)
            return [e.id for e in entries], total

        assert ids(study_oid="CV01") == ([1, 2, 3, 4], 4)
        assert ids(study_oid="CV01", subject_key="001-0001") == ([1, 2], 2)
        assert ids(study_oid="CV01", item=key()) == ([1], 1)
        assert ids(study_oid="CV01", item=key(group_repeat="DIABP")) == ([2], 1)
        assert ids(study_oid="CV01", item_oid="IT.VS.VSORRES") == ([1, 2, 3], 3)
        assert ids(actions=["message.received"]) == ([4, 5], 2)
        assert ids(actor="user:dm") == ([3], 1)
        assert ids(since=t0 + dt.timedelta(hours=1), until=t0 + dt.timedelta(hours=3)) == ([2, 3], 2)
        assert ids(study_oid="CV01", sites=["SITE.002"]) == ([3], 1)  # entries without a site are left out
        assert ids(study_oid="CV01", limit=2, offset=1) == ([2, 3], 4)
        assert ids(study_oid="CV01", limit=2, newest_first=True) == ([4, 3], 4)
        assert [e.id for e in uow.audit_range(2, 3)] == [2, 3]
        assert [e.id for e in uow.audit_range(4)] == [4, 5]


def test_an_auditor_can_recompute_a_hash_from_the_documented_canonical_form(store):
    """The esource.audit.chain docstring, followed by hand (no esource code): same hash."""
    record(store, mapped("72.5", old="72", actor=user_actor("dm"), note="é ü"),
           AuditEvent(AuditAction.PATIENT_DROPPED, study_oid="CV01", reason="not enrolled", detail={"resources": 3}))
    for row in raw_rows(store):
        obj = {name: row[name] for name in row if name != "hash"}
        at = row["at"]
        obj["at"] = at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        if isinstance(obj["detail"], str):
            obj["detail"] = json.loads(obj["detail"])
        assert len(obj) == 23
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        assert hashlib.sha256(text.encode("utf-8")).hexdigest() == row["hash"]
        assert canonical_bytes(row) == text.encode("utf-8")


def test_concurrent_appenders_keep_one_unbroken_chain(store_url, clock):
    """Threads, each with its own units of work (and its own connection), append at once."""
    stores = [Store(store_url, clock=clock, busy_timeout_ms=30_000) for _ in range(2)]
    threads_n, uows_n, events_n = 6, 5, 4
    errors: list[BaseException] = []
    start = threading.Barrier(threads_n)

    def appender(t: int) -> None:
        s = stores[t % len(stores)]
        try:
            start.wait()
            for u in range(uows_n):
                with s.uow() as uow:
                    for e in range(events_n):
                        uow.audit(mapped(f"{t}.{u}.{e}", subject=f"00{t}-0001"))
                    uow.commit()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=appender, args=(t,)) for t in range(threads_n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        assert errors == []
        result = verify_chain(stores[0])
        assert result.intact, result.broken
        assert result.entries == threads_n * uows_n * events_n
        rows = raw_rows(stores[0])
        assert [r["id"] for r in rows] == list(range(1, threads_n * uows_n * events_n + 1))
        # each unit of work's events are contiguous and in order (chained as one batch)
        values = [r["new_value"] for r in rows]
        for i in range(0, len(values), events_n):
            batch = values[i:i + events_n]
            prefix = batch[0].rsplit(".", 1)[0]
            assert batch == [f"{prefix}.{e}" for e in range(events_n)]
    finally:
        for s in stores:
            s.dispose()


def test_canonical_bytes_are_the_documented_json_dumps_form():
    """The hash input is written with orjson; it must be byte for byte the documented json.dumps call,
    whatever the text (control characters, quotes, non-ASCII, astral planes)."""
    import json
    import random

    from esource.audit.chain import CANONICAL_MEMBERS, canonical_bytes

    rng = random.Random(7)
    alphabet = [chr(i) for i in range(0x80)] + ["é", "\u2028", "\ufeff", "😀", "\uffff"]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10)))
        row = {name: text for name in CANONICAL_MEMBERS}
        row.update(id=rng.randint(1, 10**9), at="2025-03-01T09:00:00.000000Z", detail={"z": [text, 1, None], "a": text})
        expected = json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                              allow_nan=False).encode("utf-8")
        assert canonical_bytes(row) == expected
