"""`verify`: recompute the audit chain and name the first entry that does not hold.

What is checked, entry by entry in id order (the canonical form is in `esource.audit.chain`):
- ids run 1, 2, 3 ... without a gap: a gap is a deleted entry (`missing`);
- each entry's `hash` is the SHA-256 of its canonical form: anything altered after it was written
  (a value, a timestamp, its `prev_hash`, its hash itself) fails here (`altered`);
- each entry's `prev_hash` is its predecessor's `hash`: an entry rewritten *with* a recomputed hash
  fails at its successor (`broken_link`);
- the head (`audit_head`) names the last entry and its hash: deleting the newest entries leaves it
  pointing past the table (`missing`), rows added beside the store have ids past it (`not_in_head`),
  a rewritten last entry no longer matches it (`head_mismatch`).

Entries appended while `verify` runs are left for the next run: the head is read first and only the
entries up to it are checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from esource.audit.chain import GENESIS_HASH, entry_hash

ALTERED = "altered"
BROKEN_LINK = "broken_link"
MISSING = "missing"
NOT_IN_HEAD = "not_in_head"
HEAD_MISMATCH = "head_mismatch"


@dataclass(frozen=True, slots=True)
class ChainBreak:
    """The first entry that does not verify: its id, what kind of break, and why in words."""

    entry_id: int
    kind: str  # altered | broken_link | missing | not_in_head | head_mismatch
    message: str


@dataclass(frozen=True, slots=True)
class VerifyResult:
    entries: int  # entries checked and found intact before the break (all of them when intact)
    last_id: int  # the head's last id when the run started
    broken: ChainBreak | None = None

    @property
    def intact(self) -> bool:
        return self.broken is None


def verify_chain(store: Any, *, batch_size: int = 1000) -> VerifyResult:
    """Recompute the chain of `store` (an esource Store: `store.uow(read_only=True)`), reading
    `batch_size` rows at a time. Does not record anything (verify is not a read of clinical data)."""
    with store.uow(read_only=True) as uow:
        head_id, head_hash = uow.audit_head()
        expected, prev, checked = 1, GENESIS_HASH, 0
        after = 0
        while after < head_id:
            rows = uow.audit_rows(after_id=after, limit=batch_size)
            rows = [r for r in rows if int(r["id"]) <= head_id]
            if not rows:
                break
            for row in rows:
                rid = int(row["id"])
                if rid != expected:
                    return VerifyResult(checked, head_id, _gap(expected, rid))
                if entry_hash(row) != row["hash"]:
                    return VerifyResult(checked, head_id, ChainBreak(
                        rid, ALTERED, f"entry {rid} was altered: its content no longer matches its hash"))
                if row["prev_hash"] != prev:
                    return VerifyResult(checked, head_id, ChainBreak(
                        rid, BROKEN_LINK, f"entry {rid} does not link to entry {rid - 1}: its prev_hash is not "
                                          f"the hash entry {rid - 1} carries (one of them was rewritten)"))
                prev, expected, checked = row["hash"], rid + 1, checked + 1
            after = int(rows[-1]["id"])
        if checked < head_id:
            return VerifyResult(checked, head_id, ChainBreak(
                expected, MISSING, f"entries {expected} to {head_id} are missing (deleted): the head names "
                                   f"entry {head_id} as the last one"))
        if head_id and prev != head_hash:
            return VerifyResult(checked, head_id, ChainBreak(
                head_id, HEAD_MISMATCH, f"entry {head_id} is not the entry the head recorded (its hash differs)"))
        beyond = uow.audit_rows(after_id=head_id, limit=1)
        if beyond:
            now_head, _ = uow.audit_head()  # re-read after the rows: an append commits both at once
            if int(beyond[0]["id"]) > now_head:
                bid = int(beyond[0]["id"])
                return VerifyResult(checked, head_id, ChainBreak(
                    bid, NOT_IN_HEAD, f"entry {bid} lies beyond the head (entry {now_head}): it was not "
                                      "appended through the store"))
        return VerifyResult(checked, head_id)


def _gap(expected: int, found: int) -> ChainBreak:
    what = f"entry {expected} is" if found == expected + 1 else f"entries {expected} to {found - 1} are"
    where = f"the chain starts at entry {found}" if expected == 1 else \
        f"the chain jumps from entry {expected - 1} to entry {found}"
    return ChainBreak(expected, MISSING, f"{what} missing (deleted): {where}")
