"""The container files, checked without a Docker engine.

- docker/compose.yaml is validated by `docker-compose config` (Debian's docker-compose 1.29 works
  offline): it resolves with the required secrets set and refuses to when one is missing. The test is
  skipped, with the reason, only when the `docker-compose` binary is not installed.
- compose.yaml is also read with PyYAML: single-node KRaft Kafka, topics, healthchecks, start order,
  no secret written in the file.
- docker/esource.docker.yaml is loaded through esource.settings with the environment compose gives
  the container, so the file, the compose environment and the settings model agree.
- docker/Dockerfile is checked statically, and a wheel is built (`pip wheel --no-deps`, the venv's pip)
  from exactly what the Dockerfile's build stage copies, then listed: it must hold the package data the
  service reads at run time.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"
SETTINGS_FILE = DOCKER / "esource.docker.yaml"

# Dummy values of the right length for the tests only; never used anywhere else.
TEST_ENV = {
    "ESOURCE_AUTH_SECRET": "test-only-auth-secret-0123456789abcdef",
    "ESOURCE_PSEUDONYM_KEY": "test-only-pseudonym-key-0123",
}
SECRET_VARS = tuple(TEST_ENV)
SERVICES = {"kafka", "kafka-init", "postgres", "sandbox-edc", "esource"}
UPDATES_TOPIC = "ehr.fhir.updates"
DLQ_TOPIC = "ehr.fhir.deadletter"


# --------------------------------------------------------------------------------------- helpers


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _service(name: str) -> dict[str, Any]:
    return _compose()["services"][name]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _clean_environ(**extra: str) -> dict[str, str]:
    """The process environment without anything compose would interpolate or read from our side."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ESOURCE_", "POSTGRES_", "COMPOSE_"))}
    env.update(extra)
    return env


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?message} (enough for this file)."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        current = env.get(name) or ""
        if op == ":-":
            return current or arg
        if op == ":?":
            if not current:
                raise KeyError(f"{name}: {arg}")
        return current

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}", sub, value)


