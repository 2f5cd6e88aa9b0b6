"""The container stack in docker-compose.yml, checked by parsing it (no Docker engine runs here)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from devstack.postgres import _bin_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
EXISTING_DB_FILE = REPO_ROOT / "docker-compose.existing-db.yml"
OWNER = "everyskill"  # POSTGRES_USER: the bundled database's owner, who creates the tables
WORKER_ROLE = "everyskill_worker"
WORKER_URL = "postgresql://everyskill_worker:${WORKER_DB_PASSWORD:-everyskill_worker}@postgres:5432/everyskill"
OWNER_URL = "postgresql://everyskill:${POSTGRES_PASSWORD:-everyskill}@postgres:5432/everyskill"

REQUIRED_SERVICES = {
    "postgres",
    "worker-role",
    "redis",
    "ollama",
    "ollama-pull",
    "migrate",
    "worker",
    "beat",
    "flower",
}
EMBEDDER_SERVICES = ("migrate", "worker", "beat", "flower")
ONE_SHOT_SERVICES = ("ollama-pull", "worker-role", "migrate")
VALID_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}

HEALTHY = "service_healthy"
COMPLETED = "service_completed_successfully"
EXPECTED_DEPENDENCIES = {
    "ollama-pull": {"ollama": HEALTHY},
    "worker-role": {"postgres": HEALTHY},
    "migrate": {"postgres": HEALTHY, "worker-role": COMPLETED},
    "worker": {
        "postgres": HEALTHY,
        "redis": HEALTHY,
        "migrate": COMPLETED,
        "ollama-pull": COMPLETED,
    },
    "beat": {"redis": HEALTHY, "migrate": COMPLETED},
    "flower": {"redis": HEALTHY},
}

EXPECTED_COMMANDS = {
    "migrate": "python -m worker migrate --grant everyskill_worker",
    "worker": "celery -A worker worker --loglevel=INFO",
    "beat": "celery -A worker beat --loglevel=INFO",
    "flower": "celery -A worker flower --port=5555",
}

EXPECTED_EMBEDDER_ENV = {
    "REDIS_URL": "redis://redis:6379/0",
    "OLLAMA_URL": "http://ollama:11434",
    "OLLAMA_MODEL": "${OLLAMA_MODEL:-nomic-embed-text}",
    "EMBEDDING_DIMENSIONS": "${EMBEDDING_DIMENSIONS:-768}",
    "DEFAULT_TENANT_ID": "${DEFAULT_TENANT_ID:-default-tenant-000-0000-000000000000}",
    "RECONCILE_INTERVAL_SECONDS": "${RECONCILE_INTERVAL_SECONDS:-600}",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(document, dict), "docker-compose.yml must be a mapping"
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose.get("services")
    assert isinstance(found, dict), "docker-compose.yml has no services mapping"
    return found


def dependencies(service: dict[str, Any]) -> dict[str, str]:
    """depends_on as {service: condition}; the short list form means service_started."""
    depends_on = service.get("depends_on", {})
    if isinstance(depends_on, list):
        return dict.fromkeys(depends_on, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in depends_on.items()}


def environment(service: dict[str, Any]) -> dict[str, str]:
    """environment as a mapping, whichever of its two forms the file uses."""
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def command_line(service: dict[str, Any]) -> str:
    command = service.get("command")
    if isinstance(command, list):
        return " ".join(command)
    return str(command)


def published_ports(service: dict[str, Any]) -> set[tuple[int, int]]:
    """(host port, container port) pairs of the short ("[ip:]host:container") or long syntax."""
    pairs: set[tuple[int, int]] = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            pairs.add((int(port["published"]), int(port["target"])))
        else:
            *_, host, container = str(port).split(":")
            pairs.add((int(host), int(container.split("/")[0])))
    return pairs


def test_stack_has_every_service(services: dict[str, dict[str, Any]]) -> None:
    assert services.keys() >= REQUIRED_SERVICES


def test_file_has_no_obsolete_version_key(compose: dict[str, Any]) -> None:
    assert "version" not in compose


def test_every_dependency_names_an_existing_service_with_a_valid_condition(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        for dependency, condition in dependencies(service).items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            assert condition in VALID_CONDITIONS, f"{name} -> {dependency}: {condition}"


@pytest.mark.parametrize("name", EXPECTED_DEPENDENCIES)
def test_service_waits_for_what_it_needs(services: dict[str, dict[str, Any]], name: str) -> None:
    assert dependencies(services[name]) == EXPECTED_DEPENDENCIES[name]


def test_every_service_waited_on_while_running_has_a_healthcheck(
    services: dict[str, dict[str, Any]],
) -> None:
    waited_on = {
        dependency
        for service in services.values()
        for dependency, condition in dependencies(service).items()
        if condition != COMPLETED
    }
    for name in waited_on:
        healthcheck = services[name].get("healthcheck", {})
        assert healthcheck.get("test"), f"{name} is waited on but has no healthcheck"
        assert not healthcheck.get("disable", False), f"{name} has its healthcheck disabled"


def test_worker_healthcheck_asks_for_the_heartbeat_of_its_own_consumer(
    services: dict[str, dict[str, Any]],
) -> None:
    healthcheck = services["worker"]["healthcheck"]
    assert healthcheck["test"] == ["CMD", "python", "-m", "worker", "health"]
    assert healthcheck["interval"]
    assert healthcheck["timeout"]


def test_worker_serves_metrics_on_loopback(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert environment(worker)["METRICS_PORT"] == "${METRICS_PORT:-9808}"
    assert worker["ports"] == ["127.0.0.1:${METRICS_PORT:-9808}:${METRICS_PORT:-9808}"]


@pytest.mark.parametrize("name", ONE_SHOT_SERVICES)
def test_one_shot_service_is_not_restarted(services: dict[str, dict[str, Any]], name: str) -> None:
    # An unquoted `no` is YAML 1.1 false, which compose rejects: it must be the string "no".
    assert services[name]["restart"] == "no"


def test_ollama_pull_pulls_the_configured_model_from_the_ollama_service(
    services: dict[str, dict[str, Any]],
) -> None:
    pull = services["ollama-pull"]
    assert pull["image"] == services["ollama"]["image"]
    assert pull["entrypoint"] == ["ollama", "pull", "${OLLAMA_MODEL:-nomic-embed-text}"]
    assert environment(pull)["OLLAMA_HOST"] == "ollama:11434"


@pytest.mark.parametrize(("name", "command"), EXPECTED_COMMANDS.items())
def test_embedder_service_runs_its_command(
    services: dict[str, dict[str, Any]], name: str, command: str
) -> None:
    assert command_line(services[name]) == command


@pytest.mark.parametrize("command", EXPECTED_COMMANDS.values())
def test_readme_documents_command(command: str) -> None:
    readme = REPO_ROOT / "README.md"
    if not readme.is_file():
        pytest.fail("README.md is missing: it must document the stack's commands")
    assert command in readme.read_text(encoding="utf-8")


@pytest.mark.parametrize("name", EXPECTED_COMMANDS)
def test_embedder_service_builds_the_project_image(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    assert services[name]["build"] == "."


@pytest.mark.parametrize("name", EMBEDDER_SERVICES)
def test_embedder_service_gets_the_shared_configuration(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    env = environment(services[name])
    assert {key: env.get(key) for key in EXPECTED_EMBEDDER_ENV} == EXPECTED_EMBEDDER_ENV


def test_every_service_built_from_the_project_reaches_database_redis_and_ollama(
    services: dict[str, dict[str, Any]],
) -> None:
    built = [name for name, service in services.items() if "build" in service]
    assert set(EMBEDDER_SERVICES) <= set(built)
    for name in built:
        env = environment(services[name])
        for key in ("DATABASE_URL", "REDIS_URL", "OLLAMA_URL"):
            assert env.get(key), f"{name} has no {key}"


def test_flower_is_password_protected_and_published_on_5555(
    services: dict[str, dict[str, Any]],
) -> None:
    flower = services["flower"]
    assert environment(flower)["FLOWER_BASIC_AUTH"] == "${FLOWER_BASIC_AUTH:-admin:change-me}"
    assert (5555, 5555) in published_ports(flower)


def test_postgres_is_pgvector_with_the_everyskill_database(
    services: dict[str, dict[str, Any]],
) -> None:
    postgres = services["postgres"]
    assert postgres["image"] == "pgvector/pgvector:pg18"
    env = environment(postgres)
    assert env["POSTGRES_USER"] == OWNER
    assert env["POSTGRES_DB"] == "everyskill"
    assert env["POSTGRES_PASSWORD"] == "${POSTGRES_PASSWORD:-everyskill}"


def test_redis_persists_to_its_volume(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    assert "--appendonly yes" in command_line(redis)
    assert any(str(volume).endswith(":/data") for volume in redis["volumes"])


@pytest.mark.parametrize(
    ("name", "mount"),
    [
        # From 18 on the image keeps its data in a versioned folder under /var/lib/postgresql.
        ("postgres", "/var/lib/postgresql"),
        ("redis", "/data"),
        ("ollama", "/root/.ollama"),
    ],
)
def test_stateful_service_keeps_its_data_in_a_declared_named_volume(
    compose: dict[str, Any], services: dict[str, dict[str, Any]], name: str, mount: str
) -> None:
    volumes = [str(volume).split(":") for volume in services[name].get("volumes", [])]
    sources = [source for source, target, *_ in volumes if target == mount]
    assert sources, f"{name} mounts nothing at {mount}"
    assert sources[0] in (compose.get("volumes") or {})


def test_dockerfile_default_command_is_the_worker() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert 'CMD ["celery", "-A", "worker", "worker", "--loglevel=INFO"]' in dockerfile


def test_dockerfile_runs_as_a_non_root_user() -> None:
    lines = (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines()
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users, "Dockerfile sets no USER: the image would run as root"
    assert users[-1] not in {"root", "0"}


@pytest.mark.parametrize("files", [(COMPOSE_FILE,), (COMPOSE_FILE, EXISTING_DB_FILE)])
def test_docker_compose_accepts_the_file(files: tuple[Path, ...]) -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker client not installed")
    if subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose plugin not installed")
    env = {
        **os.environ,
        "OWNER_DATABASE_URL": "postgresql://owner:pw@db.example:5432/everyskill",
        "WORKER_DATABASE_URL": "postgresql://everyskill_worker:pw@db.example:5432/everyskill",
    }
    result = subprocess.run(
        [docker, "compose", *(arg for f in files for arg in ("-f", str(f))), "config", "--quiet"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr


def database_user(service: dict[str, Any]) -> str | None:
    url = environment(service)["DATABASE_URL"]
    return make_url(url.replace("${", "").replace(":-", "_").replace("}", "")).username


@pytest.mark.parametrize("name", ["worker", "beat", "flower"])
def test_the_worker_beat_and_flower_log_in_as_a_role_that_owns_no_table(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    # Row level security does not bind a table's owner: the worker must not be it.
    assert environment(services[name])["DATABASE_URL"] == WORKER_URL
    assert database_user(services[name]) == WORKER_ROLE != OWNER


def test_migrate_runs_as_the_owner_and_grants_the_workers_role(
    services: dict[str, dict[str, Any]],
) -> None:
    migrate = services["migrate"]
    assert environment(migrate)["DATABASE_URL"] == OWNER_URL
    assert database_user(migrate) == environment(services["postgres"])["POSTGRES_USER"]
    assert command_line(migrate) == f"python -m worker migrate --grant {WORKER_ROLE}"


def test_the_workers_role_is_created_without_ownership_or_bypassrls_before_migrate(
    services: dict[str, dict[str, Any]],
) -> None:
    role = services["worker-role"]
    assert role["image"] == services["postgres"]["image"]
    env = environment(role)
    assert (env["PGHOST"], env["PGUSER"], env["PGDATABASE"]) == ("postgres", OWNER, "everyskill")
    # The password it sets is the one in the worker's URL.
    assert env["WORKER_DB_PASSWORD"] == "${WORKER_DB_PASSWORD:-everyskill_worker}"
    [mount] = role["volumes"]
    source, target, _ = str(mount).split(":")
    assert role["entrypoint"][-1] == target
    sql = (REPO_ROOT / source).read_text(encoding="utf-8")
    assert f"CREATE ROLE {WORKER_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS" in sql
    assert re.search(rf"ALTER ROLE {WORKER_ROLE} .*PASSWORD :'worker_password'", sql)
    assert "GRANT" not in sql  # the grants are the worker's own (migrate --grant)


def test_the_stacks_postgresql_is_the_major_version_the_tests_run() -> None:
    services = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))["services"]
    version = subprocess.run(
        [str(_bin_dir() / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout  # "postgres (PostgreSQL) 18.1"
    major = re.search(r"\) (\d+)", version)
    assert major is not None
    assert services["postgres"]["image"] == f"pgvector/pgvector:pg{major[1]}"


class _ComposeLoader(yaml.SafeLoader):
    """YAML with compose's merge tags: `!reset` drops what the base file set, `!override`
    replaces it instead of merging."""


@dataclass(frozen=True)
class Tagged:
    tag: str
    value: Any


def _construct(tag: str) -> Any:
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> Tagged:
        if isinstance(node, yaml.MappingNode):
            return Tagged(tag, loader.construct_mapping(node, deep=True))
        if isinstance(node, yaml.SequenceNode):
            return Tagged(tag, loader.construct_sequence(node, deep=True))
        return Tagged(tag, loader.construct_scalar(node))  # type: ignore[arg-type]

    return construct


for _tag in ("!reset", "!override"):
    _ComposeLoader.add_constructor(_tag, _construct(_tag))


def merged_services(base: Path, override: Path) -> dict[str, dict[str, Any]]:
    """`docker compose -f base -f override`'s services, merged as compose does for the keys
    these tests read: mappings by key, anything else replaced, the tags as they say."""
    services = yaml.load(base.read_text(encoding="utf-8"), _ComposeLoader)["services"]  # noqa: S506
    changes = yaml.load(override.read_text(encoding="utf-8"), _ComposeLoader)["services"]  # noqa: S506
    result = {name: dict(service) for name, service in services.items()}
    for name, change in changes.items():
        service = result.setdefault(name, {})
        for key, value in change.items():
            if isinstance(value, Tagged):
                service[key] = {} if value.tag == "!reset" else value.value
            elif isinstance(value, dict) and isinstance(service.get(key), dict):
                service[key] = {**service[key], **value}
            else:
                service[key] = value
    return result


@pytest.fixture(scope="module")
def existing_db() -> dict[str, dict[str, Any]]:
    return merged_services(COMPOSE_FILE, EXISTING_DB_FILE)


def test_the_existing_db_override_starts_no_bundled_postgresql(
    existing_db: dict[str, dict[str, Any]],
) -> None:
    # A service in a profile starts only when asked for by name or profile.
    bundled = {name for name, service in existing_db.items() if service.get("profiles")}
    assert bundled == {"postgres", "worker-role"}
    for name, service in existing_db.items():
        if name not in bundled:
            assert not dependencies(service).keys() & bundled, f"{name} waits for {bundled}"
    assert dependencies(existing_db["worker"]) == {
        name: condition
        for name, condition in EXPECTED_DEPENDENCIES["worker"].items()
        if name != "postgres"
    }


def test_the_existing_db_override_migrates_as_the_owner_and_runs_the_rest_as_the_workers_role(
    existing_db: dict[str, dict[str, Any]],
) -> None:
    migrate = existing_db["migrate"]
    assert environment(migrate)["DATABASE_URL"].startswith("${OWNER_DATABASE_URL:?")
    assert (
        command_line(migrate)
        == "python -m worker migrate --grant ${WORKER_DB_ROLE:-everyskill_worker}"
    )
    for name in ("worker", "beat", "flower"):
        assert environment(existing_db[name])["DATABASE_URL"].startswith("${WORKER_DATABASE_URL:?")
        # The rest of the shared configuration is the base file's.
        assert environment(existing_db[name])["REDIS_URL"] == EXPECTED_EMBEDDER_ENV["REDIS_URL"]


def test_readme_documents_the_existing_db_override() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert "docker compose -f docker-compose.yml -f docker-compose.existing-db.yml up -d" in readme
