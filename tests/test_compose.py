"""The container stack in docker-compose.yml, checked by parsing it (no Docker engine runs here)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"

REQUIRED_SERVICES = {
    "postgres",
    "redis",
    "ollama",
    "ollama-pull",
    "migrate",
    "worker",
    "beat",
    "flower",
}
EMBEDDER_SERVICES = ("migrate", "worker", "beat", "flower")
ONE_SHOT_SERVICES = ("ollama-pull", "migrate")
VALID_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}

HEALTHY = "service_healthy"
COMPLETED = "service_completed_successfully"
EXPECTED_DEPENDENCIES = {
    "ollama-pull": {"ollama": HEALTHY},
    "migrate": {"postgres": HEALTHY},
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
    "migrate": "python -m worker migrate",
    "worker": "celery -A worker worker --loglevel=INFO",
    "beat": "celery -A worker beat --loglevel=INFO",
    "flower": "celery -A worker flower --port=5555",
}

EXPECTED_EMBEDDER_ENV = {
    "DATABASE_URL": "postgresql://everyskill:${POSTGRES_PASSWORD:-everyskill}@postgres:5432/everyskill",
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
    assert postgres["image"] == "pgvector/pgvector:pg17"
    env = environment(postgres)
    assert env["POSTGRES_USER"] == "everyskill"
    assert env["POSTGRES_DB"] == "everyskill"
    assert env["POSTGRES_PASSWORD"] == "${POSTGRES_PASSWORD:-everyskill}"


def test_redis_persists_to_its_volume(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    assert "--appendonly yes" in command_line(redis)
    assert any(str(volume).endswith(":/data") for volume in redis["volumes"])


@pytest.mark.parametrize(
    ("name", "mount"),
    [
        ("postgres", "/var/lib/postgresql/data"),
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


def test_docker_compose_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker client not installed")
    if subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose plugin not installed")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE_FILE), "config", "--quiet"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
