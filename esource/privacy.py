"""What never leaves the hospital: pseudonymous source references and birth-date masking.

Resource ids can embed identifiers (EHRs often use the MRN as the Patient id), so the ODM AuditRecord
SourceID is a keyed hash (HMAC-SHA-256, key held by the hospital's esource) of `ResourceType/id`, plus
the version. esource's own lineage resolves it back inside the hospital.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os

from esource.domain.model import SourceRef

PSEUDONYM_KEY_ENV = "ESOURCE_PSEUDONYM_KEY"
# Only for dry runs and the demo: a service refuses to start without a real key (see settings).
DEMO_PSEUDONYM_KEY = b"esource-demo-key-not-for-production"


class Pseudonymizer:
    """HMAC-SHA-256 of the source reference, truncated to 128 bits (hex), plus the version."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the pseudonym key must be at least 16 bytes")
        self._key = key

    @classmethod
    def from_env(cls, *, allow_demo_key: bool) -> "Pseudonymizer":
        raw = os.environ.get(PSEUDONYM_KEY_ENV)
        if raw:
            return cls(raw.encode())
        if allow_demo_key:
            return cls(DEMO_PSEUDONYM_KEY)
        raise ValueError(f"{PSEUDONYM_KEY_ENV} is not set: a pseudonym key is required outside demo mode")

    def reference(self, ref: SourceRef) -> str:
        """`<ResourceType>:<hmac>` — the resource type is not identifying and helps a reviewer."""
        basis = f"{ref.resource_type}/{ref.id}" if ref.id else ref.identity
        digest = hmac.new(self._key, basis.encode(), hashlib.sha256).hexdigest()[:32]
        return f"{ref.resource_type}:{digest}"

    def token(self, text: str, kind: str = "ref") -> str:
        """`<kind>:<hmac>` of any text that may name a patient (intake keys carry file names and
        request ids): what the audit trail records, resolvable only inside the hospital."""
        return f"{kind}:{hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()[:32]}"

    def source_id(self, ref: SourceRef) -> str:
        """The ODM AuditRecord SourceID: pseudonymous reference plus version."""
        version = ref.version
        if version.startswith("sha256:"):
            version = version[:19]  # a content hash reveals nothing; shortened for readability
        return f"{self.reference(ref)}|v={version}"


def mask_if_birth_date(iso_value: str, birth_date: dt.date | None) -> str:
    """Any date equal to the birth date is sent as YYYY-MM only (birth-day vitals, congenital onsets)."""
    if birth_date is None or len(iso_value) < 10:
        return iso_value
    if iso_value[:10] == birth_date.isoformat():
        return iso_value[:7]
    return iso_value
