"""What the EDC emulators (and esource's sandbox EDC) share, so each module holds only its vendor's
protocol: the SQLite store they keep, the item-path columns of their item tables, reading a request
body under a size limit, the `/_faults` endpoints, and serving standalone with uvicorn.

No `from __future__ import annotations` here: FastAPI reads the fault routes' annotations at run time,
and they name the emulator's own request model."""

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request

__all__ = ["open_sqlite", "ITEM_PATH_COLUMNS", "ITEM_PATH_UNIQUE", "read_limited_body", "add_fault_routes",
           "serve_standalone"]

# the item path of the sandbox's and OpenClinica's item and item_audit tables (repeat keys as text, "" for none)
ITEM_PATH_COLUMNS = """id INTEGER PRIMARY KEY AUTOINCREMENT,
    study TEXT NOT NULL,
    subject TEXT NOT NULL,
    event TEXT NOT NULL,
    event_repeat TEXT NOT NULL,
    form TEXT NOT NULL,
    grp TEXT NOT NULL,
    group_repeat TEXT NOT NULL,
    item TEXT NOT NULL"""
ITEM_PATH_UNIQUE = "UNIQUE (study, subject, event, event_repeat, form, grp, group_repeat, item)"


def open_sqlite(db_path: Path | None, schema: str, *, synchronous: str = "FULL") -> sqlite3.Connection:
    """The emulator's store: one connection its threads share behind the emulator's lock, in autocommit
    (the emulator runs BEGIN IMMEDIATE ... COMMIT itself), rows by column name. A file (None: in
    memory) gets WAL and `synchronous` (FULL: an acknowledged write survives a crash), a busy timeout,
    and the schema (CREATE ... IF NOT EXISTS: a restart keeps the data)."""
    if db_path is not None:
        db_path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(db_path) if db_path else ":memory:", check_same_thread=False, isolation_level=None)
    db.row_factory = sqlite3.Row
    if db_path is not None:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
    db.execute("PRAGMA busy_timeout=10000")
    db.executescript(schema)
    return db


async def read_limited_body(request: Request, limit: int, too_large: Callable[[int | None], Exception]) -> bytes:
    """The request body, refused (`too_large(declared size or None)` raised) as soon as it is over `limit`
    bytes: by its Content-Length, else while streaming (never held whole in memory first)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large(int(length))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(None)
        chunks.append(chunk)
    return b"".join(chunks)


def add_fault_routes(app: FastAPI, plan: Any, request_model: type, *, target_type: Any = None) -> None:
    """`POST /_faults` (set the plan: a `request_model`), `GET /_faults` (its state), `DELETE /_faults`
    (clear it; with `target_type`, `?target=` clears one target's plan only)."""

    def post_faults(req: request_model) -> dict[str, Any]:  # type: ignore[valid-type]
        plan.set(req)
        return plan.state()

    def get_faults() -> dict[str, Any]:
        return plan.state()

    if target_type is None:
        def delete_faults() -> dict[str, Any]:
            plan.clear()
            return plan.state()
    else:
        def delete_faults(target: target_type | None = None) -> dict[str, Any]:  # type: ignore[valid-type,no-redef]
            plan.clear(target)
            return plan.state()

    app.post("/_faults")(post_faults)
    app.get("/_faults")(get_faults)
    app.delete("/_faults")(delete_faults)


def serve_standalone(app: FastAPI, host: str, port: int, close: Callable[[], None], *, log_level: str = "info") -> None:
    """Serve an emulator with uvicorn until interrupted, then close its store."""
    import uvicorn

    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        close()

