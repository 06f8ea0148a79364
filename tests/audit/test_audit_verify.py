"""`verify_chain` finds tampering done directly in the database (SQLite and PostgreSQL): an altered value,
a deleted row (middle and end), swapped hashes, a rewritten entry with a recomputed hash, a row added
beside the store."""

from __future__ import annotations

import pytest
from audit_helpers import mapped, raw_rows, record, sql

from esource.audit.chain import entry_hash
from esource.audit.verify import ALTERED, BROKEN_LINK, HEAD_MISMATCH, MISSING, NOT_IN_HEAD, verify_chain


@pytest.fixture
def chained(store):
    record(store, *(mapped(str(120 + i)) for i in range(3)))
    record(store, *(mapped(str(130 + i)) for i in range(3)))
    return store  # entries 1..6


def test_an_intact_chain_verifies(chained):
    result = verify_chain(chained)
    assert result.intact and result.broken is None
    assert (result.entries, result.last_id) == (6, 6)


def test_an_empty_chain_is_intact(store):
    result = verify_chain(store)
    assert result.intact and result.entries == 0


def test_a_value_altered_with_sql_is_detected(chained):
    sql(chained, "UPDATE audit_log SET new_value = :v WHERE id = 4", v="999")
    result = verify_chain(chained)
    assert result.broken is not None
    assert (result.broken.entry_id, result.broken.kind) == (4, ALTERED)
    assert result.entries == 3
    assert "entry 4" in result.broken.message


def test_an_altered_timestamp_or_detail_is_detected(chained):
    sql(chained, "UPDATE audit_log SET actor = 'user:mallory' WHERE id = 2")
    assert (verify_chain(chained).broken.entry_id, verify_chain(chained).broken.kind) == (2, ALTERED)


def test_a_deleted_row_is_detected(chained):
    sql(chained, "DELETE FROM audit_log WHERE id = 3")
    broken = verify_chain(chained).broken
    assert (broken.entry_id, broken.kind) == (3, MISSING)
    assert "entry 3 is missing" in broken.message


def test_deleted_newest_rows_are_detected_by_the_head(chained):
    sql(chained, "DELETE FROM audit_log WHERE id >= 5")
    result = verify_chain(chained)
    assert (result.broken.entry_id, result.broken.kind) == (5, MISSING)
    assert result.entries == 4


def test_swapped_hashes_are_detected(chained):
    rows = raw_rows(chained)
    sql(chained, "UPDATE audit_log SET hash = :h WHERE id = 2", h=rows[2]["hash"])
    sql(chained, "UPDATE audit_log SET hash = :h WHERE id = 3", h=rows[1]["hash"])
    broken = verify_chain(chained).broken
    assert (broken.entry_id, broken.kind) == (2, ALTERED)


def test_a_rewritten_entry_with_a_recomputed_hash_breaks_the_next_link(chained):
    row = raw_rows(chained)[2]  # entry 3
    row["new_value"] = "999"
    sql(chained, "UPDATE audit_log SET new_value = '999', hash = :h WHERE id = 3", h=entry_hash(row))
    broken = verify_chain(chained).broken
    assert (broken.entry_id, broken.kind) == (4, BROKEN_LINK)


def test_a_rewritten_last_entry_no_longer_matches_the_head(chained):
    row = raw_rows(chained)[5]  # entry 6, the newest
    row["new_value"] = "999"
    sql(chained, "UPDATE audit_log SET new_value = '999', hash = :h WHERE id = 6", h=entry_hash(row))
    broken = verify_chain(chained).broken
    assert (broken.entry_id, broken.kind) == (6, HEAD_MISMATCH)


def test_a_row_added_beside_the_store_is_detected(chained):
    row = raw_rows(chained)[5]
    sql(chained, "INSERT INTO audit_log (id, at, actor, action, detail, prev_hash, hash) "
                 "VALUES (7, :at, 'user:mallory', 'value.mapped', '{}', :prev, :h)",
        at=row["at"], prev=row["hash"], h="f" * 64)
    broken = verify_chain(chained).broken
    assert (broken.entry_id, broken.kind) == (7, NOT_IN_HEAD)


def test_verify_reads_in_batches(chained):
    assert verify_chain(chained, batch_size=2).entries == 6
    sql(chained, "UPDATE audit_log SET reason = 'x' WHERE id = 5")
    assert verify_chain(chained, batch_size=2).broken.entry_id == 5
