"""Settings: env over YAML over defaults; unsafe values refused with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from esource.errors import StudyConfigError
from esource.settings import load_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "esource.example.yaml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for k in list(os.environ):
        if k.startswith("ESOURCE_") and k != "ESOURCE_TEST_POSTGRES_DSN":
            monkeypatch.delenv(k)


def test_production_refuses_to_start_without_secrets(monkeypatch):
    with pytest.raises(StudyConfigError, match="ESOURCE_AUTH_SECRET must be set"):
        load_settings()
    monkeypatch.setenv("ESOURCE_AUTH_SECRET", "short")
    with pytest.raises(StudyConfigError, match="at least 32"):
        load_settings()
    monkeypatch.setenv("ESOURCE_AUTH_SECRET", "a" * 32)
    with pytest.raises(StudyConfigError, match="ESOURCE_PSEUDONYM_KEY"):
        load_settings()


def test_demo_mode_runs_on_embedded_defaults():
    s = load_settings(mode="demo")
    assert s.database_url.startswith("sqlite:///") and s.kafka.bootstrap is None and s.studies == ["CV01"]


def test_example_file_with_env_overrides(monkeypatch):
    monkeypatch.setenv("ESOURCE_AUTH_SECRET", "a" * 40)
    monkeypatch.setenv("ESOURCE_PSEUDONYM_KEY", "k" * 20)
    monkeypatch.setenv("ESOURCE_KAFKA__GROUP", "group-from-env")
    monkeypatch.setenv("ESOURCE_EDC_URL", "http://edc.internal:8090")
    s = load_settings(EXAMPLE)
    assert s.kafka.bootstrap == "127.0.0.1:9092" and s.kafka.group == "group-from-env"
    assert s.edc.url == "http://edc.internal:8090" and s.database_url.startswith("postgresql+psycopg://")
    assert "a" * 40 not in repr(s)  # secrets are masked


def test_secrets_in_a_file_are_refused(tmp_path, monkeypatch):
    f = tmp_path / "s.yaml"
    f.write_text("mode: demo\nauth_secret: " + "x" * 40 + "\n")
    with pytest.raises(StudyConfigError, match="must come from the environment") as e:
        load_settings(f)
    assert e.value.key == "auth_secret"


@pytest.mark.parametrize("text,key", [
    ("mode: demo\nkafka: {session_timeout_ms: 3000, heartbeat_interval_ms: 2000}\n", "kafka"),
    ("mode: demo\nhttp: {port: 70000}\n", "http.port"),
    ("mode: demo\nkafkaa: {}\n", "kafkaa"),
    ("mode: demo\nedc: {connector: odm_file}\n", None),
])
def test_invalid_values_name_the_key(tmp_path, text, key):
    f = tmp_path / "s.yaml"
    f.write_text(text)
    with pytest.raises(StudyConfigError) as e:
        load_settings(f)
    if key:
        assert e.value.key is not None and e.value.key.startswith(key)


def test_in_memory_database_refused_in_production(monkeypatch):
    monkeypatch.setenv("ESOURCE_AUTH_SECRET", "a" * 40)
    monkeypatch.setenv("ESOURCE_PSEUDONYM_KEY", "k" * 20)
    monkeypatch.setenv("ESOURCE_EDC_URL", "http://e")
    with pytest.raises(StudyConfigError, match="in-memory"):
        load_settings(database_url="sqlite:///:memory:")
