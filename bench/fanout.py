"""Memory and enqueue time of `tasks.backfill` fanning out N skills (numbers, not assertions).

`python -m bench.fanout [--skills 10000 100000] [--tenants 2]` starts a throwaway PostgreSQL,
Redis and fake Ollama, seeds N published skills in SQL, then runs `start_backfill` in a child
process (no worker, so every message stays in Redis) while a thread samples the child's RSS
every 20 ms. It prints a table and writes bench/results/fanout.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from devstack.postgres import LocalPostgres

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "fanout.json"
DEFAULT_TENANT = "default-tenant-000-0000-000000000000"
QUEUE = "embed_bulk"  # tasks.queues.BULK; kombu's redis transport keeps it as a list of this name
SAMPLE_SECONDS = 0.02
MB = 1024 * 1024

# Words for names and descriptions of realistic length (names ~35-60, descriptions ~300 chars).
_VERBS = ["Review", "Draft", "Migrate", "Audit", "Debug", "Plan", "Summarise", "Refactor"]
_TOPICS = [
    "Kubernetes rollout", "quarterly OKR", "PostgreSQL index", "incident postmortem",
    "customer onboarding", "React component", "GDPR data request", "Terraform module",
    "sales pipeline", "API rate limit", "release notes", "on-call handover",
]  # fmt: skip
_THINGS = ["checklist", "playbook", "assistant", "template", "guide", "reviewer"]
_SENTENCES = [
    "Walks through each step with the questions a senior engineer would ask.",
    "Produces a short summary, a list of risks and the owners who should sign off.",
    "Reads the attached context first and refuses to guess when something is missing.",
    "Formats the result as Markdown with headings the team already uses in its wiki.",
    "Flags anything that touches production data, billing or personal information.",
    "Keeps the tone neutral and cites the source of every number it reports.",
]


def _sql_array(words: list[str]) -> str:
    return "ARRAY[" + ", ".join("'" + word.replace("'", "''") + "'" for word in words) + "]"


SEED_SKILLS_SQL = f"""
    INSERT INTO skills (id, tenant_id, name, description, status, visibility)
    SELECT
        md5('bench-skill-' || i)::uuid::text,
        (CAST(:tenants AS text[]))[1 + i % :tenant_count],
        ({_sql_array(_VERBS)})[1 + i % {len(_VERBS)}] || ' ' ||
            ({_sql_array(_TOPICS)})[1 + (i / 7) % {len(_TOPICS)}] || ' ' ||
            ({_sql_array(_THINGS)})[1 + (i / 3) % {len(_THINGS)}] || ' #' || i,
        ({_sql_array(_SENTENCES)})[1 + i % {len(_SENTENCES)}] || ' ' ||
            ({_sql_array(_SENTENCES)})[1 + (i / 5) % {len(_SENTENCES)}] || ' ' ||
            ({_sql_array(_SENTENCES)})[1 + (i / 11) % {len(_SENTENCES)}] || ' ' ||
            ({_sql_array(_SENTENCES)})[1 + (i / 13) % {len(_SENTENCES)}] || ' Variant ' || i || '.',
        'published',
        'tenant'
    FROM generate_series(1, :count) AS i
"""


def tenant_ids(count: int) -> list[str]:
    return [DEFAULT_TENANT] + [f"bench-tenant-{n:03d}-0000-000000000000" for n in range(1, count)]


# ------------------------------------------------------------------------------------------
# The child: imports the worker's app, runs start_backfill, samples its own RSS.


@dataclass
class ChildResult:
    skills: int
    queued: int
    published_messages: int
    baseline_rss_mb: float
    first_publish_rss_mb: float
    peak_rss_mb: float
    end_rss_mb: float
    publish_growth_mb: float  # peak while publishing minus RSS at the first publish
    prepare_s: float  # preflight, run row, INSERT ... SELECT per tenant, cursor's first batch
    insert_select_s: float  # the INSERT INTO embedding_run_items ... SELECT statements alone
    publish_s: float  # first apply_async to last
    finish_s: float  # last apply_async to start_backfill's return (mark_fanned_out)
    total_s: float
    messages_per_s: float
    rss_by_decile_mb: list[float] = field(default_factory=list)  # peak in each 10% of messages
    samples: int = 0


class Sampler(threading.Thread):
    """Samples this process's RSS every 20 ms, with how many messages were published so far."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        import psutil

        self._process = psutil.Process()
        self._halt = threading.Event()
        self.published = 0  # bumped by the before_task_publish handler
        self.first_publish: float | None = None
        self.first_publish_rss = 0
        self.last_publish = 0.0
        # Flat arrays (8 bytes a value), so the samples themselves barely move the RSS.
        self.times, self.rsses, self.counts = array("d"), array("q"), array("q")

    def rss(self) -> int:
        return int(self._process.memory_info().rss)

    def on_publish(self, **_: Any) -> None:
        now = time.monotonic()
        if self.first_publish is None:
            self.first_publish = now
            self.first_publish_rss = self.rss()
        self.last_publish = now
        self.published += 1

    def sample(self) -> None:
        self.times.append(time.monotonic())
        self.rsses.append(self.rss())
        self.counts.append(self.published)

    @property
    def samples(self) -> Iterator[tuple[float, int, int]]:
        """(monotonic, rss, published) of every sample."""
        return zip(self.times, self.rsses, self.counts, strict=True)

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(SAMPLE_SECONDS)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        self.sample()


