"""The schema is created by the Alembic migrations, and they build exactly what schema.py models."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from esource.store import Store, make_engine, upgrade
from esource.store.migrate import alembic_config, current_revision, head_revision, is_up_to_date
from esource.store.schema import Base

MODEL_TABLES = {
    "enrollment",
    "enrollment_identifier",
    "intake",
    "subject_fact",
    "item_state",
    "repeat_key",
    "first_seen",
    "discrepancy",
    "outbox",
    "dead_letter",
    "edc_key_map",
    "audit_log",  # 0004: the hash-chained audit trail
    "audit_head",  # 0004: the chain's head (id and hash of the newest entry), locked by appenders
    "api_user",  # 0005: users and hashed API tokens of the role-based API
    "api_token",
    "outbox_visit",  # 0005: the StudyEventOIDs of each outbox transaction (transfers API visit filter)
    "review_policy",  # 0006: data managers' run-time review-before-send policy per form
}


def _tables(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return set(sa.inspect(conn).get_table_names())


def _diff(engine: sa.Engine, metadata: sa.MetaData) -> list:
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), metadata)


def test_models_cover_the_expected_tables():
    assert set(Base.metadata.tables) == MODEL_TABLES


def test_migrations_build_the_models_on_an_empty_database(store_url):
    engine = make_engine(store_url)
    try:
        assert _tables(engine) == set()
        assert current_revision(engine) is None
        upgrade(engine)
        assert _tables(engine) == MODEL_TABLES | {"alembic_version"}
        assert current_revision(engine) == head_revision()
        assert is_up_to_date(engine)
        assert _diff(engine, Base.metadata) == []
    finally:
        engine.dispose()


def test_the_comparison_does_see_a_drift(store_url):
    """Guard for the test above: a model that differs from the migrated schema is reported."""
    engine = make_engine(store_url)
    try:
        upgrade(engine)
        drifted = sa.MetaData()
        for table in Base.metadata.sorted_tables:
            table.to_metadata(drifted)
        drifted.tables["outbox"].append_column(sa.Column("priority", sa.Integer(), nullable=True))
        drifted.tables["outbox"].c["site_oid"].nullable = True  # a change in the model only
        diff = _diff(engine, drifted)
        added = [d[3].name for d in diff if isinstance(d, tuple) and d[0] == "add_column"]
        modified = [(m[0], m[2], m[3]) for d in diff if isinstance(d, list) for m in d]
        assert added == ["priority"]
        assert ("modify_nullable", "outbox", "site_oid") in modified
    finally:
        engine.dispose()


def test_upgrade_twice_is_harmless_and_accepts_a_url(store_url):
    upgrade(store_url)
    upgrade(store_url)
    engine = make_engine(store_url)
    try:
        assert current_revision(engine) == head_revision()
        assert _diff(engine, Base.metadata) == []
    finally:
        engine.dispose()


def test_store_migrates_on_open_unless_told_not_to(store_url):
    raw = Store(store_url, migrate=False)
    try:
        assert _tables(raw.engine) == set()
    finally:
        raw.dispose()
    migrated = Store(store_url)
    try:
        assert is_up_to_date(migrated.engine)
        with migrated.uow() as uow:
            assert uow.enrollments("CV01") == []
    finally:
        migrated.dispose()
    reopened = Store(store_url)  # an up-to-date database opens without changes
    try:
        assert is_up_to_date(reopened.engine)
    finally:
        reopened.dispose()


def test_downgrade_to_base_removes_every_table(store_url):
    engine = make_engine(store_url)
    try:
        upgrade(engine)
        with engine.begin() as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "base")
        assert _tables(engine) <= {"alembic_version"}
        assert current_revision(engine) is None
    finally:
        engine.dispose()
