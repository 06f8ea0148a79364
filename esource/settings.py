"""Settings: environment variables (ESOURCE_*, nested with `__`) over a YAML file over defaults.

Unsafe values are refused at start: outside demo mode a service needs an auth secret and a pseudonym
key (secrets only ever come from the environment, never from the YAML file). The flat variables the
compose file uses (ESOURCE_KAFKA_BOOTSTRAP, ESOURCE_EDC_URL ...) are accepted too.

EDC delivery (`edc`): a default endpoint (connector sandbox | odm_file | rave | redcap | openclinica,
its URL or folder, its knobs) and per-study endpoints under `edc.studies.<StudyOID>` that override it.
Every study in `studies` must end up with what its connector needs. EDC credentials (username,
password, token, api_key) are refused in the file too: ESOURCE_EDC__PASSWORD (or ESOURCE_EDC_PASSWORD),
ESOURCE_EDC__STUDIES__CV01__TOKEN ... They are SecretStr: never in a repr, a log or an error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

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
    "ESOURCE_EDC_FOLDER": ("edc", "folder"),
    "ESOURCE_EDC_USERNAME": ("edc", "username"),
    "ESOURCE_EDC_PASSWORD": ("edc", "password"),
    "ESOURCE_EDC_TOKEN": ("edc", "token"),
    "ESOURCE_HTTP_HOST": ("http", "host"),
    "ESOURCE_HTTP_PORT": ("http", "port"),
    "ESOURCE_LOG_LEVEL": ("log", "level"),
}
_SECRET_KEYS = ("auth_secret", "pseudonym_key")
_EDC_CREDENTIALS = ("username", "password", "token", "api_key")  # in `edc` and in each `edc.studies` entry


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
    max_poll_records: int = Field(500, ge=1)
    # a batch = polls gathered until batch_linger_ms after the previous batch was gathered (its processing
    # time counts), at most batch_max_records; one unit of work each
    batch_max_records: int = Field(2000, ge=1)
    batch_linger_ms: int = Field(200, ge=0, le=10_000)
    poll_timeout_ms: int = Field(500, ge=10)
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    # consumer processes of the service (esource.services.kafka_workers): 1 = the consumer runs in the
    # service process; more needs PostgreSQL (SQLite has one writer: workers would queue behind it)
    workers: int = Field(1, ge=1, le=32)

    @field_validator("topics", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return [t.strip() for t in v.split(",") if t.strip()] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _heartbeat(self) -> "KafkaSettings":
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError("kafka.heartbeat_interval_ms must be at most a third of kafka.session_timeout_ms")
        return self


EdcConnectorKind = Literal["sandbox", "odm_file", "rave", "redcap", "openclinica"]


class RedcapNamingSettings(_Section):
    """How a study's ODM OIDs name its REDCap project (`esource.connectors.redcap.RedcapNaming`): the
    derived rule (prefix dropped, lower case, `_arm_<n>` on events) and, for a project built by hand,
    explicit names that win over the rule."""

    item_prefix: str = "IT."
    form_prefix: str = "F."
    event_prefix: str = ""
    arm: int = Field(1, ge=1)
    record_id_field: str = Field("record_id", min_length=1)
    event_names: dict[str, str] = {}  # StudyEventOID -> unique event name, e.g. SE.BASELINE: baseline_arm_1
    instrument_names: dict[str, str] = {}  # FormOID -> instrument name, e.g. F.VS: vital_signs
    field_names: dict[str, str] = {}  # ItemOID -> field name, e.g. IT.VS.VSORRES: vs_result


class EdcEndpoint(_Section):
    """One EDC endpoint: which connector, where it is and how to log in. Credentials (username,
    password, token, api_key) come from the environment only; a URL never carries them."""

    connector: EdcConnectorKind = "sandbox"
    url: str | None = None  # sandbox base URL | Rave URL (or Medidata URL name) | REDCap API URL | OpenClinica root
    folder: Path | None = None  # odm_file: the drop folder (one subfolder per study)
    timeout_s: float = Field(10.0, gt=0)
    username: SecretStr | None = None  # rave: the RWS user
    password: SecretStr | None = None  # rave
    token: SecretStr | None = None  # redcap: the project's API token | openclinica: an OAuth bearer token
    api_key: SecretStr | None = None  # sandbox: optional bearer key
    environment: str = Field("PROD", min_length=1)  # rave: study CV01 is Rave's CV01(PROD)
    verify_before_send: bool = True  # rave, redcap: read the subject back before every write
    poll_initial_s: float = Field(0.5, gt=0)  # openclinica: the import job's polling
    poll_max_s: float = Field(5.0, gt=0)
    poll_timeout_s: float = Field(120.0, gt=0)
    redcap: RedcapNamingSettings = RedcapNamingSettings()

    @field_validator("url")
    @classmethod
    def _no_userinfo(cls, v: str | None) -> str | None:
        if v is not None and urlsplit(v).password is not None:
            raise ValueError("the URL carries a password: give credentials as username/password/token/api_key "
                             "from the environment instead")
        return v

    def missing(self, *, demo: bool) -> list[str]:
        """The keys this connector needs that are not set."""
        need = {"sandbox": () if demo else ("url",), "odm_file": ("folder",), "rave": ("url", "username", "password"),
                "redcap": ("url", "token"), "openclinica": ("url", "token")}[self.connector]
        return [key for key in need if getattr(self, key) in (None, "")]


# what a study entry naming another connector than the default does not take over from the default
_ENDPOINT_IDENTITY = ("url", "folder", "username", "password", "token", "api_key", "environment")


class EdcSettings(EdcEndpoint):
    """The default EDC endpoint, the dispatcher's knobs, and per-study endpoints (`studies`).

    A study entry overrides the default key by key. An entry naming another `connector` than the
    default keeps only the general keys of the default (timeout_s, verify_before_send, poll_*): where
    and who (url, folder, credentials, environment, redcap naming) are then its own. Study keys match
    case-insensitively, the exact spelling first (environment variable names are read in lower case:
    ESOURCE_EDC__STUDIES__CV01__TOKEN lands on `cv01`)."""

    max_attempts: int = Field(6, ge=1, le=50)
    auth_recheck_s: float = Field(900.0, ge=0)  # after the EDC refused esource's credentials; 0: until restart
    studies: dict[str, EdcEndpoint] = {}

    def entries(self, study_oid: str) -> list[EdcEndpoint]:
        exact = [v for k, v in self.studies.items() if k == study_oid]
        return exact + [v for k, v in self.studies.items() if k != study_oid and k.lower() == study_oid.lower()]

    def for_study(self, study_oid: str) -> EdcEndpoint:
        """The endpoint of one study: the default with the study's entries over it."""
        merged: dict[str, Any] = {name: getattr(self, name) for name in EdcEndpoint.model_fields}
        naming: dict[str, Any] = self.redcap.model_dump()
        for entry in self.entries(study_oid):
            given = entry.model_dump(exclude_unset=True)
            if given.get("connector", merged["connector"]) != merged["connector"]:
                merged.update({key: EdcEndpoint.model_fields[key].get_default() for key in _ENDPOINT_IDENTITY})
                naming = RedcapNamingSettings().model_dump()
            naming.update(given.pop("redcap", {}))
            merged.update(given)
        merged["redcap"] = naming
        return EdcEndpoint.model_validate(merged)


