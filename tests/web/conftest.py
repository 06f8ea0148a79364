"""Fixtures of the dashboard tests: one demo-like world per test session (building it feeds the whole CV01
demo data set: about 15 s), a TestClient on its app, and - for the browser tests - the system Chromium
driven by Playwright (skipped, with the reason, when /usr/bin/chromium is absent)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from web_helpers import CHROMIUM, CHROMIUM_ARGS, World, build_world


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = build_world(tmp_path_factory.mktemp("web-world"))
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def client(world: World) -> Iterator[Any]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient` is deprecated")
        from fastapi.testclient import TestClient
    with TestClient(world.app, base_url="http://testserver", follow_redirects=False) as c:
        yield c


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (Debian packages chromium and chromium-driver; .ci/run installs "
                    "them): the end-to-end browser tests need the system Chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()
