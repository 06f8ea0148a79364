"""Fixtures for the EDC contract suite (tests/contract/test_edc_contract.py).

Every `harness_*.py` module in this folder is imported here; each registers one or more harnesses in
`harness.HARNESSES` (see harness.py). The `edc` fixture runs every contract test once per registered
harness. A harness module that fails to import, or imports without registering anything, does NOT
quietly drop out: it becomes a parameter of `edc` whose every test fails with the import error.

`ESOURCE_CONTRACT_EDCS=sandbox,rave` limits the run to the named harnesses (default: all).

The contract tests run on the `store` fixture of tests/conftest.py: SQLite for every harness, and
PostgreSQL too when ESOURCE_TEST_POSTGRES_DSN is set — for the `sandbox` harness only: the dispatcher's database work
does not depend on the connector, and the vendor matrix on two databases would double the suite's
run time for no extra coverage.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # pytest puts it there already (no __init__.py); harness modules import `harness`
    sys.path.insert(0, str(HERE))

from harness import HARNESSES  # noqa: E402

POSTGRES_HARNESSES = {"sandbox"}  # the harnesses that also run on PostgreSQL (see the module docstring)


# ------------------------------------------------------------------------------------------ harnesses


def _import_harness_modules() -> dict[str, str]:
    """Import every harness_*.py; returns {module: error text} for those that failed, registered
    nothing, or took a name another module registered."""
    broken: dict[str, str] = {}
    for path in sorted(HERE.glob("harness_*.py")):
        name = path.stem
        before = dict(HARNESSES)
        try:
            importlib.import_module(name)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - pytest.skip() at import too: a harness must not skip itself
            broken[name] = "".join(traceback.format_exception(exc))
            continue
        changed = {n for n, factory in HARNESSES.items() if before.get(n) is not factory}
        if not changed:
            broken[name] = f"{path.name} imported but registered no harness (use @register(\"<name>\") from harness.py)"
        elif changed & set(before):
            taken = sorted(changed & set(before))
            broken[name] = f"{path.name} registered {taken}, already registered by another module"
    return broken


BROKEN_HARNESS_MODULES = _import_harness_modules()


def _selected() -> list[str]:
    names = sorted(HARNESSES)
    wanted = [n.strip() for n in os.environ.get("ESOURCE_CONTRACT_EDCS", "").split(",") if n.strip()]
    if wanted:
        unknown = sorted(set(wanted) - set(names) - {f"broken:{m}" for m in BROKEN_HARNESS_MODULES})
        if unknown:
            raise pytest.UsageError(f"ESOURCE_CONTRACT_EDCS names unknown harnesses {unknown}; known: {names}")
        names = [n for n in names if n in wanted]
    return names + [f"broken:{m}" for m in sorted(BROKEN_HARNESS_MODULES)]


EDC_PARAMS = _selected()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "edc" not in metafunc.fixturenames:
        return
    metafunc.parametrize("edc_name", EDC_PARAMS, ids=EDC_PARAMS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the PostgreSQL runs of harnesses outside POSTGRES_HARNESSES (see the module docstring)."""
    dropped = []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if (Path(str(item.fspath)).parent == HERE and params.get("store_url", "sqlite") != "sqlite"
                and params.get("edc_name") not in POSTGRES_HARNESSES):
            dropped.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        gone = {id(i) for i in dropped}
        items[:] = [i for i in items if id(i) not in gone]


@pytest.fixture
def edc_name(request: pytest.FixtureRequest) -> str:  # parametrized by pytest_generate_tests
    return request.param


@pytest.fixture
def edc(edc_name: str, store_url: str, tmp_path: Path) -> Iterator[Any]:
    """One EDC (emulator + connector) per test, fresh."""
    if edc_name.startswith("broken:"):
        module = edc_name.split(":", 1)[1]
        pytest.fail(f"harness module {module} is broken; the contract cannot run for it:\n"
                    f"{BROKEN_HARNESS_MODULES[module]}", pytrace=False)
    with HARNESSES[edc_name](tmp_path / f"edc-{edc_name}") as harness:
        yield harness


@pytest.fixture
def broken_harness_modules() -> dict[str, str]:
    return dict(BROKEN_HARNESS_MODULES)
