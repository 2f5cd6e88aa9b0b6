"""Redis (the broker) stopping under a working deployment: what is lost, what is caught, what
the worker logs, and how soon it serves again."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from db.catalog import input_hash, skill_text
from devstack.fake_ollama import FakeOllama
from devstack.redis import LocalRedis
from tasks import enqueue_embed_skill
from tests.backfills import call_backfill, embedded_ids, published_catalog, summaries
from tests.databases import TENANT_A, Database
from tests.processes import Process, celery, start_worker
from tests.waiting import wait_until
from worker.catch_up import CatchUp

# Short enough that an outage of a few seconds spans several recovery passes.
RECOVERY = "0.5"
CLAIM_FAILED = "Could not claim a batch of run"
CATCH_UP_SKIPPED = "Catch-up reconcile skipped: Redis did not answer"
CANNOT_REACH = "Cannot reach the broker at"
CONNECTED = "MainProcess] Connected to "  # the broker, through the screened transport
# Workers through the same outages: a traceback that comes in one worker process of three is
# missed by all of them in (2/3)^10 < 2 % of runs.
WORKERS = 10
NEIGHBOURLY = 2  # of them with mingle and gossip on
OUTAGES = 2
# bench.outage: a publish sent as Redis answers again is embedded 0.02-1.05 s later, whatever
# the outage's length (the worker tries at most 1 s apart); Celery's own backoff, up to 30 s.
# Twice the 2 s target, for a loaded machine; the outage below ends 7 s before Celery's next try.
EMBEDDED_AFTER_RETURN_SECONDS = 4.0


def assert_one_line_per_problem(log: str) -> None:
    """Every record on its line, and no problem logged more often than once per interval."""
    records = log.splitlines()
    assert [line for line in records if line and not line.startswith("[")] == []
    times: dict[str, list[float]] = {}
    for line in records:
        if "WARNING/" in line or "ERROR/" in line:
            stamp, message = line[1:].split(": ", 1)[0], line.split("] ", 1)[1]
            when = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            times.setdefault(re.sub(r"[0-9a-f-]{36}|\d+", "N", message), []).append(when)
    # The recovery pass's interval is the shortest: lines of one problem come at least that far
    # apart, and one more from the loop that met it first. The broker's comes once an outage.
    interval = float(RECOVERY)
    crowded = {
        problem: len(seen)
        for problem, seen in times.items()
        if len(seen) > (max(seen) - min(seen)) / interval + 2.01
    }
    assert crowded == {}
    assert [len(seen) for problem, seen in times.items() if problem.startswith(CANNOT_REACH)] == [1]


def logged(line: str, times: int) -> Callable[[str], bool]:
    return lambda log: log.count(line) >= times


def pongs(url: str) -> int:
    """Workers that answer `celery inspect ping` now."""
    app = Celery(broker=url, set_as_current=False)
    try:
        return len(app.control.ping(timeout=0.5) or [])
    except (redis.ConnectionError, OperationalError):  # kombu's pool still held a lost socket
        return 0
    finally:
        app.close()


def wait_for_redis(server: LocalRedis) -> None:
    """Until Redis answers commands (an append-only one answers LOADING while it reads)."""
    client = redis.Redis.from_url(server.url)
    try:
        wait_until(lambda: _answers(client), what="Redis answering")
    finally:
        client.close()


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.BusyLoadingError:
        return False


def stored_hash(db: Database, skill_id: str) -> object:
    return db.scalar("SELECT input_hash FROM skill_embeddings WHERE skill_id = :id", id=skill_id)


def test_an_edit_refused_during_a_broker_outage_is_embedded_without_beat(
    db: Database,
    embedder_env: dict[str, str],
    ollama: FakeOllama,
    redis_server: LocalRedis,
    tmp_path: Path,
) -> None:
    env = {**embedder_env, "CATCH_UP_INTERVAL_SECONDS": "1"}
    redis_url = env["REDIS_URL"]
    db.add_tenant(TENANT_A)
    skill = db.add_skill(TENANT_A, "Review pull requests", "Flag risky changes")
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        assert enqueue_embed_skill(skill, TENANT_A, broker_url=redis_url)
        wait_until(lambda: stored_hash(db, skill), what="the first embedding")

        redis_server.stop()
        db.edit_skill(skill, description="Flag risky changes and missing tests")
        refused = enqueue_embed_skill(skill, TENANT_A, broker_url=redis_url)
        redis_server.start()

        edited = input_hash(
            skill_text("Review pull requests", "Flag risky changes and missing tests")
        )
        wait_until(lambda: stored_hash(db, skill) == edited, timeout=30, what="the edit embedded")
    finally:
        worker.stop()

    assert refused is False
    assert ollama.inputs == 2


def test_redis_stopped_mid_batch_writes_its_vectors_and_logs_no_traceback(
    db: Database, embedder_env: dict[str, str], ollama: FakeOllama, tmp_path: Path
) -> None:
    # A Redis that keeps its data, as a deployment's does: its queue is there when it is back.
    server = LocalRedis(data_dir=tmp_path / "redis").start()
    env = {**embedder_env, "REDIS_URL": server.url, "RECOVERY_INTERVAL_SECONDS": RECOVERY}
    db.add_tenant(TENANT_A)
    skills = published_catalog(db, 200)
    names = {str(r.id): str(r.name) for r in db.rows("SELECT id, name FROM skills")}
    held = sorted(skills)[70]  # in the third batch of the run (skill id order, 32 a batch)
    gate = ollama.hold(match=names[held])
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        run_id = call_backfill(env)
        gate.wait_held()
        wait_until(
            lambda: db.scalar("SELECT fanned_out FROM embedding_runs WHERE id = :id", id=run_id),
            what="every job queued",
        )
        before = len(worker.log())
        server.stop()
        gate.release()
        wait_until(lambda: held in embedded_ids(db), what="the held batch's vectors written")
        # Down for several recovery passes (each tries the run's next batch) and reconnects.
        worker.wait_for(
            lambda log: log[before:].count(CLAIM_FAILED) >= 6, 30, "six recovery passes"
        )
        server.start()
        wait_until(lambda: summaries(worker.log()), timeout=90, what="the summary")
        log = worker.log()
    finally:
        worker.stop()
        server.stop()

    assert summaries(log) == [(200, 200, 0)]
    assert embedded_ids(db) == set(skills)
    assert ollama.inputs == 200  # no input sent twice
    assert "Traceback" not in log
    assert "CPendingDeprecationWarning" not in log
    assert_one_line_per_problem(log[before:])


def test_workers_ride_out_outages_in_one_line_each_with_or_without_mingle_and_gossip(
    db: Database, embedder_env: dict[str, str], ollama: FakeOllama, tmp_path: Path
) -> None:
    server = LocalRedis(data_dir=tmp_path / "redis").start()
    # Each worker its own hash order: Celery's gossip logged its traceback in some orders only.
    env = {**embedder_env, "REDIS_URL": server.url, "PYTHONHASHSEED": "random"}
    db.add_tenant(TENANT_A)
    # Started as the README says, the last ones with the operator's WORKER_MINGLE_GOSSIP=true.
    neighbourly = range(WORKERS - NEIGHBOURLY, WORKERS)
    workers = [
        Process(celery("worker", "--loglevel=INFO", f"--hostname=w{i}@%h"),
                {**env, "WORKER_MINGLE_GOSSIP": str(i in neighbourly).lower()},
                tmp_path / f"worker-{i}.log").start()
        for i in range(WORKERS)
    ]  # fmt: skip
    try:
        for outage in range(1, OUTAGES + 2):
            for worker in workers:
                worker.wait_for(logged(CONNECTED, outage), 60, f"connection {outage}")
            if outage > OUTAGES:
                break
            # Serving when Redis goes away, as in use: every one answers on its broadcast queue.
            wait_until(lambda: pongs(server.url) == WORKERS, 30, "every worker's pong")
            server.stop()
            # Their steps have restarted while Redis is away: their clean-up met the lost Redis.
            for worker in workers:
                worker.wait_for(logged(CANNOT_REACH, outage), 30, f"outage {outage} seen")
            server.start()
        skill = db.add_skill(TENANT_A, "Review pull requests", "Flag risky changes")
        assert enqueue_embed_skill(skill, TENANT_A, broker_url=server.url)
        wait_until(lambda: stored_hash(db, skill), what="a publish embedded")
        logs = [worker.log() for worker in workers]
    finally:
        for worker in workers:
            worker.kill()  # no warm shutdown to wait for: nothing runs
        server.stop()

    for i, log in enumerate(logs):
        assert "Traceback" not in log
        assert "Error on restarting" not in log
        running = log.split(" ready.", 1)[1].splitlines()[1:]
        assert [line for line in running if not line.startswith("[")] == []
        assert log.count(CANNOT_REACH) == OUTAGES  # one line an outage
        # By default no wait for neighbours, at start or at any reconnect.
        assert log.count("mingle: searching for neighbors") == (
            OUTAGES + 1 if i in neighbourly else 0
        )


def test_a_publish_as_redis_returns_from_a_long_outage_is_embedded_at_once(
    db: Database, embedder_env: dict[str, str], ollama: FakeOllama, tmp_path: Path
) -> None:
    server = LocalRedis(data_dir=tmp_path / "redis").start()
    env = {**embedder_env, "REDIS_URL": server.url, "CATCH_UP_INTERVAL_SECONDS": "1"}
    db.add_tenant(TENANT_A)
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        before = len(worker.log())
        server.stop()
        # About 13 s away (one catch-up line a second): Celery's own reconnect would wait from
        # its fourth try, 12 s in, to its fifth, 20 s in.
        worker.wait_for(
            lambda log: log[before:].count(CATCH_UP_SKIPPED) >= 13, 60, "13 catch-up turns"
        )
        server.start()
        wait_for_redis(server)
        skill = db.add_skill(TENANT_A, "Review pull requests", "Flag risky changes")
        assert enqueue_embed_skill(skill, TENANT_A, broker_url=server.url)
        wait_until(
            lambda: stored_hash(db, skill),
            timeout=EMBEDDED_AFTER_RETURN_SECONDS,
            what="the publish embedded",
        )
        log = worker.log()[before:]
    finally:
        worker.stop()
        server.stop()

    assert "Traceback" not in log
    assert log.count("Cannot reach the broker") == 1
    assert "answers again, after" in log


def test_one_worker_of_the_deployment_catches_up_at_a_time(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    runs: list[str] = []
    first = CatchUp(client, lambda: runs.append("first"), interval=30)
    second = CatchUp(client, lambda: runs.append("second"), interval=30)
    try:
        assert first.tick()
        assert not second.tick()
        assert not first.tick()  # its turn lasts the interval, not only the reconcile
    finally:
        client.close()

    assert runs == ["first"]
