"""Fixtures for the OpenClinica tests: the CV01 study, real ODM outbox rows made once per session by
esource's use case, and an OpenClinica 4 emulator served on loopback (fresh, in memory, per test)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from openclinica_helpers import TOKEN, A, B, Feeder, FixedClock, Served  # noqa: E402

from esource.connectors.emulators.openclinica_odm import StudyDesign, create_openclinica_app  # noqa: E402
from esource.connectors.openclinica import OpenClinicaConnector  # noqa: E402
from esource.store import Store  # noqa: E402
from esource.study.study import load_study  # noqa: E402



@pytest.fixture(scope="session")
def cv01() -> Any:
    return load_study("CV01")


@pytest.fixture(scope="session")
def design(cv01) -> StudyDesign:
    return StudyDesign.from_metadata(cv01.metadata)


@pytest.fixture(scope="session")
def rows(tmp_path_factory, cv01) -> dict[tuple[str, int], Any]:
    """(subject, sequence) -> outbox row: A1 (demographics + weight, Inserts), A2 (weight Update),
    A3 (height, Inserts), B1 (demographics + weight)."""
    store = Store(f"sqlite:///{tmp_path_factory.mktemp('oc-odm') / 'esource.db'}", clock=FixedClock())
    try:
        f = Feeder(cv01, store, [A, B])
        f.weight(A, 1)
        f.weight(A, 2)
        f.height(A)
        f.weight(B, 1)
        return {(e.subject_key, e.sequence): e for e in f.outbox()}
    finally:
        store.dispose()


@pytest.fixture
def make_oc(design) -> Iterator[Callable[..., Served]]:
    """Start an emulator: `make_oc(job_seconds=0.2, strict_repeat_keys=True, ...)`."""
    started: list[Served] = []

    def make(**options: Any) -> Served:
        options.setdefault("token", TOKEN)
        options.setdefault("metadata", design)
        served = Served(create_openclinica_app(None, **options)).start()
        started.append(served)
        return served

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def oc(make_oc) -> Served:
    return make_oc()


@pytest.fixture
def make_connector() -> Iterator[Callable[..., OpenClinicaConnector]]:
    made: list[OpenClinicaConnector] = []

    def make(served: Served, **options: Any) -> OpenClinicaConnector:
        options.setdefault("timeout", 5.0)  # a loaded CI machine can take seconds; timeout tests set their own
        options.setdefault("poll_initial", 0.005)
        options.setdefault("poll_max", 0.05)
        options.setdefault("poll_timeout", 5.0)
        c = OpenClinicaConnector(served.url, options.pop("token", TOKEN), **options)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()
