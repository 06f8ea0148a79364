"""Fixtures for the REDCap tests: the REDCap API emulator served by uvicorn on a free loopback port
(fresh, in memory, per test), the CV01 mapping and a RedcapConnector on it (helpers: redcap_helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from esource.connectors.emulators.redcap_api import DEFAULT_TOKEN, create_redcap_app
from esource.connectors.redcap import RedcapConnector, RedcapMapping
from esource.domain.ports import InMemoryEdcKeyMap
from esource.study.metadata import load_metadata
from redcap_helpers import METADATA_FILE, STUDY, RedcapServer


@pytest.fixture(scope="session")
def cv01_metadata():
    return load_metadata(METADATA_FILE)


@pytest.fixture(scope="session")
def mapping(cv01_metadata) -> RedcapMapping:
    return RedcapMapping.from_metadata(cv01_metadata)


@pytest.fixture
def redcap(mapping) -> Iterator[RedcapServer]:
    app = create_redcap_app(None, tokens={DEFAULT_TOKEN: STUDY}, project_xml_metadata=mapping)
    server = RedcapServer(app).start()
    try:
        yield server
    finally:
        server.stop()
        app.state.redcap.close()


@pytest.fixture
def key_map() -> InMemoryEdcKeyMap:
    return InMemoryEdcKeyMap()


@pytest.fixture
def connector(redcap, mapping, key_map) -> Iterator[RedcapConnector]:
    c = RedcapConnector(redcap.api, DEFAULT_TOKEN, key_map=key_map, mapping=mapping, timeout=0.5)
    yield c
    c.close()
