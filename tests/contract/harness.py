"""The shared EDC contract: every connector, with its emulator, is driven through one harness shape so
one test suite (tests/contract/test_edc_contract.py) runs against all of them.

A vendor registers a harness factory in HARNESSES (see harness_<vendor>.py files, imported by
tests/contract/conftest.py). Item keys are esource's:
(study_event_oid, study_event_repeat_key, form_oid, item_group_oid, item_group_repeat_key, item_oid),
repeat keys as esource writes them (the connector maps integer EDC keys back through its key map).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable, Protocol

from esource.domain.ports import EdcConnector

ItemPath = tuple[str, "str | None", str, str, "str | None", str]


class EdcHarness(Protocol):
    name: str
    connector: EdcConnector
    secrets: tuple[str, ...]  # the credentials the connector presents: never shown in a log, error or state

    def inject(self, mode: str, count: int = 1, *, retry_after: float | None = None, delay: float | None = None,
               after_commit: bool = False) -> None:
        """The next `count` requests that write clinical data fail this way. Modes every emulator supports:
        "500", "503", "429" (with Retry-After), "timeout" (answer later than the connector's timeout),
        "reset" (close the connection without a response), "reject" (a permanent validation rejection with
        the vendor's own code and message), "auth" (401/403 as the vendor answers). With after_commit=True
        the write is applied and THEN the failure is answered (the ambiguous case)."""
        ...

    def clear_faults(self) -> None: ...

    def values(self, study_oid: str, subject_key: str) -> dict[ItemPath, str]:
        """What the EDC holds now for the subject, in esource's keys (empty for an unknown subject)."""
        ...

    def site_edit(self, study_oid: str, subject_key: str, path: ItemPath, value: str) -> None:
        """Site staff change a value directly in the EDC (for conflict tests)."""
        ...

    def write_count(self) -> int:
        """How many clinical-data writes the EDC applied (a duplicate delivery must not add one)."""
        ...


HarnessFactory = Callable[[Path], AbstractContextManager[EdcHarness]]
HARNESSES: dict[str, HarnessFactory] = {}


def register(name: str) -> Callable[[HarnessFactory], HarnessFactory]:
    def deco(factory: HarnessFactory) -> HarnessFactory:
        HARNESSES[name] = factory
        return factory

    return deco
