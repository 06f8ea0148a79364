"""One pagination shape for every list endpoint: `limit`/`offset` in, `Page` out (with the total, so a
client knows when to stop and a dashboard can show "1-50 of 312")."""

from __future__ import annotations

from typing import Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel

T = TypeVar("T")

MAX_LIMIT = 500


class PageParams(BaseModel):
    limit: int = 50
    offset: int = 0


def page_params(limit: int = Query(50, ge=1, le=MAX_LIMIT, description="items per page"),
                offset: int = Query(0, ge=0, description="items to skip")) -> PageParams:
    """FastAPI dependency: `Depends(page_params)`."""
    return PageParams(limit=limit, offset=offset)


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int
