#!/usr/bin/env python3
"""Mapping throughput: FHIR resources/s through intake -> map -> ODM bytes, on the same Synthea
bundles as the reference peer pipeline (fhir.resources + fhirpathpy + odmlib) and its floor
(orjson + lxml). Prints the median of several runs and the ratios. Run on demand:

    ./dev bench                     (or .venv/bin/python benchmarks/map_throughput.py [--runs 5] [FILES...])

Targets (issue 2): >= 10x the peer, within 5x the floor. The peer lives in ../shared/bench/ (only on the
developers' machines); without it the script prints esource's own figures only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from esource.intake.parse import parse_fhir  # noqa: E402
from esource.intake.validate import clear_validation_cache  # noqa: E402
from esource.mapping.engine import MappingContext, MappingEngine  # noqa: E402
from esource.privacy import Pseudonymizer  # noqa: E402
from esource.services.dry_run import DryRun, adhoc_enrollment, snapshot_odm  # noqa: E402
from esource.study.study import load_study  # noqa: E402

PEER = ROOT.parent / "shared" / "bench" / "peer_pipeline.py"


def day1_for(data: bytes) -> dt.date:
    """A Day 1 that puts the bundle's last lab/vitals encounter at Baseline (so every form maps)."""
    doc = orjson.loads(data)
    dates = [e["resource"].get("effectiveDateTime", "")[:10] for e in doc.get("entry", [])
             if e.get("resource", {}).get("resourceType") == "Observation"]
    dates = [d for d in dates if len(d) == 10]
    return dt.date.fromisoformat(max(dates)) if dates else dt.date(2020, 1, 1)


def esource_run(study, files: list[tuple[Path, bytes, dt.date]]) -> tuple[int, float, int]:
    clear_validation_cache()  # no help from earlier runs
    engine = MappingEngine(study)
    pseudo = Pseudonymizer(b"benchmark-key-0123456789")
    n = items = 0
    t = time.perf_counter()
    for i, (path, data, day1) in enumerate(files):
        parsed = parse_fhir(data, path.name)
        n += len(parsed.resources)
        enrollment = adhoc_enrollment(study, f"001-{i:04d}", "SITE.001", day1)
        result = engine.map_subject(enrollment, parsed.resources, MappingContext(today=dt.date(2026, 1, 1)),
                                    deletions=parsed.deletions)
        items += len(result.items)
        snapshot_odm(study, DryRun(enrollment, result), pseudo)
    return n, time.perf_counter() - t, items


def peer_run(mode: str, paths: list[Path]) -> tuple[int, float] | None:
    if not PEER.exists():
        return None
    out = subprocess.run([sys.executable, str(PEER), mode, *map(str, paths)], capture_output=True, text=True,
                         check=True).stdout
    m = re.search(r"(\d+) resources in ([\d.]+) s", out)
    if not m:
        raise RuntimeError(f"unexpected peer output: {out!r}")
    return int(m.group(1)), float(m.group(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    paths = args.files or sorted((ROOT / "tests" / "data" / "synthea").glob("*.json"))
    if not paths:
        sys.exit("no input files")
    study = load_study("CV01")
    files = [(p, p.read_bytes(), day1_for(p.read_bytes())) for p in paths]
    esource_run(study, files[:1])  # warm-up: imports, ucumvert registry, fhir.resources models
    mb = sum(len(d) for _, d, _ in files) / 1e6
    print(f"{len(paths)} Synthea bundles, {mb:.1f} MB, median of {args.runs} runs")

    rates = []
    for _ in range(args.runs):
        n, secs, items = esource_run(study, files)
        rates.append(n / secs)
    ours = statistics.median(rates)
    print(f"  esource (intake -> map -> ODM):   {ours:>10,.0f} resources/s   ({n} resources -> {items} ItemData)")

    results = {}
    for mode in ("peer", "floor"):
        runs = []
        for _ in range(args.runs if mode == "floor" else max(1, min(args.runs, 3))):
            r = peer_run(mode, paths)
            if r is None:
                break
            runs.append(r[0] / r[1])
        if runs:
            results[mode] = statistics.median(runs)
            print(f"  {mode:<5} ({'fhir.resources + fhirpathpy + odmlib' if mode == 'peer' else 'orjson + lxml'}):"
                  f"{' ' * (7 if mode == 'peer' else 26)}{results[mode]:>10,.0f} resources/s")
    if not results:
        print(f"  (peer pipeline not found at {PEER}: no comparison)")
        return
    if "peer" in results:
        print(f"  esource / peer  = {ours / results['peer']:.1f}x   (target >= 10x)")
    if "floor" in results:
        print(f"  floor / esource = {results['floor'] / ours:.1f}x   (target <= 5x)")


if __name__ == "__main__":
    main()
