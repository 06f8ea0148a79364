"""Shared fixtures for the ODM tests: the CV01 metadata and a pseudonymizer."""

from __future__ import annotations

import pytest

from esource.privacy import Pseudonymizer
from esource.study.metadata import StudyMetadata, load_metadata
from odm_helpers import CV01_METADATA


@pytest.fixture(scope="session")
def cv01() -> StudyMetadata:
    return load_metadata(CV01_METADATA)


@pytest.fixture(scope="session")
def pseudonymizer() -> Pseudonymizer:
    return Pseudonymizer(b"test-key-for-odm-writer-0123456789")
