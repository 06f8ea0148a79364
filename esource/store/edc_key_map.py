"""`SqlEdcKeyMap`: the `EdcKeyMap` port (esource/domain/ports.py) on the store, for connectors whose
EDC needs integer repeat keys (Rave log lines, REDCap repeat instances).

    key_map = SqlEdcKeyMap(store)                      # or SqlEdcKeyMap(store.uow)
    n = key_map.edc_key("rave", "CV01", "001-0001", "SE.UNSCHED", "2024-05-03")   # 1, 2, 3 ...
    key_map.esource_key("rave", "CV01", "001-0001", "SE.UNSCHED", n)              # "2024-05-03"

Each call runs in its own short unit of work and commits before returning, so a key is durable
before the connector shows it to the EDC (a crash after the send finds the same key again).
Allocation is race-safe across threads and processes (see `SqlAlchemyUnitOfWork.edc_key`). Keys are
never changed or deleted, so answers are cached in memory (a lookup costs a database round trip
only the first time in a process).
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from esource.store.errors import StoreError

_Scope = tuple[str, str, str, str]


class SqlEdcKeyMap:
    """Implements `esource.domain.ports.EdcKeyMap`. Thread-safe."""

    def __init__(self, store_or_uow_factory: Any) -> None:
        factory = getattr(store_or_uow_factory, "uow", store_or_uow_factory)
        if not callable(factory):
            raise StoreError("SqlEdcKeyMap needs a Store or its uow factory")
        self._uow: Callable[..., Any] = factory
        self._lock = threading.Lock()
        self._fwd: dict[_Scope, dict[str, int]] = {}
        self._back: dict[_Scope, dict[int, str]] = {}

    def edc_key(self, connector: str, study_oid: str, subject_key: str, scope: str, esource_key: str) -> int:
        where: _Scope = (connector, study_oid, subject_key, scope)
        with self._lock:
            known = self._fwd.get(where, {}).get(esource_key)
        if known is not None:
            return known
        with self._uow(read_only=True) as uow:  # the common case: allocated before (no write lock)
            key = uow.find_edc_key(*where, esource_key)
        if key is None:
            with self._uow() as uow:
                key = uow.edc_key(*where, esource_key)
                uow.commit()
        self._remember(where, esource_key, key)
        return key

    def esource_key(self, connector: str, study_oid: str, subject_key: str, scope: str, edc_key: int) -> str | None:
        where: _Scope = (connector, study_oid, subject_key, scope)
        with self._lock:
            known = self._back.get(where, {}).get(int(edc_key))
        if known is not None:
            return known
        with self._uow(read_only=True) as uow:
            found = uow.esource_key(*where, int(edc_key))
        if found is not None:
            self._remember(where, found, int(edc_key))
        return found

    def _remember(self, where: _Scope, esource_key: str, edc_key: int) -> None:
        with self._lock:
            self._fwd.setdefault(where, {})[esource_key] = edc_key
            self._back.setdefault(where, {})[edc_key] = esource_key
