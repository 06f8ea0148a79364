"""Many rows through the driver's own executemany.

`session.execute(stmt, [row, row, ...])` spends most of its time in SQLAlchemy's per-row execution
context (parameter construction, processors looked up per row): ~25 µs a row, which for a Kafka batch
of 3,000 messages (60,000 audit entries and item states) was seconds. Here the statement is compiled
once per (statement, dialect, columns), each row goes through the column types' own bind processors
(so values are stored exactly as `session.execute` stores them: same datetime text on SQLite, same
JSON serialiser, psycopg's Json wrapper on PostgreSQL), and the driver receives the whole list at
once: sqlite3's C loop; on PostgreSQL an INSERT goes as one `INSERT ... SELECT * FROM unnest(arrays)`,
other statements through psycopg 3's pipelined executemany. Statements this cannot reproduce
(a bind the rows do not provide, escaped bind names) go the ordinary way.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any, Callable, Sequence

from sqlalchemy.orm import Session

_Plan = tuple[str, tuple[str, ...], tuple[Callable[[Any], Any] | None, ...], bool] | None
_Unnest = tuple[str, tuple[str, ...]] | None  # PostgreSQL's one-statement form of an INSERT (see _unnest)
_PLANS: dict[tuple[str, str, tuple[str, ...]], tuple[_Plan, _Unnest]] = {}

# values processed once per call: the same timestamp on every row of a batch costs one strftime
_MEMO_TYPES = (dt.datetime, dt.date, str, int, bool, type(None))


def _plan(stmt: Any, dialect: Any, keys: tuple[str, ...]) -> _Plan:
    compiled = stmt.compile(dialect=dialect, column_keys=list(keys))
    if getattr(compiled, "escaped_bind_names", None):
        return None
    binds = set(compiled.binds)
    if not binds <= set(keys):
        return None  # a constant bound in the statement itself: construct_params would supply it
    processors = getattr(compiled, "_bind_processors", {})
    if dialect.positional:
        order = tuple(compiled.positiontup or ())
    else:
        order = tuple(sorted(binds))
    return str(compiled), order, tuple(processors.get(name) for name in order), bool(dialect.positional)


def executemany(session: Session, name: str, stmt: Any, rows: Sequence[dict[str, Any]]) -> None:
    """Execute `stmt` (INSERT/UPDATE with binds named like the rows' keys) once per row, in the open
    transaction of `session`. `name` identifies the statement for the compiled-plan cache: pass a
    distinct constant per statement shape. Every row must have the same keys."""
    if not rows:
        return
    conn = session.connection()
    dialect = conn.dialect
    keys = tuple(rows[0])
    cache_key = (name, dialect.name, keys)
    cached = _PLANS.get(cache_key)
    if cached is None:  # the first statement seen under `name` is the one compiled
        plan = _plan(stmt, dialect, keys)
        unnest = _unnest(stmt, dialect, plan[0]) if plan is not None and dialect.name == "postgresql" else None
        cached = _PLANS[cache_key] = (plan, unnest)
    plan, unnest = cached
    if plan is None:
        session.execute(stmt, list(rows))
        return
    sql, order, processors, positional = plan
    columns = []
    for key, proc in zip(order, processors):
        values = [row[key] for row in rows]
        if proc is not None:
            memo: dict[Any, Any] = {}
            out = []
            for v in values:
                if type(v) in _MEMO_TYPES:
                    p = memo.get((type(v), v), memo)
                    if p is memo:
                        p = memo[(type(v), v)] = proc(v)
                    out.append(p)
                else:
                    out.append(proc(v))
            values = out
        columns.append(values)
    if unnest is not None and len(rows) > 1:
        # one INSERT for all rows, the values as one array per column: psycopg's executemany sends a
        # statement per row (even pipelined ~50 µs of client and server time a row, seconds for the
        # audit entries and item states of a Kafka batch). ON CONFLICT keeps its meaning as long as
        # no two rows share a conflict key (callers de-duplicate).
        by_name = dict(zip(order, columns))
        conn.exec_driver_sql(unnest[0], tuple(by_name[name] for name in unnest[1]))
        return
    if positional:
        params: list[Any] = list(zip(*columns))
    else:
        params = [dict(zip(order, vals)) for vals in zip(*columns)]
    conn.exec_driver_sql(sql, params)


_BIND = re.compile(r"%\((\w+)\)s(::[A-Z][A-Z0-9 ]*(?:\(\d+\))?)?")


def _unnest(stmt: Any, dialect: Any, sql: str) -> _Unnest:
    """PostgreSQL: `INSERT INTO t (cols) VALUES (binds) [ON CONFLICT ...] [RETURNING ...]` rewritten as
    `INSERT INTO t (cols) SELECT ... FROM unnest(%b::type[], ...) WITH ORDINALITY ... ORDER BY ...`: one
    array parameter per column, so the statement text stays the same whatever the number of rows. None
    for any other shape."""
    if not sql.startswith("INSERT INTO "):
        return None
    at = sql.find(" VALUES (")
    if at < 0:
        return None
    start = at + len(" VALUES ")
    depth = 0
    for end in range(start, len(sql)):
        if sql[end] == "(":
            depth += 1
        elif sql[end] == ")":
            depth -= 1
            if depth == 0:
                break
    else:
        return None
    head, row, tail = sql[:at], sql[start + 1:end], sql[end + 1:]
    if "%" in head or "%" in tail:
        return None
    binds = [part.strip() for part in row.split(", ")]
    names, arrays = [], []
    columns = getattr(getattr(stmt, "table", None), "c", None)
    for bind in binds:
        m = _BIND.fullmatch(bind)
        if m is None or columns is None or m.group(1) not in columns:
            return None
        cast = m.group(2)[2:] if m.group(2) else columns[m.group(1)].type.compile(dialect=dialect)
        names.append(m.group(1))
        arrays.append(f"%b::{cast}[]")  # binary: psycopg dumps text arrays 3x faster
    # WITH ORDINALITY ... ORDER BY: rows are inserted (and serial ids given) in the callers' order, as
    # one statement per row did (facts are ordered by id within a day); SQLAlchemy's insertmanyvalues
    # orders its INSERT ... SELECT the same way
    aliases = ", ".join(f'"{name}"' for name in names)
    return (f"{head} SELECT {aliases} FROM unnest({', '.join(arrays)}) WITH ORDINALITY AS u({aliases}, esource_ord) "
            f"ORDER BY esource_ord{tail}", tuple(names))
