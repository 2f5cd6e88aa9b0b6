"""`make demo`, as an operator's first hour: served, used through the lines it prints, killed
with SIGKILL, started again, stopped with SIGTERM. The scenario runs once for the module (a
demo costs seconds); each test checks one thing an operator would."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
import sqlalchemy as sa

from devstack.ports import free_port
from tests.processes import Process

pytestmark = pytest.mark.timeout(600)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
README = PROJECT_ROOT / "README.md"
SUMMARY = re.compile(r"Done\. Embedded (\d+)/(\d+) skills\. (\d+) failures\.")
EXPORT = re.compile(r"^export (\w+)=(.*)$", re.MULTILINE)
SERVING = "demo Stop it with Ctrl-C"
NORTHWIND = "tenant-northwind-0000-000000000001"


def readme_section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(title)
    return text[start : text.index("\n## ", start + 1)]


def readme_demo_commands() -> list[str]:
    """The operator commands of the README's demo section, as written."""
    blocks = re.findall(r"```sh\n(.*?)```", readme_section("## What `make demo` does"), re.S)
    return [line for line in blocks[0].splitlines() if line.startswith("python -m worker ")]


def readme_sample() -> list[str]:
    blocks: list[str] = re.findall(
        r"```\n(.*?)```", readme_section("## What `make demo` does"), re.S
    )
    return blocks[0].splitlines()


def start_demo(data: Path, log: Path) -> Process:
    env = {key: value for key, value in os.environ.items() if key not in ("DATABASE_URL",)}
    # Nothing listens there: the demo must notice and start its fake Ollama.
    env["OLLAMA_URL"] = f"http://127.0.0.1:{free_port()}"
    args = [sys.executable, "-m", "devstack.demo", "--data", str(data),
            "--flower-port", str(free_port()), "--metrics-port", str(free_port())]  # fmt: skip
    return Process(args, env, log).start(ready=SERVING, timeout=300)


def processes_of(demo: Process, data: Path) -> list[psutil.Process]:
    """The demo, every process under it, and PostgreSQL's (pg_ctl detaches the server)."""
    assert demo.process is not None
    root = psutil.Process(demo.process.pid)
    found = [root, *root.children(recursive=True)]
    postmaster = psutil.Process(int((data / "postgres" / "postmaster.pid").read_text().split()[0]))
    return [*found, postmaster, *postmaster.children(recursive=True)]


def running(processes: list[psutil.Process]) -> list[psutil.Process]:
    def alive(process: psutil.Process) -> bool:
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return [process for process in processes if alive(process)]


def exports(log: str) -> dict[str, str]:
    return {name: shlex.split(value)[0] for name, value in EXPORT.findall(log)}


@dataclass
class Scenario:
    data: Path
    first_log: str = ""
    exported: dict[str, str] = field(default_factory=dict)
    commands: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)
    role: tuple[object, ...] = ()
    metrics: httpx.Response | None = None
    alive_after_sigkill: list[psutil.Process] = field(default_factory=list)
    names_after_sigkill: list[str] = field(default_factory=list)
    second_log: str = ""
    alive_after_second_start: list[psutil.Process] = field(default_factory=list)
    second_returncode: int | None = None
    alive_after_sigterm: list[psutil.Process] = field(default_factory=list)


def operator(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A README command run as written, with `python` the project's interpreter."""
    args = shlex.split(command)
    return subprocess.run(
        [sys.executable, *args[1:]], env=env, cwd=PROJECT_ROOT,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    base = tmp_path_factory.mktemp("demo")
    seen = Scenario(data=base / "data")
    demos: list[Process] = []
    try:
        first = start_demo(seen.data, base / "first.log")
        demos.append(first)
        seen.first_log = first.log()
        seen.exported = exports(seen.first_log)
        # The operator's shell: the printed lines, nothing of the demo's own environment.
        shell = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "OLLAMA_URL")}
        shell.update(seen.exported)
        for command in [*readme_demo_commands(), "python -m worker status --json"]:
            seen.commands[command] = operator(command, shell)
        engine = sa.create_engine(
            seen.exported["DATABASE_URL"].replace("postgresql://", "postgresql+psycopg://")
        )
        with engine.connect() as connection:
            seen.role = tuple(
                connection.execute(
                    sa.text(
                        "SELECT current_user, rolsuper, rolbypassrls,"
                        " pg_get_userbyid(c.relowner) FROM pg_roles, pg_class c"
                        " WHERE rolname = current_user AND c.relname = 'skills'"
                    )
                ).one()
            )
        engine.dispose()
        metrics_url = re.search(r"^Metrics: (\S+)", seen.first_log, re.M)
        if metrics_url:
            seen.metrics = httpx.get(metrics_url[1], timeout=10)

        killed = processes_of(first, seen.data)
        assert first.process is not None
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
        seen.alive_after_sigkill = running(killed)
        seen.names_after_sigkill = [process.name() for process in seen.alive_after_sigkill]

        second = start_demo(seen.data, base / "second.log")
        demos.append(second)
        seen.second_log = second.log()
        seen.alive_after_second_start = running(seen.alive_after_sigkill)
        started = processes_of(second, seen.data)
        assert second.process is not None
        second.process.send_signal(signal.SIGTERM)
        seen.second_returncode = second.process.wait(120)
        seen.second_log = second.log()
        seen.alive_after_sigterm = running(started)
        yield seen
    finally:
        for demo in demos:
            if demo.process is not None and demo.process.poll() is None:
                demo.process.send_signal(signal.SIGTERM)
                demo.process.wait(120)


