"""Who may call what: roles, principals and the FastAPI dependency that checks them.

Roles (issue: audit/reconciliation/roles API):
- `cra`: read transfers, lineage, audit, SDV report, for assigned sites only
- `data_manager`: cra rights on all sites of the study + resolve discrepancies, review policies
- `admin`: data_manager rights + enrollment, study configuration, users
- `edc`: service account for one study: may pull ODM ClinicalData, nothing else
- `system`: the EHR integration (FHIR intake)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from esource.domain.audit import user_actor


class Role(StrEnum):
    CRA = "cra"
    DATA_MANAGER = "data_manager"
    ADMIN = "admin"
    EDC = "edc"
    SYSTEM = "system"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. `sites`/`studies` None means no restriction."""

    username: str
    roles: frozenset[Role]
    sites: frozenset[str] | None = None
    studies: frozenset[str] | None = None

    @property
    def actor(self) -> str:
        return user_actor(self.username)

    def has(self, *roles: Role) -> bool:
        return bool(self.roles & set(roles))

    def can_see_site(self, site_oid: str | None) -> bool:
        return self.sites is None or (site_oid is not None and site_oid in self.sites)

    def can_see_study(self, study_oid: str) -> bool:
        return self.studies is None or study_oid in self.studies
