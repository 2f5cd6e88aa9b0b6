"""Does `tasks.backfill` queue N skills' jobs in flat memory, and how fast?

`python -m bench.fanout [--skills 10000 100000] [--tenants 2]` starts a throwaway stack, seeds
N published skills in SQL (a fresh database per size), then runs `start_backfill` in a child
process (no worker, so every message stays in Redis) while a thread samples the child's RSS
every 20 ms. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from devstack.stack import Stack

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "embed_bulk"  # tasks.BULK; kombu's redis transport keeps it as a list of this name
SAMPLE_SECONDS = 0.02
MB = 1024 * 1024


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
# The parent: the stack, one fresh database per size, the child.


@dataclass
class SizeResult:
    child: ChildResult
    tenants: int
    seed_s: float
    redis_llen: int
    run_items: int


def run_size(s: Stack, ollama_url: str, skills: int, tenant_count: int) -> SizeResult:
    import redis

    from devstack import seed
    from devstack.stack import engine_for

    name = f"bench_fanout_{skills}"
    tenants = seed.tenant_ids(tenant_count)
    client = redis.Redis.from_url(s.redis_url)
    try:
        client.flushall()
        url = s.database(name)
        engine = engine_for(url)
        started = time.monotonic()
        seed.add_tenants(engine, tenants, ollama_url=ollama_url)
        seed.seed_catalog(engine, skills, tenants, drafts=False)
        seed.analyze(engine)
        seed_s = time.monotonic() - started
        engine.dispose()
        out = s.work / f"child-{skills}.json"
        env = s.env(ollama_url, DATABASE_URL=url, DEFAULT_TENANT_ID=seed.TENANT)
        subprocess.run([sys.executable, "-m", "bench.fanout", "--child", "--out", str(out)],
                       cwd=ROOT, env=env, check=True, timeout=1800)  # fmt: skip
        items = s.postgres.psql("SELECT count(*) FROM embedding_run_items", database=name)
        return SizeResult(child=ChildResult(**json.loads(out.read_text())), tenants=tenant_count,
                          seed_s=round(seed_s, 2), redis_llen=int(client.llen(QUEUE)),
                          run_items=int(items.strip()))  # fmt: skip
    finally:
        client.flushall()
        client.close()
        s.drop_database(name)


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
    from bench.harness import Results, console
    from devstack.stack import stack

    results = Results("fanout", sizes=args.sizes, tenants=args.tenants,
                      sample_interval_s=SAMPLE_SECONDS)  # fmt: skip
    sizes: list[SizeResult] = []
    with stack(prefix="bench-fanout-") as s:
        fake = s.fake()
        for size in args.sizes:
            console.print(f"fan-out of {size:,} skills over {args.tenants} tenants")
            sizes.append(run_size(s, fake.url, size, args.tenants))
    for result in sizes:
        c, label = result.child, f"{result.child.skills:,} skills"
        results.add(f"{label}: seeding over {result.tenants} tenants", result.seed_s, "s")
        results.add(f"{label}: RSS before", c.baseline_rss_mb, "MB")
        results.add(f"{label}: RSS at the first message", c.first_publish_rss_mb, "MB")
        results.add(f"{label}: peak RSS", c.peak_rss_mb, "MB", target="< 150 MB")
        results.add(f"{label}: RSS at the end", c.end_rss_mb, "MB")
        results.add(f"{label}: growth while queuing", c.publish_growth_mb, "MB", target="flat")
        results.add(f"{label}: preparing (preflight, run, items)", c.prepare_s, "s")
        results.add(f"{label}: ... of which INSERT ... SELECT", c.insert_select_s, "s")
        results.add(f"{label}: queuing", c.publish_s, "s")
        results.add(f"{label}: last message -> return (the run marked fanned out)", c.finish_s,
                    "s")  # fmt: skip
        results.add(f"{label}: from start to return", c.total_s, "s")
        results.add(f"{label}: queued", c.messages_per_s, "messages/s")
        results.add(f"{label}: messages in Redis", result.redis_llen, "messages")
        results.add(f"{label}: run items", result.run_items, "items")
        deciles = " ".join(f"{mb:.0f}" for mb in c.rss_by_decile_mb)
        console.print(f"{label}, peak RSS (MB) in each 10% of the messages: {deciles}")
        if result.redis_llen != c.queued:
            console.print(f"warning: LLEN {QUEUE} = {result.redis_llen}, expected {c.queued}")
    results.details["sizes"] = [asdict(result) for result in sizes]
    results.write()


if __name__ == "__main__":
    main()
