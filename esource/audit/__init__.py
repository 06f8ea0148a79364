"""The audit trail's tools: the hash chain's canonical form (`chain`), `verify`, exports (CSV and ODM
1.3.2 AuditRecords) and the lineage of one eCRF value.

Kept import-light: the store imports `esource.audit.chain` to hash entries, so this package must not
import the store (or FastAPI) at module level.
"""

from esource.audit.chain import GENESIS_HASH, canonical_bytes, entry_hash

__all__ = ["GENESIS_HASH", "canonical_bytes", "entry_hash"]
