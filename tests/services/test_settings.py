"""Settings: env over YAML over defaults; unsafe values refused with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from esource.errors import StudyConfigError
from esource.settings import load_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "esource.example.yaml"


pytestmark = pytest.mark.usefixtures("clean_esource_env")


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


# ------------------------------------------------------------------------------------------ EDC endpoints

TOKEN32 = "0123456789ABCDEF0123456789ABCDEF"


@pytest.fixture
def production(monkeypatch):
    monkeypatch.setenv("ESOURCE_AUTH_SECRET", "a" * 40)
    monkeypatch.setenv("ESOURCE_PSEUDONYM_KEY", "k" * 20)


def test_rave_from_the_environment_with_the_old_and_new_names(production, monkeypatch):
    monkeypatch.setenv("ESOURCE_EDC_CONNECTOR", "rave")
    monkeypatch.setenv("ESOURCE_EDC_URL", "https://acme.mdsol.com")
    monkeypatch.setenv("ESOURCE_EDC__USERNAME", "rws.esource")
    monkeypatch.setenv("ESOURCE_EDC_PASSWORD", "Pa55-from-env")
    monkeypatch.setenv("ESOURCE_EDC__ENVIRONMENT", "UAT")
    s = load_settings()
    rave = s.edc.for_study("CV01")
    assert (rave.connector, rave.url, rave.environment) == ("rave", "https://acme.mdsol.com", "UAT")
    assert rave.username.get_secret_value() == "rws.esource" and rave.password.get_secret_value() == "Pa55-from-env"
    assert "Pa55-from-env" not in repr(s) and "Pa55-from-env" not in str(s.model_dump())
    assert "rws.esource" not in repr(s)


def test_a_study_entry_overrides_the_default_and_takes_its_credentials_from_the_environment(production, tmp_path,
                                                                                              monkeypatch):
    f = tmp_path / "s.yaml"
    f.write_text("studies: [CV01, CV02]\n"
                 "edc:\n"
                 "  connector: rave\n"
                 "  url: https://acme.mdsol.com\n"
                 "  timeout_s: 20\n"
                 "  studies:\n"
                 "    CV01:\n"
                 "      connector: redcap\n"
                 "      url: https://redcap.example.org/api/\n"
                 "      redcap: {arm: 2, event_names: {SE.BASELINE: baseline_arm_2}}\n"
                 "    CV02: {environment: DEV}\n")
    monkeypatch.setenv("ESOURCE_EDC__USERNAME", "rws.esource")
    monkeypatch.setenv("ESOURCE_EDC__PASSWORD", "rave-pw")
    monkeypatch.setenv("ESOURCE_EDC__STUDIES__CV01__TOKEN", TOKEN32)  # read in lower case: matched anyway
    s = load_settings(f)
    cv01, cv02 = s.edc.for_study("CV01"), s.edc.for_study("CV02")
    assert (cv01.connector, cv01.url, cv01.timeout_s) == ("redcap", "https://redcap.example.org/api/", 20)
    assert cv01.token.get_secret_value() == TOKEN32
    assert cv01.username is None and cv01.password is None  # another connector: Rave's login is not inherited
    assert cv01.redcap.arm == 2 and cv01.redcap.event_names == {"SE.BASELINE": "baseline_arm_2"}
    assert cv01.redcap.item_prefix == "IT."
    assert (cv02.connector, cv02.url, cv02.environment) == ("rave", "https://acme.mdsol.com", "DEV")
    assert cv02.password.get_secret_value() == "rave-pw"  # same connector: the default's login
    assert TOKEN32 not in repr(s)


@pytest.mark.parametrize("where, key, env", [
    ("edc: {connector: rave, url: 'https://r', password: p4ss}", "edc.password", "ESOURCE_EDC__PASSWORD"),
    ("edc: {connector: rave, url: 'https://r', username: u}", "edc.username", "ESOURCE_EDC__USERNAME"),
    ("edc: {url: 'http://e', api_key: p4ss}", "edc.api_key", "ESOURCE_EDC__API_KEY"),
    ("edc: {url: 'http://e', studies: {CV01: {connector: redcap, url: 'https://r', token: p4ss}}}",
     "edc.studies.CV01.token", "ESOURCE_EDC__STUDIES__CV01__TOKEN"),
])
def test_edc_credentials_in_a_file_are_refused_without_showing_them(tmp_path, production, where, key, env):
    f = tmp_path / "s.yaml"
    f.write_text(where + "\n")
    with pytest.raises(StudyConfigError) as e:
        load_settings(f)
    assert e.value.key == key and env in str(e.value) and "p4ss" not in str(e.value)


@pytest.mark.parametrize("env, message", [
    ({"ESOURCE_EDC_CONNECTOR": "rave", "ESOURCE_EDC_URL": "https://r", "ESOURCE_EDC__USERNAME": "u"},
     "edc.password (ESOURCE_EDC_PASSWORD) is required for the rave connector"),
    ({"ESOURCE_EDC_CONNECTOR": "redcap", "ESOURCE_EDC_URL": "https://r/api/"},
     "edc.token (ESOURCE_EDC_TOKEN) is required for the redcap connector"),
    ({"ESOURCE_EDC_CONNECTOR": "redcap", "ESOURCE_EDC_URL": "https://r/api/", "ESOURCE_EDC_TOKEN": "short-s3cret"},
     "a REDCap API token has 32 characters (this one has 12)"),
    ({"ESOURCE_EDC_CONNECTOR": "openclinica", "ESOURCE_EDC_TOKEN": "t"},
     "edc.url (ESOURCE_EDC_URL) is required for the openclinica connector"),
    ({"ESOURCE_EDC_URL": "http://e", "ESOURCE_EDC__STUDIES__CV01__CONNECTOR": "openclinica",
      "ESOURCE_EDC__STUDIES__CV01__URL": "https://oc/OpenClinica"},
     "edc.studies.CV01.token (ESOURCE_EDC__STUDIES__CV01__TOKEN) is required for the openclinica connector"),
    ({"ESOURCE_EDC_URL": "http://e", "ESOURCE_EDC__STUDIES__XX99__TIMEOUT_S": "3"},
     "edc.studies.xx99: xx99 is not one of the configured studies (CV01)"),
    ({"ESOURCE_EDC_URL": "https://edc-user:s3cret@edc.example"}, "the URL carries a password"),
])
def test_missing_or_unsafe_edc_settings_name_the_key(production, monkeypatch, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(StudyConfigError) as e:
        load_settings()
    assert message in str(e.value)
    assert "s3cret" not in str(e.value)


def test_the_example_and_docker_files_describe_valid_edc_endpoints(production, monkeypatch):
    monkeypatch.setenv("ESOURCE_EDC_URL", "http://edc.internal:8090")
    s = load_settings(EXAMPLE)
    assert s.edc.for_study("CV01").connector == "sandbox" and s.edc.auth_recheck_s > 0


def test_the_docker_settings_file_with_a_vendor_edc_from_the_environment(production, monkeypatch):
    docker_file = Path(__file__).resolve().parents[2] / "docker" / "esource.docker.yaml"
    monkeypatch.setenv("ESOURCE_EDC_CONNECTOR", "openclinica")
    monkeypatch.setenv("ESOURCE_EDC_URL", "https://oc.example/OpenClinica")
    with pytest.raises(StudyConfigError, match="ESOURCE_EDC_TOKEN"):
        load_settings(docker_file)
    monkeypatch.setenv("ESOURCE_EDC_TOKEN", "oc-bearer-token")
    oc = load_settings(docker_file).edc.for_study("CV01")
    assert (oc.connector, oc.url, oc.token.get_secret_value()) == ("openclinica", "https://oc.example/OpenClinica",
                                                                   "oc-bearer-token")
