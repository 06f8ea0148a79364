"""Contract harness: the ODM file drop (connectors/odm_file.py) into a temporary folder.

The "EDC" is the folder: `values()` applies the dropped transaction files of a subject in sequence
order (Insert, Update, Upsert, Remove), as a collector would; `write_count()` counts transaction
files (a re-sent transaction replaces its own file: the name carries the transaction key).

Faults are what a file share can do, raised where the connector writes the file (so the connector
classifies them, as it would the operating system's): "500" an I/O error (EIO), "503" a busy share
(EAGAIN), "timeout" a network share timing out (ETIMEDOUT), "reset" a dropped SMB/NFS connection
(ECONNRESET), "auth" a permission error (EACCES: the connector's EdcAuthenticationError). With
after_commit the file is written first, then the error raised. A file drop has no rate limiting ("429") and no
synchronous validation answer ("reject"): those modes skip the test. It has no read-back either, so
`site_edit` skips (esource cannot see edits made on the EDC side of a file drop: no conflict check).
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from harness import ItemPath, register
from lxml import etree

from esource.connectors.odm_file import OdmFileConnector

_ERRORS: dict[str, tuple[type[OSError], int, str]] = {
    "500": (OSError, errno.EIO, "Input/output error"),
    "503": (BlockingIOError, errno.EAGAIN, "Resource temporarily unavailable (the share is busy)"),
    "timeout": (TimeoutError, errno.ETIMEDOUT, "Connection timed out (network share)"),
    "reset": (ConnectionResetError, errno.ECONNRESET, "Connection reset by peer (network share)"),
    "auth": (PermissionError, errno.EACCES, "Permission denied"),
}
_NOT_A_FILE_DROP = {
    "429": "a file drop has no rate limiting (no 429 / Retry-After)",
    "reject": "a file drop gives no synchronous validation answer (no permanent rejection)",
}


class FaultyFileDrop(OdmFileConnector):
    """The ODM file drop whose next file writes fail with OS errors, on demand."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self._lock = threading.Lock()
        self._faults: list[tuple[str, bool]] = []

    def plan(self, mode: str, count: int, after_commit: bool) -> None:
        with self._lock:
            self._faults = [(mode, after_commit)] * count

    def clear(self) -> None:
        with self._lock:
            self._faults = []

    def _write(self, target: Path, odm: bytes) -> None:
        with self._lock:
            fault = self._faults.pop(0) if self._faults else None
        if fault is None:
            return super()._write(target, odm)
        mode, after_commit = fault
        if after_commit:
            super()._write(target, odm)
        kind, code, text = _ERRORS[mode]
        raise kind(code, text + (" (after the file was written)" if after_commit else ""), str(target))


class OdmFileHarness:
    name = "odm_file"
    secrets: tuple[str, ...] = ()

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.connector = FaultyFileDrop(folder)

    def inject(self, mode: str, count: int = 1, *, retry_after: float | None = None, delay: float | None = None,
               after_commit: bool = False) -> None:
        if mode in _NOT_A_FILE_DROP:
            pytest.skip(f"odm_file: {_NOT_A_FILE_DROP[mode]}")
        if mode not in _ERRORS:
            raise ValueError(f"unknown fault mode {mode!r}")
        self.connector.plan(mode, count, after_commit)

    def clear_faults(self) -> None:
        self.connector.clear()

    def _files(self, study_oid: str | None = None, subject_key: str | None = None) -> list[Path]:
        if not self.folder.is_dir():
            return []
        prefix = f"{study_oid}_{subject_key}_" if study_oid is not None else ""
        return sorted(p for p in self.folder.glob(f"{prefix}*.xml") if not p.name.startswith(".partial-"))

    def values(self, study_oid: str, subject_key: str) -> dict[ItemPath, str]:
        state: dict[ItemPath, Any] = {}
        for path in self._files(study_oid, subject_key):  # zero-padded sequence: name order = sequence order
            root = etree.parse(str(path), etree.XMLParser(resolve_entities=False, no_network=True)).getroot()
            for cd in root.iterfind("{*}ClinicalData"):
                if cd.get("StudyOID") != study_oid:
                    continue
                for sd in cd.iterfind("{*}SubjectData"):
                    if sd.get("SubjectKey") != subject_key:
                        continue
                    for se in sd.iterfind("{*}StudyEventData"):
                        for fd in se.iterfind("{*}FormData"):
                            for ig in fd.iterfind("{*}ItemGroupData"):
                                for it in ig.iterfind("{*}ItemData"):
                                    key = (se.get("StudyEventOID"), se.get("StudyEventRepeatKey"), fd.get("FormOID"),
                                           ig.get("ItemGroupOID"), ig.get("ItemGroupRepeatKey"), it.get("ItemOID"))
                                    tt = it.get("TransactionType") or "Upsert"
                                    if tt == "Remove":
                                        state.pop(key, None)
                                    elif tt != "Context":
                                        state[key] = None if it.get("IsNull") == "Yes" else it.get("Value")
        return state

    def site_edit(self, study_oid: str, subject_key: str, path: ItemPath, value: str) -> None:
        pytest.skip("odm_file: edits on the EDC side of a file drop are invisible to esource (no read-back)")

    def write_count(self) -> int:
        return len(self._files())


@register("odm_file")
@contextmanager
def odm_file_harness(tmp_path: Path) -> Iterator[OdmFileHarness]:
    yield OdmFileHarness(tmp_path / "drop")
