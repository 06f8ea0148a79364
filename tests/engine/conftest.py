"""Fixtures for the engine tests: `study` (CV01), `engine`, and `run(resources, day1=..., consent=...,
withdrawn=...)` which builds SourceResources through the real intake (`parse_fhir` on an in-memory
collection Bundle) and returns the MappingResult.

The builders (`obs`, `patient`, `condition`, `med_statement`, ...) live in `engine_helpers.py` and are
re-exported here; test files import them from `engine_helpers`, because several test folders have a
`conftest.py` and a plain `import conftest` may find another folder's.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Iterable

import pytest

from engine_helpers import *  # noqa: F401,F403 - the builders, re-exported
from engine_helpers import DAY1, TODAY, bundle_bytes, enrollment
from esource.domain.model import MappingResult
from esource.intake.parse import parse_fhir
from esource.mapping.engine import MappingContext, MappingEngine
from esource.study.study import Study, load_study


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def study() -> Study:
    return load_study("CV01")


@pytest.fixture(scope="session")
def engine(study: Study) -> MappingEngine:
    return MappingEngine(study)


@pytest.fixture
def run(engine: MappingEngine):
    """run(resources, day1=..., consent=..., withdrawn=..., ctx=..., today=...) -> MappingResult."""

    def _run(resources: Iterable[dict[str, Any]], *, day1: dt.date = DAY1, consent: dt.date | None = None,
             withdrawn: dt.date | None = None, ctx: MappingContext | None = None,
             today: dt.date = TODAY) -> MappingResult:
        parsed = parse_fhir(bundle_bytes(resources), "test-bundle.json")
        ctx = ctx or MappingContext(today=today)
        return engine.map_subject(enrollment(day1, consent, withdrawn), parsed.resources, ctx,
                                  deletions=parsed.deletions,
                                  invalid_entries=[(None, str(p)) for p in parsed.problems])

    return _run
