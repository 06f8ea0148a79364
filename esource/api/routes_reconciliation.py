"""API routes: reconciliation (see esource.api)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter


def build_router(container: Any) -> APIRouter:
    return APIRouter()