class StatementTimer:
    """Sums the time the engine spends in the run-item INSERT ... SELECT statements."""

    def __init__(self, engine: Engine) -> None:
        from sqlalchemy import event

        self.seconds = 0.0
        self._started = 0.0
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, *_: Any) -> None:
        self._started = time.monotonic()

    def _after(self, conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().startswith("INSERT INTO embedding_run_items"):
            self.seconds += time.monotonic() - self._started


def run_child(out: Path) -> None:
    import psutil
    from celery.signals import before_task_publish

    from tasks import runtime
    from worker.celery_app import app
    from worker.environment import load_or_exit
    from worker.serve import configure_worker
    from worker.settings import Settings

    configure_worker(app, load_or_exit(Settings.load))  # as a worker process does when it starts
    from tasks.backfill import start_backfill
    from tasks.jobs import embed_skill

    baseline = int(psutil.Process().memory_info().rss)
    timer = StatementTimer(runtime.current().engine)  # the engine itself connects lazily
    sampler = Sampler()
    before_task_publish.connect(sampler.on_publish, weak=False)
    sampler.start()
    started = time.monotonic()
    try:
        summary = start_backfill(runtime.current(), embed_skill, None, None, False)
    finally:
        ended = time.monotonic()
        sampler.stop()
    first = sampler.first_publish or ended
    last = sampler.last_publish or ended
    queued = int(summary["queued"])
    deciles: list[float] = []
    for k in range(10):
        low, high = queued * k // 10, queued * (k + 1) // 10
        inside = [rss for _, rss, n in sampler.samples if low < n <= high]
        deciles.append(round(max(inside) / MB, 1) if inside else 0.0)
    publishing = [rss for t, rss, _ in sampler.samples if first <= t <= last]
    peak = max(sampler.rsses)
    publish_s = max(last - first, 1e-9)
    result = ChildResult(
        skills=int(summary["total"]),
        queued=queued,
        published_messages=sampler.published,
        baseline_rss_mb=round(baseline / MB, 1),
        first_publish_rss_mb=round(sampler.first_publish_rss / MB, 1),
        peak_rss_mb=round(peak / MB, 1),
        end_rss_mb=round(sampler.rsses[-1] / MB, 1),
        publish_growth_mb=round(
            (max(publishing, default=sampler.first_publish_rss) - sampler.first_publish_rss) / MB,
            1,
        ),
        prepare_s=round(first - started, 3),
        insert_select_s=round(timer.seconds, 3),
        publish_s=round(publish_s, 3),
        finish_s=round(ended - last, 3),
        total_s=round(ended - started, 3),
        messages_per_s=round(sampler.published / publish_s, 1),
        rss_by_decile_mb=deciles,
        samples=len(sampler.rsses),
    )
    out.write_text(json.dumps(asdict(result)))


# ------------------------------------------------------------------------------------------
# The parent: throwaway servers, one fresh database per size, the child, the checks.


@dataclass
class SizeResult:
    child: ChildResult
    tenants: int
    seed_s: float
    redis_llen: int
    run_items: int


def _engine(url: str) -> Engine:
    from db.session import make_engine
    from worker.settings import normalise_database_url

    return make_engine(normalise_database_url(url))


def prepare_database(
    server: LocalPostgres, name: str, skills: int, tenants: list[str], ollama: str
) -> float:
    """A fresh migrated database with the tenants, their settings and `skills` skills."""
    from sqlalchemy import text

    from db import migrate

    server.psql(f"CREATE DATABASE {name}")
    engine = _engine(server.url(database=name))
    try:
        migrate.upgrade(engine)
        started = time.monotonic()
        with engine.begin() as connection:
            for tenant in tenants:
                connection.execute(
                    text("INSERT INTO tenants (id, name, slug) VALUES (:id, :name, :slug)"),
                    {"id": tenant, "name": f"Bench {tenant[:18]}", "slug": tenant},
                )
                connection.execute(
                    text(
                        "INSERT INTO site_settings (id, tenant_id, semantic_similarity_enabled,"
                        " ollama_url) VALUES (:id, :tenant, true, :url)"
                    ),
                    {"id": f"settings-{tenant}", "tenant": tenant, "url": ollama},
                )
            connection.execute(
                text(SEED_SKILLS_SQL),
                {"tenants": tenants, "tenant_count": len(tenants), "count": skills},
            )
        with engine.begin() as connection:
            connection.execute(text("ANALYZE"))
        return time.monotonic() - started
    finally:
        engine.dispose()


def count_run_items(server: LocalPostgres, name: str) -> int:
    return int(server.psql("SELECT count(*) FROM embedding_run_items", database=name).strip())


def run_size(
    server: LocalPostgres,
    redis_url: str,
    ollama_url: str,
    skills: int,
    tenant_count: int,
    work: Path,
) -> SizeResult:
    import redis

    name = f"bench_fanout_{skills}"
    tenants = tenant_ids(tenant_count)
    client = redis.Redis.from_url(redis_url)
    try:
        client.flushall()
        seed_s = prepare_database(server, name, skills, tenants, ollama_url)
        out = work / f"child-{skills}.json"
        env = {
            **os.environ,
            "DATABASE_URL": server.url(database=name),
            "REDIS_URL": redis_url,
            "OLLAMA_URL": ollama_url,
            "DEFAULT_TENANT_ID": DEFAULT_TENANT,
        }
        subprocess.run(
            [sys.executable, "-m", "bench.fanout", "--child", "--out", str(out)],
            cwd=ROOT,
            env=env,
            check=True,
            timeout=1800,
        )
        child = ChildResult(**json.loads(out.read_text()))
        return SizeResult(
            child=child,
            tenants=tenant_count,
            seed_s=round(seed_s, 2),
            redis_llen=int(client.llen(QUEUE)),
            run_items=count_run_items(server, name),
        )
    finally:
        client.flushall()
        client.close()
        server.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def print_table(results: list[SizeResult]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tasks.backfill fan-out (child process RSS, MB)")
    for column in (
        "skills", "base", "1st pub", "peak", "end", "growth", "prep s", "ins s", "pub s",
        "tot s", "msg/s", "LLEN", "items",
    ):  # fmt: skip
        table.add_column(column, justify="right")
    for result in results:
        c = result.child
        table.add_row(
            f"{c.skills:,}", f"{c.baseline_rss_mb:.1f}", f"{c.first_publish_rss_mb:.1f}",
            f"{c.peak_rss_mb:.1f}", f"{c.end_rss_mb:.1f}", f"{c.publish_growth_mb:+.1f}",
            f"{c.prepare_s:.2f}", f"{c.insert_select_s:.2f}", f"{c.publish_s:.2f}",
            f"{c.total_s:.2f}",
            f"{c.messages_per_s:,.0f}", f"{result.redis_llen:,}", f"{result.run_items:,}",
        )  # fmt: skip
    console = Console(width=max(Console().width, 120))
    console.print(table)
    for result in results:
        deciles = " ".join(f"{mb:.0f}" for mb in result.child.rss_by_decile_mb)
        console.print(f"{result.child.skills:>7,} skills, peak RSS per 10% of messages: {deciles}")


def run_parent(sizes: list[int], tenant_count: int) -> list[SizeResult]:
    from devstack.fake_ollama import FakeOllama
    from devstack.postgres import LocalPostgres
    from devstack.redis import LocalRedis

    work = Path(tempfile.mkdtemp(prefix="bench-fanout-"))
    server: LocalPostgres | None = None
    broker: LocalRedis | None = None
    fake: FakeOllama | None = None
    try:
        server = LocalPostgres(work / "pgdata", durable=False).start()
        broker = LocalRedis().start()
        fake = FakeOllama().start()
        results = []
        for size in sizes:
            print(f"fan-out of {size:,} skills over {tenant_count} tenants ...", flush=True)
            results.append(run_size(server, broker.url, fake.url, size, tenant_count, work))
        return results
    finally:
        if fake is not None:
            fake.stop()
        if broker is not None:
            broker.stop()
        if server is not None:
            server.destroy()
        shutil.rmtree(work, ignore_errors=True)


def write_results(results: list[SizeResult]) -> Path:
    import psutil

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "sample_interval_s": SAMPLE_SECONDS,
        "results": [asdict(result) for result in results],
    }
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
    return RESULTS


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__)
    parser.add_argument(
        "--skills",
        "--sizes",
        dest="sizes",
        type=int,
        nargs="+",
        default=[10_000, 100_000],
        help="numbers of skills, one fan-out each (default: 10000 100000)",
    )
    parser.add_argument("--tenants", type=int, default=2, help="tenants to spread skills over")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.out)
        return
    if args.tenants < 1 or any(size < 1 for size in args.sizes):
        parser.error("--skills and --tenants must be at least 1")
    # SIGTERM (and SIGINT, even where a shell ignores it) unwinds, so the servers come down.
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    try:
        results = run_parent(args.sizes, args.tenants)
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'SIGINT'}); servers stopped, nothing written", file=sys.stderr)
        raise SystemExit(130) from None
    print_table(results)
    for result in results:
        if result.redis_llen != result.child.queued:
            print(f"warning: LLEN {QUEUE} = {result.redis_llen}, expected {result.child.queued}")
    print(f"results written to {write_results(results).relative_to(ROOT)}")


if __name__ == "__main__":
    main()