def test_the_demo_embeds_every_published_skill_with_its_fake_ollama(scenario: Scenario) -> None:
    log = scenario.first_log
    assert "using the built-in fake Ollama" in log
    assert "NOT semantic" in log
    # 160 published skills in the sample catalog's two enabled tenants.
    assert SUMMARY.findall(log)[0] == ("160", "160", "0")
    assert re.search(r"Flower: http://127\.0\.0\.1:\d+ +login admin / \S+", log)
    assert "Traceback" not in log


def test_the_printed_exports_reach_the_demo_as_the_workers_own_role(scenario: Scenario) -> None:
    assert scenario.exported.keys() == {"DATABASE_URL", "REDIS_URL", "OLLAMA_URL", "HEALTH_DIR"}
    user, superuser, bypasses_rls, owner = scenario.role
    assert (user, superuser, bypasses_rls) == ("everyskill_worker", False, False)
    assert owner != user

    status = scenario.commands["python -m worker status --json"]
    assert status.returncode == 0, status.stderr
    assert sum(tenant["embedded"] for tenant in json.loads(status.stdout)["tenants"]) == 160
    search = scenario.commands['python -m worker search "review pull requests"']
    assert search.returncode == 0, search.stderr
    assert "nomic-embed-text" in search.stdout
    health = scenario.commands["python -m worker health --ready"]
    assert health.returncode == 0, health.stderr
    assert scenario.metrics is not None, "the demo printed no Metrics: URL"
    assert scenario.metrics.status_code == 200
    assert "embedder_queue_depth" in scenario.metrics.text


def test_the_readmes_switch_example_succeeds_against_the_demos_ollama(scenario: Scenario) -> None:
    [switch] = [c for c in readme_demo_commands() if "switch-model" in c]
    result = scenario.commands[switch]

    assert result.returncode == 0, result.stdout + result.stderr
    tenants = json.loads(scenario.commands["python -m worker status --json"].stdout)["tenants"]
    [northwind] = [tenant for tenant in tenants if tenant["tenant_id"] == NORTHWIND]
    model = re.search(r"--model (\S+)", switch)
    assert model is not None
    assert (northwind["model"], northwind["embedded"]) == (model[1], northwind["published"])
    # The README's own switch example names the model the demo offers.
    assert f"--model {model[1]} " in readme_section("### Switching a tenant's embedding model")


def test_a_demo_killed_with_sigkill_is_cleaned_up_by_the_next_one(scenario: Scenario) -> None:
    # A killed demo leaves its servers running (the precondition), the next one stops them.
    assert "postgres" in scenario.names_after_sigkill
    assert len(scenario.alive_after_sigkill) > 3
    assert scenario.alive_after_second_start == []
    cleaned = [line for line in scenario.second_log.splitlines() if "earlier demo" in line]
    assert cleaned == [
        "demo Stopped what an earlier demo left running when it was killed:"
        " Flower, the worker, Redis, PostgreSQL"
    ]
    assert SERVING in scenario.second_log


def test_a_demo_started_after_a_model_switch_backfills_again(scenario: Scenario) -> None:
    assert SUMMARY.findall(scenario.second_log)[0] == ("160", "160", "0")
    assert "Backfill refused" not in scenario.second_log
    assert "Traceback" not in scenario.second_log


def test_a_demo_sent_sigterm_stops_every_process_it_started(scenario: Scenario) -> None:
    assert scenario.alive_after_sigterm == []
    assert scenario.second_returncode == 0
    assert scenario.second_log.splitlines()[-1] == (
        "demo SIGTERM: stopped everything the demo started"
    )


def shape(line: str, data: str) -> str:
    """A line with what differs between runs (paths, ids, ports, times, the password) blanked."""
    line = line.rstrip().replace(data, "<data>")
    line = re.sub(r"[\w/.-]*/\.data", "<data>", line)
    line = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<id>", line)
    line = re.sub(r"(login admin / )\S+", r"\1<password>", line)
    line = line.replace("localhost", "127.0.0.1")
    return re.sub(r"\d+", "0", line)


def test_the_readmes_sample_output_is_the_shape_of_a_real_run(scenario: Scenario) -> None:
    ran = scenario.first_log.splitlines()
    ran = ran[: next(i for i, line in enumerate(ran) if line.startswith(SERVING)) + 1]
    data = str(scenario.data)

    assert [shape(line, data) for line in readme_sample()] == [shape(line, data) for line in ran]
