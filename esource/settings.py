"""Settings: environment variables (ESOURCE_*, nested with `__`) over a YAML file over defaults.

Unsafe values are refused at start: outside demo mode a service needs an auth secret and a pseudonym
key (secrets only ever come from the environment, never from the YAML file). The flat variables the
compose file uses (ESOURCE_KAFKA_BOOTSTRAP, ESOURCE_EDC_URL ...) are accepted too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from esource.errors import StudyConfigError

CONFIG_ENV = "ESOURCE_CONFIG"
_FLAT_ENV = {  # flat names used by docker/compose.yaml -> nested keys
    "ESOURCE_KAFKA_BOOTSTRAP": ("kafka", "bootstrap"),
    "ESOURCE_KAFKA_TOPICS": ("kafka", "topics"),
    "ESOURCE_KAFKA_GROUP": ("kafka", "group"),
    "ESOURCE_KAFKA_DLQ_TOPIC": ("kafka", "dlq_topic"),
    "ESOURCE_EDC_URL": ("edc", "url"),
    "ESOURCE_EDC_CONNECTOR": ("edc", "connector"),
    "ESOURCE_HTTP_HOST": ("http", "host"),
    "ESOURCE_HTTP_PORT": ("http", "port"),
    "ESOURCE_LOG_LEVEL": ("log", "level"),
}
_SECRET_KEYS = ("auth_secret", "pseudonym_key")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HttpSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_depth: int = Field(64, ge=8, le=512)


class KafkaSettings(_Section):
    bootstrap: str | None = None  # no Kafka intake when unset
    topics: list[str] = ["ehr.fhir.updates"]
    group: str = "esource"
    dlq_topic: str = "ehr.fhir.deadletter"
    session_timeout_ms: int = Field(10_000, ge=1_000)
    heartbeat_interval_ms: int = Field(3_000, ge=100)
    max_message_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_poll_records: int = Field(200, ge=1)
    poll_timeout_ms: int = Field(500, ge=10)
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"

    @field_validator("topics", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return [t.strip() for t in v.split(",") if t.strip()] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _heartbeat(self) -> "KafkaSettings":
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError("kafka.heartbeat_interval_ms must be at most a third of kafka.session_timeout_ms")
        return self


class EdcSettings(_Section):
    connector: Literal["sandbox", "odm_file"] = "sandbox"
    url: str | None = None  # sandbox EDC base URL
    folder: Path | None = None  # odm_file drop folder
    timeout_s: float = Field(10.0, gt=0)
    max_attempts: int = Field(6, ge=1, le=50)


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_logs: bool = Field(True, alias="json")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ESOURCE_", env_nested_delimiter="__", extra="forbid")

    mode: Literal["demo", "production"] = "production"
    database_url: str = "sqlite:///var/esource/esource.sqlite"
    studies: list[str] = ["CV01"]
    maps_dir: Path | None = None
    enrollment_file: Path | None = None  # enrollments to load at start (YAML, as config/demo_enrollment.yaml)
    http: HttpSettings = HttpSettings()
    kafka: KafkaSettings = KafkaSettings()
    edc: EdcSettings = EdcSettings()
    log: LogSettings = LogSettings()
    auth_secret: SecretStr | None = None
    pseudonym_key: SecretStr | None = None

    @field_validator("studies", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return [t.strip() for t in v.split(",") if t.strip()] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _safe(self) -> "Settings":
        if self.mode != "demo":
            if self.auth_secret is None or len(self.auth_secret.get_secret_value()) < 32:
                raise ValueError("ESOURCE_AUTH_SECRET must be set (at least 32 characters) outside demo mode")
            if self.pseudonym_key is None or len(self.pseudonym_key.get_secret_value()) < 16:
                raise ValueError("ESOURCE_PSEUDONYM_KEY must be set (at least 16 characters) outside demo mode")
            if self.database_url.startswith("sqlite://") and ":memory:" in self.database_url:
                raise ValueError("an in-memory database loses every transaction on restart: not outside demo mode")
        if self.edc.connector == "sandbox" and not self.edc.url and self.mode != "demo":
            raise ValueError("edc.url (ESOURCE_EDC_URL) is required for the sandbox connector")
        if self.edc.connector == "odm_file" and self.edc.folder is None:
            raise ValueError("edc.folder is required for the odm_file connector")
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _FlatEnvSource(settings_cls), _YamlSource(settings_cls), file_secret_settings


class _FlatEnvSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for env, (section, key) in _FLAT_ENV.items():
            if env in os.environ:
                out.setdefault(section, {})[key] = os.environ[env]
        return out


class _YamlSource(PydanticBaseSettingsSource):
    path: Path | None = None

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _YamlSource.path
        if path is None:
            return {}
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise StudyConfigError(str(path), f"cannot read the settings file: {exc}") from None
        if not isinstance(data, dict):
            raise StudyConfigError(str(path), "the settings file must be a YAML mapping")
        for secret in _SECRET_KEYS:
            if secret in data:
                raise StudyConfigError(str(path), f"{secret} must come from the environment "
                                       f"(ESOURCE_{secret.upper()}), never from a file", key=secret)
        return data


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from the environment, the YAML file (argument, else $ESOURCE_CONFIG) and defaults.
    Raises StudyConfigError naming the key and the problem."""
    path = config_file or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    _YamlSource.path = path
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or None
        raise StudyConfigError(str(path or "environment"), err["msg"].removeprefix("Value error, "), key=key) from None
    finally:
        _YamlSource.path = None
