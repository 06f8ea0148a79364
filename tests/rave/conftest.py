"""Fixtures for the Rave tests: a fresh RWS emulator per test (in memory, CV01 metadata checked) on a
free loopback port, and a RaveConnector with an in-memory key map talking to it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rave_helpers import CONNECTOR_TIMEOUT, PASSWORD, USER, RaveServer
from esource.connectors.rave import RaveConnector
from esource.domain.ports import InMemoryEdcKeyMap
from esource.study.study import load_study


@pytest.fixture(scope="session")
def cv01_metadata():
    return load_study("CV01").metadata


@pytest.fixture
def rave(cv01_metadata) -> Iterator[RaveServer]:
    server = RaveServer(metadata={"CV01": cv01_metadata}).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def key_map() -> InMemoryEdcKeyMap:
    return InMemoryEdcKeyMap()


@pytest.fixture
def connector(rave, key_map) -> Iterator[RaveConnector]:
    c = RaveConnector(rave.url, USER, PASSWORD, key_map=key_map, timeout=CONNECTOR_TIMEOUT)
    try:
        yield c
    finally:
        c.close()
