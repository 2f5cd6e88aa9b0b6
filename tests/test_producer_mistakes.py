"""Whatever a producer puts on a queue, the worker refuses in one line, keeps it aside, counts it
and goes on serving: entries that are not messages, messages Celery cannot run, bad arguments."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from devstack.fake_ollama import FakeOllama
from devstack.ports import free_port
from tasks import CELERY_DEFAULT, EMBED_SKILL, INTERACTIVE, enqueue_embed_skill
from tests.backfills import embedded_ids
from tests.databases import TENANT_A, Database
from tests.processes import celery, start_worker
from tests.test_metrics import scrape, value
from tests.waiting import wait_until

SIGNATURE = "embed_skill(skill_id: str, tenant_id: str | None = None, *, run_id: str | None = None"


class CreatesFile:
    """Unpickling this opens `path` for writing: a pickle that is decoded leaves the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


@pytest.fixture
def producer(redis_url: str) -> Iterator[Celery]:
    """A producer as a buggy program would hold one: any task name, any arguments."""
    app = Celery("buggy", broker=redis_url, set_as_current=False)
    yield app
    app.close()


def envelope(producer: Celery, client: redis.Redis, **options: object) -> dict[str, object]:
    """A well-formed embed_skill message, as kombu stores it in Redis, taken off a spare queue."""
    producer.send_task(EMBED_SKILL, args=["some-skill"], queue="spare", **options)
    raw = client.rpop("spare")
    assert isinstance(raw, bytes)
    return dict(json.loads(raw))


def lines_about(lines: list[str], needle: str) -> list[str]:
    return [line for line in lines if needle in line]


def warnings(log: str) -> list[str]:
    """The lines an operator is shown (Celery's own INFO line of a failed job echoes ours)."""
    return [line for line in log.splitlines() if re.search(r": (WARNING|ERROR|CRITICAL)/", line)]


