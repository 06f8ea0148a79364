"""`esource ingest PATH...`: backfills through the same path as events (files channel)."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

from esource.adapters.files import iter_input_files, read_input_file
from esource.bootstrap import build
from esource.errors import IntakeError
from esource.observability import configure_logging
from esource.runtime import settle_heap
from esource.services.ingest import Envelope
from esource.settings import load_settings


def run_ingest(paths: list[Path], config: Path | None, *, dispatch: bool = True) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    settings = load_settings(config)
    configure_logging("WARNING", json_logs=settings.log.json_logs)
    console = Console(stderr=True)
    container = build(settings)
    settle_heap()  # a backfill maps many files: see esource.runtime
    files = list(iter_input_files(paths))
    stats: Counter = Counter()
    kinds: Counter = Counter()
    dead: list[str] = []
    try:
        with Progress(TextColumn("[bold]ingest"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.description}"), console=console) as progress:
            task = progress.add_task("", total=len(files))
            for path in files:
                progress.update(task, description=path.name)
                data = b""
                env = Envelope("file", str(path.resolve()), origin=str(path))
                try:
                    data = read_input_file(path, max_bytes=settings.http.max_body_bytes)
                    env = Envelope("file", f"{path.resolve()}:{hashlib.sha256(data).hexdigest()[:16]}", str(path))
                    result = container.ingest.ingest_bytes(data, env)
                except IntakeError as exc:
                    result = container.ingest.dead_letter(data, env, exc)
                stats["files"] += 1
                if not result.accepted:
                    dead.append(result.error or "")
                    stats["dead letters"] += 1
                else:
                    stats["resources"] += len(result.parsed.resources) if result.parsed else 0
                    stats["duplicates"] += result.duplicate
                    stats["items sent"] += result.items_sent
                    stats["not enrolled (dropped)"] += sum(o.dropped_not_enrolled for o in result.outcomes.values())
                    kinds.update(result.discrepancies_by_kind)
                progress.advance(task)
        if dispatch:
            report = container.dispatcher.drain()
            stats["transactions delivered"] = getattr(report, "sent", 0)
    finally:
        container.close()
    table = Table(title="esource ingest")
    table.add_column("")
    table.add_column("count", justify="right")
    for k in ("files", "resources", "items sent", "duplicates", "not enrolled (dropped)", "dead letters",
              "transactions delivered"):
        if k in stats or k in ("files", "dead letters"):
            table.add_row(k, str(stats[k]))
    for kind, n in sorted(kinds.items()):
        table.add_row(f"discrepancy: {kind}", str(n))
    Console().print(table)
    for d in dead:
        console.print(f"[red]dead letter[/]: {d}")
    return 1 if dead else 0
