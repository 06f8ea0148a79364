"""`esource` command line. Entry points only translate input into use cases and errors into answers:
a one-line message on stderr and exit code 2 for input that cannot be used, never a traceback."""

from __future__ import annotations

import datetime as dt
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from esource.errors import EsourceError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="esource: FHIR patient summaries to CDISC ODM eCRFs, with lineage and discrepancies.")


class OutputFormat(str, Enum):
    odm = "odm"
    lineage = "lineage"


def _fail(message: str, code: int = 2) -> None:
    sys.stderr.write(f"esource: {message}\n")
    raise typer.Exit(code)


def _date(value: str | None, name: str) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        _fail(f"{name} must be a date YYYY-MM-DD, got {value!r}")
    return None


@app.command("map")
def map_command(
    files: Annotated[list[Path], typer.Argument(help="FHIR JSON files (Bundles or single resources) of one patient")],
    study: Annotated[str, typer.Option("--study", help="study OID (a folder in cdisc_maps/)")],
    subject_key: Annotated[str, typer.Option("--subject-key", help="the study SubjectKey, e.g. 001-0007")],
    site: Annotated[str, typer.Option("--site", help="the SiteOID, e.g. SITE.001")],
    day1: Annotated[str, typer.Option("--day1", help="Day 1 (randomisation), YYYY-MM-DD")],
    consent: Annotated[Optional[str], typer.Option("--consent", help="consent date (default: Day 1 - 28 days)")] = None,
    withdrawn: Annotated[Optional[str], typer.Option("--withdrawn", help="withdrawal date")] = None,
    output_format: Annotated[OutputFormat, typer.Option("--format", help="odm (ODM 1.3.2 Snapshot) or lineage (JSON)")] = OutputFormat.odm,
) -> None:
    """Dry run for one patient: map FILE... and write ODM (or lineage JSON) to stdout. Keeps no state."""
    from esource.mapping.engine import MappingEngine
    from esource.privacy import Pseudonymizer
    from esource.services.dry_run import adhoc_enrollment, dry_run, lineage, snapshot_odm
    from esource.study.study import load_study

    d1 = _date(day1, "--day1")
    assert d1 is not None
    try:
        st = load_study(study)
        enrollment = adhoc_enrollment(st, subject_key, site, d1, _date(consent, "--consent"),
                                      _date(withdrawn, "--withdrawn"))
        engine = MappingEngine(st)
        run = dry_run(st, engine, enrollment, files)
        pseudonymizer = Pseudonymizer.from_env(allow_demo_key=True)
        if output_format is OutputFormat.lineage:
            sys.stdout.write(json.dumps(lineage(run, pseudonymizer), indent=2, ensure_ascii=False) + "\n")
        else:
            sys.stdout.buffer.write(snapshot_odm(st, run, pseudonymizer))
            sys.stdout.buffer.write(b"\n")
        sys.stdout.flush()
    except EsourceError as exc:
        _fail(str(exc).replace("\n", " "))


@app.command("demo")
def demo_command(
    workdir: Annotated[Path, typer.Option("--workdir", help="where the demo keeps its SQLite store and ODM files")] = Path("var/demo"),
    reset: Annotated[bool, typer.Option("--reset/--keep", help="start from an empty store")] = True,
) -> None:
    """Run the main job on embedded defaults: the demo enrollment and sample data through the engine,
    state in SQLite, the ODM that would be sent written to files, and a summary."""
    from esource.services.demo import run_demo

    try:
        run_demo(workdir, reset=reset)
    except EsourceError as exc:
        _fail(str(exc).replace("\n", " "))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
