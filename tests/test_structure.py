"""How the code hangs together: imports point one way, and loading the app to send is light."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from celery import Celery

from devstack.fake_ollama import FakeOllama
from tasks import INTERACTIVE
from tests.backfills import call_backfill, embedded_ids, published_catalog, summaries
from tests.databases import TENANT_A, Database
from tests.processes import Process, start_worker
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("worker", "tasks", "db", "devstack", "bench")
# What `celery call`, Flower or a producer must not pay for: none of it sends a message.
HEAVY = ("sqlalchemy", "psycopg", "prometheus_client", "pydantic", "pydantic_settings", "httpx")
# The producer API's own modules, constants and a lazy Celery producer: the web app imports them;
# and the record of refused messages, which the broker transport (worker.transport) loads.
LIGHT_TASK_MODULES = {"tasks", "tasks.refusals"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """Project modules `path` imports, at any depth, except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
        for statement in block.body
        for node in ast.walk(statement)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from tasks import runtime` imports the module tasks.runtime.
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(name for name in names if name.split(".")[0] in PACKAGES)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    modules = {module_name(p): p for p in files if "migrations" not in p.parts}
    return {name: project_imports(path) & modules.keys() for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if target == node or target == node.rsplit(".", 1)[0]:
                continue  # a package's own __init__ is not a circle
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_imports_itself_back_through_others() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_imports_point_from_worker_to_tasks_to_db_never_back() -> None:
    graph = import_graph()
    backwards = sorted(
        f"{source} -> {target}"
        for source, targets in graph.items()
        for target in targets
        if (source.startswith("tasks") and target.startswith("worker"))
        or (source.startswith("db") and target.split(".")[0] in {"worker", "tasks"})
    )
    assert backwards == []


def test_the_runtime_knows_no_module_that_embeds() -> None:
    imports = import_graph()["tasks.runtime"]
    assert not imports & {"tasks.loops", "tasks.app_lane", "tasks.jobs", "tasks.embedding"}


# A house a newcomer reads in one pass (README.md, "The map of the code").
MOST_TASK_MODULES = 16
MOST_IMPORT_LEVELS = 8
# What an app job and a run's batch run through, and the backfill beside them: none of it may
# reach a module of the model switch, which plugs in through tasks.runtime's hooks instead.
LIVE_PATH = {"tasks.app_lane", "tasks.loops", "tasks.embedding", "tasks.progress",
             "tasks.backfill", "tasks.runtime", "tasks.provider", "tasks.ollama"}  # fmt: skip
SWITCH_MODULES = {"tasks.switch", "db.staging"}


def task_graph() -> dict[str, set[str]]:
    graph = import_graph()
    tasks = {m for m in graph if m.split(".")[0] == "tasks"}
    return {m: {t for t in graph[m] if t in tasks and t != m} for m in tasks}


def levels(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's level: 1 for one that imports no other, else one more than its highest."""
    found: dict[str, int] = {}

    def level(module: str) -> int:
        if module not in found:
            found[module] = 1 + max((level(t) for t in graph[module]), default=0)
        return found[module]

    for module in graph:
        level(module)
    return found


def test_tasks_holds_at_most_16_modules_on_at_most_8_levels() -> None:
    graph = task_graph()
    assert len(graph) <= MOST_TASK_MODULES, sorted(graph)
    deepest = max(levels(graph).items(), key=lambda item: item[1])
    assert deepest[1] <= MOST_IMPORT_LEVELS, deepest


def test_the_live_path_reaches_no_module_of_the_switch() -> None:
    graph = import_graph()
    seen: set[str] = set()
    todo = list(LIVE_PATH)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    assert seen & SWITCH_MODULES == set()
    # The task table registers the switch's tasks; nothing else of tasks/ names it.
    importers = {m for m, targets in graph.items() if targets & SWITCH_MODULES}
    assert {m for m in importers if m.startswith("tasks")} <= {"tasks.jobs", "tasks.switch"}


def test_sql_is_written_in_db_alone_and_each_upsert_once() -> None:
    # One dialect: SQL text through SQLAlchemy Core, in db/ (tests and benches aside).
    outside = sorted(
        str(path.relative_to(ROOT))
        for package in ("tasks", "worker")
        for path in (ROOT / package).rglob("*.py")
        if re.search(r"^from sqlalchemy import .*\btext\b|sqlalchemy\.orm", path.read_text(), re.M)
    )
    assert outside == []
    code = "\n".join(p.read_text() for p in (ROOT / "db").glob("*.py"))
    for table in ("skill_embeddings", "staged_embeddings", "site_settings", "embedding_failures"):
        upserts = re.findall(rf"INSERT INTO {table}\b.*?(?:ON CONFLICT|$)", code, re.S)
        conflicts = [u for u in upserts if u.endswith("ON CONFLICT")]
        assert len(conflicts) <= 1 or table == "skill_embeddings", (table, len(conflicts))
    # skill_embeddings is written from a job's vectors and from a switch's staged ones: one
    # conflict clause, shared.
    assert code.count("skill_embeddings_tenant_skill_unique DO UPDATE") == 1


# What a producer's own interpreter (the web app's Python side, a script) loads to send a job.
SEND_PLAIN = """
import json, sys
from worker import app
print(app.send_task("tasks.backfill").id)
print("MODULES " + json.dumps(sorted(sys.modules)))
"""


def test_loading_the_app_to_send_loads_no_task_module_or_heavy_library(
    redis_url: str, tmp_path: Path
) -> None:
    # A plain interpreter: nothing loaded before the app but what Python itself starts with.
    # (-I: no PYTHONPATH, no current directory; the project comes from its installed package.)
    sent = subprocess.run(
        [sys.executable, "-I", "-c", SEND_PLAIN],
        env={"REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert sent.returncode == 0, sent.stderr
    run_id, _, listed = sent.stdout.partition("MODULES ")
    loaded = set(json.loads(listed))
    assert sorted(m for m in loaded if m.split(".")[0] in HEAVY) == []
    assert {m for m in loaded if m.split(".")[0] == "tasks"} <= LIGHT_TASK_MODULES
    assert "worker.celery_app" in loaded
    client = redis.Redis.from_url(redis_url)
    try:
        [message] = client.lrange(INTERACTIVE, 0, -1)
    finally:
        client.close()
    assert json.loads(message)["headers"]["id"] == run_id.strip()


# `celery call` as typed, listing the modules the project's app added to Celery's own CLI (whose
# plugins, Flower among them, load prometheus_client and tornado for every command: the plain
# interpreter's test above is the one that covers those).
SHOW_MODULES = """
import atexit, json, sys
import celery.bin.celery
from celery.__main__ import main
cli = set(sys.modules)
atexit.register(lambda: print("MODULES " + json.dumps(sorted(set(sys.modules) - cli))))
sys.argv = ["celery", "-A", "worker", "call", "tasks.backfill"]
main()
"""


@pytest.mark.slow
def test_celery_call_sends_without_loading_tasks_or_heavy_libraries(
    db: Database, embedder_env: dict[str, str], ollama: FakeOllama, tmp_path: Path
) -> None:
    db.add_tenant(TENANT_A)
    skills = published_catalog(db, 7)
    # No DATABASE_URL: sending a message needs only the broker.
    env = {k: v for k, v in embedder_env.items() if k != "DATABASE_URL"}
    sent = subprocess.run(
        [sys.executable, "-c", SHOW_MODULES], env=env, capture_output=True, text=True, cwd=ROOT
    )
    assert sent.returncode == 0, sent.stderr
    run_id, _, listed = sent.stdout.partition("MODULES ")
    loaded = set(json.loads(listed))
    assert sorted(m for m in loaded if m.split(".")[0] in HEAVY) == []
    assert {m for m in loaded if m.split(".")[0] == "tasks"} <= LIGHT_TASK_MODULES

    # A worker from the same app registers and runs every task: the backfill it was sent,
    # its fan-out chunks (3 skills a chunk), each skill's job, and reconcile.
    worker = start_worker({**embedder_env, "BACKFILL_CHUNK_SIZE": "3"}, tmp_path / "worker.log")
    try:
        wait_until(lambda: summaries(worker.log()), what="the summary line")
        assert summaries(worker.log()) == [(7, 7, 0)]
        assert embedded_ids(db) == set(skills)
        log = worker.log()
        for task in ("tasks.backfill", "tasks.fan_out", "tasks.embed_skill", "tasks.reconcile"):
            assert f". {task}" in log  # the banner's list of registered tasks
        assert f"Task tasks.backfill[{run_id.strip()}] succeeded" in log
        # The run closes through its batches, maybe before its last fan-out chunk is done.
        wait_until(lambda: re.search(r"Task tasks\.fan_out\[\S+\] succeeded", worker.log()),
                   what="a fan-out chunk")  # fmt: skip
        db.execute("DELETE FROM skill_embeddings WHERE skill_id = :id", id=skills[0])
        call_backfill(embedder_env)  # of this run, only the deleted row goes to Ollama
        wait_until(lambda: len(summaries(worker.log())) == 2, what="the second summary")
        assert summaries(worker.log())[1] == (7, 7, 0)
        assert ollama.inputs == 8
        reconciled = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "worker", "call", "tasks.reconcile"],
            env=env, capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
        assert reconciled.returncode == 0, reconciled.stderr
        reconcile_id = reconciled.stdout.strip()
        wait_until(
            lambda: f"Task tasks.reconcile[{reconcile_id}] succeeded" in worker.log(),
            what="reconcile to run",
        )
    finally:
        worker.stop()


def test_a_worker_runs_one_job_at_a_time_and_reserves_no_other(
    worker: Process, embedder_env: dict[str, str]
) -> None:
    # Options the worker's command line reads before the tasks and settings load.
    app = Celery("inspect", broker=embedder_env["REDIS_URL"], set_as_current=False)
    try:
        # The worker is alone on its broker: its answer is the one to wait for.
        stats = app.control.inspect(timeout=10, limit=1).stats() or {}
    finally:
        app.close()
    [node] = stats.values()
    assert node["pool"]["max-concurrency"] == 1
    assert node["prefetch_count"] == 1


def test_a_worker_without_database_url_says_so_in_one_line(
    embedder_env: dict[str, str], tmp_path: Path
) -> None:
    env = {k: v for k, v in embedder_env.items() if k != "DATABASE_URL"}
    process = Process(
        [sys.executable, "-m", "celery", "-A", "worker", "worker"], env, tmp_path / "w.log"
    ).start()
    assert process.process is not None
    assert process.process.wait(60) == 2
    lines = process.log().strip().splitlines()
    assert lines == ["error: DATABASE_URL is not set: export DATABASE_URL=... (see the README's"
                     " configuration table)"]  # fmt: skip
