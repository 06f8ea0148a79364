"""The database behind esource (SQLite by default, PostgreSQL by DSN): enrollment, intake keys,
subject facts, item state, repeat keys, first-seen dates, discrepancies, the outbox and the EDC key map.

`Store(url)` opens and migrates a database; `store.uow()` is a `UnitOfWork` (esource.domain.ports).
"""

from esource.store.edc_key_map import SqlEdcKeyMap
from esource.store.engine import make_engine
from esource.store.errors import AmbiguousEnrollmentError, StoreConflictError, StoreError
from esource.store.migrate import upgrade
from esource.store.sqlalchemy_uow import OutboxEntry, SqlAlchemyUnitOfWork, Store, discrepancy_natural_key

__all__ = [
    "AmbiguousEnrollmentError",
    "OutboxEntry",
    "SqlAlchemyUnitOfWork",
    "SqlEdcKeyMap",
    "Store",
    "StoreConflictError",
    "StoreError",
    "discrepancy_natural_key",
    "make_engine",
    "upgrade",
]
