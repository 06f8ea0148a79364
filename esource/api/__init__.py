"""The role-based API for CRAs, data managers, admins and EDC service accounts (audit, lineage,
transfers, reconciliation, ODM pull). Each area is one router module exposing
`build_router(container) -> APIRouter`; `mount_api` includes them all in the service's FastAPI app.
Authentication and roles live in `esource.api.auth`; pagination in `esource.api.paging`."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

ROUTER_MODULES: tuple[str, ...] = (
    "esource.api.routes_transfers",  # transfers, ODM ClinicalData pull
    "esource.api.routes_audit",  # audit trail, lineage
    "esource.api.routes_reconciliation",  # discrepancies, actions, policies, SDV report
)


def mount_api(app: FastAPI, container: Any) -> None:
    import importlib

    for name in ROUTER_MODULES:
        app.include_router(importlib.import_module(name).build_router(container))
