"""The role-based API for CRAs, data managers, admins and EDC service accounts (audit, lineage,
transfers, reconciliation, ODM pull). Each area is one router module exposing
`build_router(container) -> APIRouter`; `mount_api` includes them all in the service's FastAPI app.
Authentication and roles live in `esource.api.auth`; pagination in `esource.api.paging`; errors
(RFC 9457 problem details on these routes) in `esource.api.problems`."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

ROUTER_MODULES: tuple[str, ...] = (
    "esource.api.routes_transfers",  # transfers, ODM ClinicalData pull, /me
    "esource.api.routes_audit",  # audit trail, lineage
    "esource.api.routes_reconciliation",  # discrepancies, actions, policies, SDV report
)

API_TAGS: list[dict[str, str]] = [
    {"name": "me", "description": "Who the caller is: roles, sites, studies"},
    {"name": "transfers", "description": "ODM transactions esource queued and sent to the EDC (the outbox)"},
    {"name": "ODM pull", "description": "ODM 1.3.2 ClinicalData for EDCs that pull"},
    {"name": "audit", "description": "The hash-chained audit trail, its verification and export; the lineage "
                                     "of any eCRF value"},
    {"name": "reconciliation", "description": "The discrepancy queue, data managers' actions, review-before-send "
                                              "policies, the SDV report"},
]


def mount_api(app: FastAPI, container: Any) -> None:
    """Include every router of ROUTER_MODULES, give the app its Authenticator, and make errors on these
    routes RFC 9457 problem details (the app's other paths keep their OperationOutcome)."""
    import importlib

    from fastapi.routing import APIRoute

    from esource.api.auth import get_authenticator
    from esource.api.problems import install_problem_details, register_problem_paths

    app.state.authenticator = get_authenticator(container)
    known = {t.get("name") for t in (app.openapi_tags or [])}
    app.openapi_tags = [*(app.openapi_tags or []), *(t for t in API_TAGS if t["name"] not in known)]
    for name in ROUTER_MODULES:
        router = importlib.import_module(name).build_router(container)
        app.include_router(router)
        register_problem_paths(app, [r.path_format for r in router.routes if isinstance(r, APIRoute)])
    install_problem_details(app)
