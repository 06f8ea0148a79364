"""Fixtures of the service tests: the CV01 study and a Processor on the test's store."""

from __future__ import annotations

import pytest

from esource.study.study import load_study
from process_helpers import make_processor


@pytest.fixture(scope="module")
def study():
    return load_study("CV01")


@pytest.fixture
def processor(study, store, clock):
    return make_processor(study, store, clock)