def edc_env_name(key: str, study_oid: str | None = None) -> str:
    """The environment variable of an EDC key, for messages (`ESOURCE_EDC__STUDIES__CV01__TOKEN`)."""
    return f"ESOURCE_EDC__STUDIES__{study_oid.upper()}__{key.upper()}" if study_oid else f"ESOURCE_EDC__{key.upper()}"


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_logs: bool = Field(True, alias="json")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class AuthSettings(_Section):
    """API authentication (esource.api.auth). OIDC is on when `oidc_issuer` is set: JWTs are checked
    against the keys of `oidc_jwks_file` and/or `oidc_public_keys` (PEM text or paths), the issuer, the
    audience and the algorithm allow-list (asymmetric only, never 'none'). Roles, sites and studies come
    from the named claims (dotted paths, e.g. `realm_access.roles`)."""

    oidc_issuer: str | None = None
    oidc_audience: str | None = None
    oidc_jwks_file: Path | None = None
    oidc_public_keys: list[str] = []
    oidc_algorithms: list[str] = ["RS256"]
    oidc_role_claim: str = "roles"
    oidc_site_claim: str = "sites"
    oidc_study_claim: str = "studies"
    oidc_username_claim: str = "preferred_username"
    oidc_leeway_s: int = Field(30, ge=0, le=300)
    token_ttl_days: int = Field(90, ge=0, le=3650)  # default lifetime of API tokens (0: no expiry)

    @field_validator("oidc_algorithms", "oidc_public_keys", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return [t.strip() for t in v.split(",") if t.strip()] if isinstance(v, str) and "-----" not in v else v

    @model_validator(mode="after")
    def _safe(self) -> "AuthSettings":
        if any(a.lower() == "none" or a.upper().startswith("HS") for a in self.oidc_algorithms):
            raise ValueError("auth.oidc_algorithms: only asymmetric algorithms (RS256, ES256 ...), never none/HS*")
        if self.oidc_issuer and not self.oidc_audience:
            raise ValueError("auth.oidc_audience is required with auth.oidc_issuer")
        if self.oidc_issuer and not (self.oidc_jwks_file or self.oidc_public_keys):
            raise ValueError("auth.oidc_issuer needs keys: auth.oidc_jwks_file or auth.oidc_public_keys")
        return self


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
    auth: AuthSettings = AuthSettings()
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
        if self.kafka.workers > 1 and not self.database_url.startswith("postgresql"):
            raise ValueError(f"kafka.workers is {self.kafka.workers}: more than one Kafka worker needs PostgreSQL "
                             "(SQLite has one writer, the workers would only wait for each other)")
        self._check_edc()
        return self

    def _check_edc(self) -> None:
        """Every configured study gets a complete endpoint; per-study entries name configured studies."""
        for key in self.edc.studies:
            if not any(key.lower() == oid.lower() for oid in self.studies):
                raise ValueError(f"edc.studies.{key}: {key} is not one of the configured studies "
                                 f"({', '.join(self.studies)})")
        for oid in self.studies:
            endpoint = self.edc.for_study(oid)
            own = oid if self.edc.entries(oid) else None
            where = f"edc.studies.{oid}" if own else "edc"
            for key in endpoint.missing(demo=self.mode == "demo"):
                env = edc_env_name(key, own) if own else f"ESOURCE_EDC_{key.upper()}"
                raise ValueError(f"{where}.{key} ({env}) is required for the {endpoint.connector} connector "
                                 f"(study {oid})")
            token = endpoint.token.get_secret_value() if endpoint.token is not None else ""
            if endpoint.connector == "redcap" and len(token) != 32:
                raise ValueError(f"{where}.token: a REDCap API token has 32 characters (this one has {len(token)})")
            if endpoint.poll_max_s < endpoint.poll_initial_s:
                raise ValueError(f"{where}.poll_max_s must be at least poll_initial_s")

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
        _refuse_edc_credentials(path, data.get("edc"))
        return data


def _refuse_edc_credentials(path: Path, edc: Any) -> None:
    """EDC credentials in the settings file (default endpoint or a study's) are refused, naming the
    environment variable to use instead; the value itself is never shown."""
    if not isinstance(edc, dict):
        return
    sections: list[tuple[str, str | None, Any]] = [("edc", None, edc)]
    studies = edc.get("studies")
    if isinstance(studies, dict):
        sections += [(f"edc.studies.{oid}", str(oid), entry) for oid, entry in studies.items()]
    for where, study, section in sections:
        if not isinstance(section, dict):
            continue
        for key in _EDC_CREDENTIALS:
            if key in section:
                raise StudyConfigError(str(path), f"{where}.{key} is a credential: it must come from the environment "
                                       f"({edc_env_name(key, study)}), never from a file", key=f"{where}.{key}")


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