def _docker_compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("the `docker-compose` binary is not installed (Debian: apt-get install -y "
                    "--no-install-recommends docker-compose); compose.yaml not validated by docker-compose")
    return subprocess.run([binary, "-f", str(COMPOSE.relative_to(REPO)), "config"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


# ------------------------------------------------------------------- docker-compose config (offline)


def test_compose_config_resolves_with_the_required_secrets() -> None:
    proc = _docker_compose_config(_clean_environ(**TEST_ENV))
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert set(resolved["services"]) == SERVICES
    env = _env(resolved["services"]["esource"])
    assert env["ESOURCE_AUTH_SECRET"] == TEST_ENV["ESOURCE_AUTH_SECRET"]
    assert env["ESOURCE_PSEUDONYM_KEY"] == TEST_ENV["ESOURCE_PSEUDONYM_KEY"]
    # The local-only default password, the same on both sides.
    assert env["ESOURCE_DATABASE_URL"] == "postgresql+psycopg://esource:esource-local@postgres:5432/esource"
    assert _env(resolved["services"]["postgres"])["POSTGRES_PASSWORD"] == "esource-local"
    # The settings file is mounted from docker/, read-only.
    mounts = [str(v) for v in resolved["services"]["esource"]["volumes"]]
    assert any(m.endswith(":/etc/esource/esource.yaml:ro") and str(SETTINGS_FILE) in m for m in mounts), mounts


def test_compose_config_uses_postgres_password_from_the_environment() -> None:
    proc = _docker_compose_config(_clean_environ(POSTGRES_PASSWORD="from-env-pw", **TEST_ENV))
    assert proc.returncode == 0, proc.stderr
    services = yaml.safe_load(proc.stdout)["services"]
    assert _env(services["postgres"])["POSTGRES_PASSWORD"] == "from-env-pw"
    assert _env(services["esource"])["ESOURCE_DATABASE_URL"] == \
        "postgresql+psycopg://esource:from-env-pw@postgres:5432/esource"


@pytest.mark.parametrize("missing", SECRET_VARS)
@pytest.mark.parametrize("how", ["unset", "empty"])
def test_compose_config_refuses_without_a_secret(missing: str, how: str) -> None:
    env = _clean_environ(**TEST_ENV)
    if how == "unset":
        del env[missing]
    else:
        env[missing] = ""
    proc = _docker_compose_config(env)
    assert proc.returncode != 0, f"docker-compose config accepted a compose file without {missing}"
    assert missing in proc.stderr + proc.stdout


# ------------------------------------------------------------------------------ compose.yaml content


def test_compose_services() -> None:
    assert set(_compose()["services"]) == SERVICES


def test_kafka_is_single_node_kraft() -> None:
    kafka = _service("kafka")
    assert kafka["image"] == "apache/kafka:3.9.0"
    env = _env(kafka)
    assert not [k for k in env if "ZOOKEEPER" in k.upper()]
    assert all("zookeeper" not in str(s.get("image", "")) for s in _compose()["services"].values())
    node_id = env["KAFKA_NODE_ID"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert set(env["KAFKA_LISTENERS"].split(",")) == {"PLAINTEXT://:9092", "CONTROLLER://:9093"}
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://kafka:9092"
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{node_id}@kafka:9093"
    protocol_map = dict(pair.split(":") for pair in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert protocol_map == {"CONTROLLER": "PLAINTEXT", "PLAINTEXT": "PLAINTEXT"}
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == "1"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    # The broker accepts the largest message esource accepts.
    settings = yaml.safe_load(SETTINGS_FILE.read_text(encoding="utf-8"))
    assert int(env["KAFKA_MESSAGE_MAX_BYTES"]) >= settings["kafka"]["max_message_bytes"]
    # Data on a volume, where the log dirs are.
    assert any(str(v).endswith(":" + env["KAFKA_LOG_DIRS"]) for v in kafka["volumes"])


def test_kafka_healthcheck_lists_topics() -> None:
    test = _service("kafka")["healthcheck"]["test"]
    cmd = shlex.split(test) if isinstance(test, str) else list(test)
    if cmd[0] in ("CMD", "CMD-SHELL"):
        cmd = cmd[1:] if cmd[0] == "CMD" else shlex.split(cmd[1])
    assert cmd == ["/opt/kafka/bin/kafka-topics.sh", "--bootstrap-server", "localhost:9092", "--list"]


def _created_topics() -> dict[str, list[str]]:
    init = _service("kafka-init")
    command = init["command"]
    script = command if isinstance(command, str) else "\n".join(command)
    script = script.replace("\\\n", " ")
    topics: dict[str, list[str]] = {}
    for line in script.splitlines():
        args = shlex.split(line)
        if args and args[0].endswith("kafka-topics.sh") and "--create" in args:
            topics[args[args.index("--topic") + 1]] = args
    return topics


def test_kafka_init_creates_the_topics_once() -> None:
    init = _service("kafka-init")
    assert init["image"] == _service("kafka")["image"]
    assert init["depends_on"] == {"kafka": {"condition": "service_healthy"}}
    assert str(init.get("restart", "no")) == "no"
    topics = _created_topics()
    assert set(topics) == {UPDATES_TOPIC, DLQ_TOPIC}
    for args in topics.values():
        assert "--if-not-exists" in args
        assert args[args.index("--bootstrap-server") + 1] == "kafka:9092"
        assert args[args.index("--replication-factor") + 1] == "1"
    updates = topics[UPDATES_TOPIC]
    assert updates[updates.index("--partitions") + 1] == "6"
    # esource consumes and dead-letters exactly these topics.
    env = _env(_service("esource"))
    assert env["ESOURCE_KAFKA_TOPICS"] == UPDATES_TOPIC
    assert env["ESOURCE_KAFKA_DLQ_TOPIC"] == DLQ_TOPIC


def test_postgres() -> None:
    pg = _service("postgres")
    assert pg["image"] == "postgres:16"
    env = _env(pg)
    assert env["POSTGRES_DB"] == "esource"
    assert env["POSTGRES_USER"] == "esource"
    assert env["POSTGRES_PASSWORD"] == "${POSTGRES_PASSWORD:-esource-local}"
    test = pg["healthcheck"]["test"]
    assert "pg_isready" in (test if isinstance(test, str) else " ".join(test))
    assert any(str(v).endswith(":/var/lib/postgresql/data") for v in pg["volumes"])


def test_sandbox_edc() -> None:
    sandbox = _service("sandbox-edc")
    esource = _service("esource")
    assert sandbox["build"] == esource["build"] and sandbox["image"] == esource["image"]
    assert sandbox["command"] == ["sandbox-edc", "--host", "0.0.0.0", "--port", "8090",
                                  "--db", "/var/lib/esource/sandbox.sqlite"]
    assert any(str(p).split(":")[-1] == "8090" for p in sandbox["ports"])
    # Its own probe: the image's HEALTHCHECK targets the service port 8080, not 8090.
    test = sandbox["healthcheck"]["test"]
    assert "8090" in (test if isinstance(test, str) else " ".join(test))
    assert any(str(v).endswith(":/var/lib/esource") for v in sandbox["volumes"])


def test_esource_service() -> None:
    svc = _service("esource")
    assert svc["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert (COMPOSE.parent / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert svc["command"] == ["serve", "--config", "/etc/esource/esource.yaml"]
    assert svc["depends_on"] == {
        "kafka": {"condition": "service_healthy"},
        "kafka-init": {"condition": "service_completed_successfully"},
        "postgres": {"condition": "service_healthy"},
        "sandbox-edc": {"condition": "service_healthy"},
    }
    env = _env(svc)
    assert env == {
        "ESOURCE_MODE": "production",
        "ESOURCE_DATABASE_URL": "postgresql+psycopg://esource:${POSTGRES_PASSWORD:-esource-local}@postgres:5432/esource",
        "ESOURCE_KAFKA_BOOTSTRAP": "kafka:9092",
        "ESOURCE_KAFKA_TOPICS": UPDATES_TOPIC,
        "ESOURCE_KAFKA_DLQ_TOPIC": DLQ_TOPIC,
        "ESOURCE_KAFKA_GROUP": "esource",
        "ESOURCE_KAFKA__WORKERS": "2",
        "ESOURCE_AUTH_SECRET": "${ESOURCE_AUTH_SECRET:?set ESOURCE_AUTH_SECRET}",
        "ESOURCE_PSEUDONYM_KEY": "${ESOURCE_PSEUDONYM_KEY:?set ESOURCE_PSEUDONYM_KEY}",
        "ESOURCE_EDC_URL": "http://sandbox-edc:8090",
    }
    assert any(str(p).split(":")[-1] == "8080" for p in svc["ports"])
    volumes = [str(v) for v in svc["volumes"]]
    assert any(v.endswith(":/var/lib/esource") for v in volumes)
    assert "./esource.docker.yaml:/etc/esource/esource.yaml:ro" in volumes


def test_no_secret_is_written_in_the_compose_file() -> None:
    """Every secret-looking value comes from the environment; esource's have no default at all."""
    secretish = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|_KEY$", re.I)
    for name, svc in _compose()["services"].items():
        for key, value in _env(svc).items():
            if secretish.search(key):
                assert value.startswith("${") and value.endswith("}"), f"{name}.{key} is hard-coded"
            if "://" in value and "@" in value:  # a password inside a URL
                userinfo = value.split("://", 1)[1].split("@", 1)[0]
                if ":" in userinfo:
                    assert userinfo.split(":", 1)[1].startswith("${"), f"{name}.{key} has a hard-coded password"
    env = _env(_service("esource"))
    for var in SECRET_VARS:
        assert re.fullmatch(r"\$\{" + var + r":\?[^}]+\}", env[var]), f"{var} must be required (${{{var}:?...}})"


def test_every_long_running_service_has_a_healthcheck() -> None:
    services = _compose()["services"]
    for name in ("kafka", "postgres", "sandbox-edc"):
        assert services[name]["healthcheck"]["test"], name
    assert "healthcheck" not in services["esource"] or services["esource"]["healthcheck"].get("test")
    assert "HEALTHCHECK" in _instructions_of(_stages()[-1])  # esource: the image's own


# ------------------------------------------------------------------------------ esource.docker.yaml


def test_settings_file_keys_and_values() -> None:
    data = yaml.safe_load(SETTINGS_FILE.read_text(encoding="utf-8"))
    assert set(data) <= {"mode", "database_url", "http", "studies", "kafka", "edc", "log"}
    assert not {"auth_secret", "pseudonym_key"} & set(data)
    assert data["mode"] == "production"
    assert data["http"]["host"] == "0.0.0.0" and data["http"]["port"] == 8080
    assert data["studies"] == ["CV01"]
    assert data["kafka"]["session_timeout_ms"] == 10000
    assert data["kafka"]["heartbeat_interval_ms"] == 3000
    assert data["kafka"]["max_message_bytes"] == 10485760
    assert data["edc"]["connector"] == "sandbox"
    assert data["log"] == {"level": "INFO", "json": True}
    assert "@" not in data["database_url"], "no credentials in the settings file"


def test_settings_file_with_the_compose_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the container sees: the mounted file plus compose's environment, through esource.settings."""
    from esource.errors import EsourceError
    from esource.settings import load_settings

    for key in list(os.environ):
        if key.startswith("ESOURCE_"):
            monkeypatch.delenv(key)
    monkeypatch.delenv("POSTGRES_PASSWORD", raising=False)

    # Production mode: without the secrets it refuses to start, naming the variable.
    with pytest.raises(EsourceError, match="ESOURCE_AUTH_SECRET"):
        load_settings(SETTINGS_FILE)

    source = dict(TEST_ENV)
    for key, value in _env(_service("esource")).items():
        monkeypatch.setenv(key, _interpolate(value, source))
    settings = load_settings(SETTINGS_FILE)
    assert settings.mode == "production"
    assert settings.database_url == "postgresql+psycopg://esource:esource-local@postgres:5432/esource"
    assert (settings.http.host, settings.http.port) == ("0.0.0.0", 8080)
    assert settings.studies == ["CV01"]
    assert settings.kafka.bootstrap == "kafka:9092"
    assert settings.kafka.topics == [UPDATES_TOPIC]
    assert settings.kafka.group == "esource"
    assert settings.kafka.dlq_topic == DLQ_TOPIC
    assert (settings.kafka.session_timeout_ms, settings.kafka.heartbeat_interval_ms) == (10000, 3000)
    assert settings.kafka.max_message_bytes == 10485760
    assert settings.kafka.workers == 2  # two consumer processes: PostgreSQL allows it
    assert (settings.edc.connector, settings.edc.url) == ("sandbox", "http://sandbox-edc:8090")
    assert settings.log.level == "INFO" and settings.log.json_logs is True
    assert settings.auth_secret is not None
    assert settings.auth_secret.get_secret_value() == TEST_ENV["ESOURCE_AUTH_SECRET"]


# ------------------------------------------------------------------------------------- Dockerfile


def _logical_lines(text: str) -> list[str]:
    """Dockerfile instructions, one per entry: comments dropped, continuation lines joined."""
    out: list[str] = []
    current = ""
    for raw in text.splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if current and raw.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        out.append((current + raw).strip())
        current = ""
    if current.strip():
        out.append(current.strip())
    return out


def _stages() -> list[list[str]]:
    stages: list[list[str]] = []
    for line in _logical_lines(DOCKERFILE.read_text(encoding="utf-8")):
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def _instructions_of(stage: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in stage:
        instr, _, args = line.partition(" ")
        out.setdefault(instr.upper(), []).append(args.strip())
    return out


def _build_copy_sources() -> list[str]:
    sources: list[str] = []
    for args in _instructions_of(_stages()[0]).get("COPY", []):
        parts = shlex.split(args)
        assert not any(p.startswith("--from") for p in parts)
        sources.extend(p for p in parts[:-1] if not p.startswith("--"))
    return sources


def test_dockerfile_is_multi_stage_on_python_311_slim() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    stages = _stages()
    assert len(stages) >= 2
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    for stage in stages:
        image = stage[0].split()[1]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), image)
        assert image == "python:3.11-slim", stage[0]
    build = " ".join(stages[0])
    assert re.search(r"pip wheel --no-deps\b", build)


def test_dockerfile_runtime_stage() -> None:
    final = _instructions_of(_stages()[-1])
    users = final.get("USER", [])
    assert users, "the runtime stage sets no USER"
    assert users[-1].split(":")[0] not in ("root", "0"), users[-1]
    assert json.loads(final["ENTRYPOINT"][-1]) == ["esource"]
    assert json.loads(final["CMD"][-1]) == ["serve"]
    assert "8080" in final["EXPOSE"][-1].split()
    assert any("/var/lib/esource" in v for v in final.get("VOLUME", []))
    health = final["HEALTHCHECK"][-1]
    assert "http://127.0.0.1:8080/health" in health and "urllib" in health
    assert "curl" not in health and "wget" not in health
    # The wheel from the build stage, with dependencies, no sources copied in.
    runs = " ".join(final.get("RUN", []))
    assert re.search(r"pip install\b[^&]*\.whl", runs)
    assert not [c for c in final.get("COPY", []) if "--from" not in c]


def test_dockerfile_installs_no_editable_and_no_dev_or_test_deps() -> None:
    text = " ".join(_logical_lines(DOCKERFILE.read_text(encoding="utf-8")))
    assert not re.search(r"pip install[^&;]*(\s-e\s|--editable)", text)
    assert not re.search(r"\[(test|dev)[\],]", text)
    for dev_dep in ("pytest", "hypothesis", "calfkit"):
        assert dev_dep not in text


def test_dockerignore_excludes_local_state_but_not_the_sources() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    for needed in (".git", ".venv", "var", "**/__pycache__", ".pytest_cache", ".hypothesis", ".mypy_cache"):
        assert needed in patterns, needed

    def ignored(path: str) -> bool:
        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            pat = pattern[1:] if negate else pattern
            pat = pat.rstrip("/")
            if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path, pat.removeprefix("**/")):
                result = not negate
        return result

    sources = _build_copy_sources()
    assert {"pyproject.toml", "README.md", "esource", "cdisc_maps", "config"} <= set(sources)
    for src in sources:
        assert not ignored(src), f"{src} is copied by the Dockerfile but excluded by the .dockerignore"


# --------------------------------------------------------------------------------- wheel contents


@dataclass(frozen=True)
class Wheel:
    names: frozenset[str]
    metadata: str
    entry_points: str


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Wheel:
    """`pip wheel --no-deps` (the venv's pip) of what the Dockerfile's build stage copies.

    Built from a copy, not in the working tree, so nothing (build/, egg-info) is written into the
    checkout and what the image gets is what is checked."""
    root = tmp_path_factory.mktemp("wheel")
    src, out = root / "src", root / "dist"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in _build_copy_sources():
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out), str(src)],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"pip wheel failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    wheels = list(out.glob("esource-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as zf:
        names = frozenset(zf.namelist())
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        return Wheel(names, zf.read(meta).decode(), zf.read(entry_points).decode())


def _missing(names: frozenset[str], required: list[str]) -> list[str]:
    return [n for n in required if n not in names]


def _tree(folder: str, prefix: str, *, suffixes: tuple[str, ...] | None = None) -> list[str]:
    base = REPO / folder
    return sorted(prefix + p.relative_to(base).as_posix() for p in base.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
                  and (suffixes is None or p.suffix in suffixes))


def test_wheel_holds_the_service_data(wheel: Wheel) -> None:
    required = [
        "esource/builtin_maps/CV01/map.yaml",
        "esource/builtin_maps/CV01/metadata.xml",
        "esource/odm/schemas/odm/1.3.2/ODM1-3-2.xsd",
        "esource/store/alembic.ini",
        "esource/store/migrations/versions/0001_initial.py",
        "esource/builtin_config/demo_enrollment.yaml",
    ]
    # and everything under the folders the service reads at run time
    required += _tree("cdisc_maps", "esource/builtin_maps/", suffixes=(".yaml", ".xml", ".md"))
    required += _tree("esource/odm/schemas", "esource/odm/schemas/")
    required += _tree("esource/store/migrations", "esource/store/migrations/")
    missing = _missing(wheel.names, required)
    assert not missing, f"missing from the wheel (pyproject.toml package-data): {missing}"


def test_wheel_holds_the_demo_data(wheel: Wheel) -> None:
    required = _tree("config/demo_data", "esource/builtin_config/demo_data/")
    assert any(n.endswith(".json") for n in required)
    missing = _missing(wheel.names, required)
    assert not missing, f"missing from the wheel (pyproject.toml package-data): {missing}"


def test_wheel_is_clean_and_runnable(wheel: Wheel) -> None:
    files = wheel.names
    assert not [n for n in files if "__pycache__" in n or n.endswith(".pyc")]
    assert not [n for n in files if n.split("/")[0] in ("tests", "adapters", "connectors", "cdisc_maps", "config")]
    assert "esource/adapters/__init__.py" in files and "esource/connectors/__init__.py" in files
    assert re.search(r"^esource\s*=\s*esource\.cli:main$", wheel.entry_points, re.M)
    for line in wheel.metadata.splitlines():
        if line.startswith("Requires-Dist:") and re.search(r"pytest|hypothesis|calfkit", line):
            assert "extra ==" in line, f"a test dependency is not behind an extra: {line}"
