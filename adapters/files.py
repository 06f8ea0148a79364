"""File inbound adapter: read FHIR JSON files (and directories of them) safely.

Installed as ``esource.adapters.files``. Every failure is an IntakeError naming the file, so the CLI
prints one line per bad file instead of a traceback.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from esource.errors import IntakeError

__all__ = ["DEFAULT_MAX_BYTES", "iter_input_files", "read_input_file"]

DEFAULT_MAX_BYTES = 20 * 1024 * 1024


def read_input_file(path: Path | str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of one input file. The size is checked before reading (and again while reading, in
    case the file grows); directories, devices and FIFOs are refused."""
    path = Path(path)
    origin = str(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise IntakeError(origin, "file not found") from None
    except PermissionError:
        raise IntakeError(origin, "permission denied") from None
    except OSError as exc:
        raise IntakeError(origin, f"cannot read file: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise IntakeError(origin, "is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise IntakeError(origin, "not a regular file")
    if st.st_size > max_bytes:
        raise IntakeError(origin, f"file of {st.st_size} bytes exceeds the limit of {max_bytes} bytes")
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except PermissionError:
        raise IntakeError(origin, "permission denied") from None
    except OSError as exc:
        raise IntakeError(origin, f"cannot read file: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise IntakeError(origin, f"file exceeds the limit of {max_bytes} bytes")
    return data


def iter_input_files(paths: Iterable[Path | str]) -> Iterator[Path]:
    """The files to read, in order: a directory expands to its ``*.json`` files (not recursive,
    sorted by name, suffix case-insensitive); any other path is yielded as given, so a missing file
    is reported by `read_input_file` with its name."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            try:
                names = sorted(os.listdir(path))
            except OSError as exc:
                raise IntakeError(str(path), f"cannot list directory: {exc.strerror or exc}") from None
            for name in names:
                child = path / name
                if name.lower().endswith(".json") and child.is_file():
                    yield child
        else:
            yield path
