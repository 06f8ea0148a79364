"""File adapter: size checked before reading, one-line IntakeErrors, directory expansion."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from esource.adapters.files import iter_input_files, read_input_file
from esource.errors import IntakeError
from esource.intake.parse import parse_fhir

DATA = Path(__file__).resolve().parents[1] / "data"


def test_reads_a_sample_file():
    path = DATA / "ips" / "HL7-IPS-IG-bundle-minimal.json"
    data = read_input_file(path, max_bytes=1_000_000)
    assert data == path.read_bytes()
    assert parse_fhir(data, str(path)).bundle_type == "document"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(IntakeError) as info:
        read_input_file(path, max_bytes=100)
    assert info.value.origin == str(path)
    assert str(info.value) == f"{path}: file not found"


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(IntakeError, match="is a directory"):
        read_input_file(tmp_path, max_bytes=100)


def test_too_large_is_checked_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "big.json"
    path.write_bytes(b"x" * 2000)

    def no_open(*args, **kwargs):  # the size check must come first
        raise AssertionError("file was opened")

    monkeypatch.setattr("builtins.open", no_open)
    with pytest.raises(IntakeError) as info:
        read_input_file(path, max_bytes=1000)
    assert info.value.problem == "file of 2000 bytes exceeds the limit of 1000 bytes"


def test_unreadable(tmp_path, monkeypatch):
    path = tmp_path / "secret.json"
    path.write_bytes(b"{}")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("builtins.open", denied)  # root can read anything: simulate the refusal
    with pytest.raises(IntakeError) as info:
        read_input_file(path, max_bytes=100)
    assert str(info.value) == f"{path}: permission denied"


def test_io_error_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    path.write_bytes(b"{}")

    def broken(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("builtins.open", broken)
    with pytest.raises(IntakeError, match="cannot read file: Input/output error"):
        read_input_file(path, max_bytes=100)


def test_fifo_is_refused(tmp_path):
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    with pytest.raises(IntakeError, match="not a regular file"):
        read_input_file(fifo, max_bytes=100)


def test_iter_input_files(tmp_path):
    (tmp_path / "b.json").write_text("{}")
    (tmp_path / "a.JSON").write_text("{}")
    (tmp_path / "c.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.json").write_text("{}")
    single = tmp_path / "sub" / "d.json"
    missing = tmp_path / "missing.json"
    got = list(iter_input_files([tmp_path, single, str(missing)]))
    assert got == [tmp_path / "a.JSON", tmp_path / "b.json", single, missing]


def test_iter_sample_directories():
    files = list(iter_input_files([DATA / "ips", DATA / "synthea"]))
    assert len(files) == 28
    assert files[:20] == sorted((DATA / "ips").glob("*.json"))