@pytest.mark.slow  # a worker of its own
def test_whatever_a_producer_sends_the_same_worker_refuses_it_in_one_line_and_serves_on(
    db: Database, embedder_env: dict[str, str], ollama: FakeOllama, producer: Celery,
    tmp_path: Path,
) -> None:  # fmt: skip
    db.add_tenant(TENANT_A)
    target = db.add_skill(TENANT_A, "Triage incoming bugs", "Label and route new issues")
    leader, ahead, good = (
        db.add_skill(TENANT_A, name, "From merged pull requests")
        for name in ("Summarise a release", "Draft a changelog", "Write release notes")
    )
    port = free_port()
    env = {**embedder_env, "METRICS_PORT": str(port), "CATCH_UP_INTERVAL_SECONDS": "3600"}
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        assert worker.process is not None
        pid = worker.process.pid
        client = redis.Redis.from_url(embedder_env["REDIS_URL"])
        # Everything waits behind a job held at Ollama, as behind any busy worker; the first
        # app job after it looks for companions among what waits with it.
        gate = ollama.hold()
        assert enqueue_embed_skill(leader, TENANT_A, broker_url=embedder_env["REDIS_URL"])
        gate.wait_held()
        assert enqueue_embed_skill(ahead, TENANT_A, broker_url=embedder_env["REDIS_URL"])

        # Entries that are not messages, straight onto the queues.
        no_headers = envelope(producer, client)
        del no_headers["headers"]
        bad_base64 = {**envelope(producer, client), "body": "%%% not base64 %%%"}
        listed_task = envelope(producer, client)
        listed_task["headers"]["task"] = [EMBED_SKILL]  # type: ignore[index]
        not_a_body = {**envelope(producer, client), "body": base64.b64encode(b"[1, 2, 3]").decode()}
        entries = [  # (reason, queue, entry)
            ("not_json", INTERACTIVE, b"this is not json"),
            ("not_a_message", CELERY_DEFAULT, b'{"hello": "world"}'),
            ("undecodable", INTERACTIVE, json.dumps(bad_base64).encode()),
            ("no_headers", INTERACTIVE, json.dumps(no_headers).encode()),
            ("bad_headers", CELERY_DEFAULT, json.dumps(listed_task).encode()),
            ("not_a_message", INTERACTIVE, json.dumps(not_a_body).encode()),
        ]
        for _, queue, entry in entries:
            client.lpush(queue, entry)
        # Messages Celery cannot run: a task nobody registers, a pickled body.
        unpickled = tmp_path / "unpickled"
        pickled = producer.send_task(
            EMBED_SKILL, args=[CreatesFile(unpickled)], queue=INTERACTIVE, serializer="pickle"
        ).id
        unknown = producer.send_task("tasks.no_such_task", args=[target], queue=INTERACTIVE).id
        # Jobs whose arguments do not fit their task.
        jobs = {
            "missing": (EMBED_SKILL, [], {}),
            "int id": (EMBED_SKILL, [42], {"tenant_id": TENANT_A}),
            "null id": (EMBED_SKILL, [None], {"tenant_id": TENANT_A}),
            "four positional": (EMBED_SKILL, [target, TENANT_A, "run", False], {}),
            "unknown keyword": (EMBED_SKILL, [target], {"tenant_id": TENANT_A, "colour": "red"}),
            "megabyte id": (EMBED_SKILL, ["x" * 1_000_000], {"tenant_id": TENANT_A}),
            "backfill int tenant": ("tasks.backfill", [], {"tenant_id": 42}),
            "reconcile args": ("tasks.reconcile", [1], {}),
            "fan_out nothing": ("tasks.fan_out", [], {}),
            "stage_switch null": ("tasks.stage_switch", [None], {}),
            "switch_model int": ("tasks.switch_model", [42], {}),
        }
        sent = {
            label: producer.send_task(name, args=args, kwargs=kwargs, queue=INTERACTIVE).id
            for label, (name, args, kwargs) in jobs.items()
        }
        called = subprocess.run(
            celery("call", "tasks.backfill", "--kwargs", json.dumps({"tenant": TENANT_A})),
            env=embedder_env, capture_output=True, text=True,
        )  # fmt: skip
        assert called.returncode == 0, called.stderr
        sent["celery call --kwargs"] = called.stdout.strip()
        gate.release()

        # Then the app publishes: the same worker embeds it.
        assert enqueue_embed_skill(good, TENANT_A, broker_url=embedder_env["REDIS_URL"])
        wait_until(lambda: good in embedded_ids(db), what="the publish after them to be embedded")
        refusals = len(entries) + len(sent) + 2  # and the pickle, and the unknown task
        wait_until(lambda: len(lines_about(warnings(worker.log()), "Refused")) >= refusals,
                   what="a line for each refusal")  # fmt: skip
        # Each job's end: its message acknowledged (late acks), and none queued or held for a
        # retry's countdown.
        wait_until(lambda: not any(client.llen(q) for q in (INTERACTIVE, CELERY_DEFAULT))
                   and not client.hlen("unacked"), what="each job's end")  # fmt: skip

        log = worker.log()
        shown = warnings(log)
        assert worker.process.poll() is None
        assert worker.process.pid == pid
        assert "ForkPoolWorker-2" not in log  # the pool's process did not die either
        assert "Traceback" not in log
        assert all(len(line) < 1000 for line in log.splitlines())
        reasons = Counter(reason for reason, _, _ in entries)
        for reason, queue, _ in entries:
            lines = lines_about(shown, f"({reason})")
            assert len(lines) == reasons[reason]
            assert any(f"of queue {queue}: " in line for line in lines)
            assert all("set aside in Redis list embedder:refused" in line for line in lines)
        [line] = lines_about(shown, pickled)
        assert "'application/x-python-serialize' is not accepted" in line
        assert not unpickled.exists()
        [line] = lines_about(shown, unknown)
        assert "no task 'tasks.no_such_task' is registered" in line
        for label, task_id in sent.items():
            [line] = lines_about(shown, task_id)
            assert "; the job must carry " in line, label
            assert not lines_about(log.splitlines(), f"[{task_id}] retry"), label
            # One line each (beside Celery's "received"): its line for the failed job would only
            # repeat ours.
            named = [seen for seen in lines_about(log.splitlines(), task_id)
                     if not seen.endswith(f"[{task_id}] received")]  # fmt: skip
            assert named == [line], label
        [line] = lines_about(shown, sent["int id"])
        assert SIGNATURE in line
        assert "skill_id: input should be a valid string, got 42;" in line
        assert "too many positional" in lines_about(shown, sent["four positional"])[0]
        assert "'colour'" in lines_about(shown, sent["unknown keyword"])[0]
        assert "at most 200 characters" in lines_about(shown, sent["megabyte id"])[0]
        assert "'tenant'" in lines_about(shown, sent["celery call --kwargs"])[0]

        # Nothing of theirs was written: the good skill's row, no failure, no run.
        assert embedded_ids(db) == {leader, ahead, good}
        assert db.scalar("SELECT count(*) FROM embedding_failures") == 0
        assert db.scalar("SELECT count(*) FROM embedding_runs") == 0

        # What was refused can be found where the lines say, and is counted per reason.
        records = [json.loads(r) for r in client.lrange("embedder:refused", 0, -1)]
        [garbage] = [r for r in records if r["reason"] == "not_json"]
        assert (garbage["queue"], garbage["entry"]) == (INTERACTIVE, "this is not json")
        expected = {**reasons, "content_type": 1, "unknown_task": 1,
                    "bad_arguments": len(sent)}  # fmt: skip
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
        for reason, count in expected.items():
            assert value(samples, "embedder_refused_messages_total", reason=reason) == count
        status, document = (
            subprocess.run([sys.executable, "-m", "worker", "status", *args], env=embedder_env,
                           capture_output=True, text=True)
            for args in ([], ["--json"])
        )  # fmt: skip
        assert status.returncode == document.returncode == 0, status.stderr + document.stderr
        assert json.loads(document.stdout)["refused"] == expected
        assert f"Refused messages: {sum(expected.values())} (bad_arguments {len(sent)}," in (
            status.stdout
        )
    finally:
        worker.stop()


def test_every_task_a_producer_can_send_checks_its_arguments() -> None:
    import tasks.jobs  # noqa: F401  # registers the tasks, as a worker does when it starts
    from tasks.arguments import CheckedTask
    from worker.celery_app import app

    ours = {name: task for name, task in app.tasks.items() if not name.startswith("celery.")}
    assert EMBED_SKILL in ours
    assert [name for name, task in ours.items() if not isinstance(task, CheckedTask)] == []
