"""How many skills a second does a backfill embed as the catalog grows, beside the seed's loop
and the model's limit?

`python -m bench.throughput [--sizes 150 1000 3000] [--zero-cost-skills 3000]` starts a
throwaway stack, a real worker and two fake Ollamas in processes of their own: one at the CPU
model's cost (default 7.5 ms a request + 4.3 ms an input: all-MiniLM-L6-v2 on a 2-core CPU)
and one at zero cost (a fast GPU); the tenant's settings name the fake of each phase. For each
catalog size at the CPU model's cost, and once at zero cost:

  (a) the seed plan's loop: select the published skills; for each, POST /api/embed and a
      committed upsert (one request, one commit, no concurrency);
  (b) `tasks.backfill` through the worker over the same catalog, queued from this process:
      skills/s to its summary, to the last of its jobs confirmed, and the time to its first row;
  (c) the model's limit: a batch of 32 holds Ollama's one slot request + 32 x input.

Then the worker's RSS (main + pool). bench.chart draws (a), (b) and (c) against the size.
"""

from __future__ import annotations

import argparse
import os

from bench.harness import Results, console, model_limit, sequential_loop, tree_rss_mb
from bench.harness import backfill as timed_backfill
from devstack import seed
from devstack.stack import stack

BATCH = 32


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[150, 1000, 3000])
    parser.add_argument("--zero-cost-skills", type=int, default=3000, help="0 leaves it out")
    parser.add_argument("--request-ms", type=float, default=7.5)
    parser.add_argument("--input-ms", type=float, default=4.3)
    parser.add_argument("--batch-size", type=int, default=BATCH)
    args = parser.parse_args(argv)
    results = Results("throughput", sizes=args.sizes, zero_cost_skills=args.zero_cost_skills,
                      cost_model_ms=[args.request_ms, args.input_ms],
                      batch_size=args.batch_size)  # fmt: skip
    phases = [(size, "cpu") for size in args.sizes]
    phases += [(args.zero_cost_skills, "zero")] if args.zero_cost_skills else []
    series: list[dict[str, float | str]] = []  # one point a phase, with the load at its end
    with stack(prefix="bench-throughput-") as s:
        fakes = {"cpu": s.fake(args.request_ms, args.input_ms), "zero": s.fake()}
        env = s.env(fakes["cpu"].url, EMBED_BATCH_SIZE=str(args.batch_size))
        worker = s.worker(env)
        for size, cost in phases:
            fake = fakes[cost]
            request_ms, input_ms = (args.request_ms, args.input_ms) if cost == "cpu" else (0, 0)
            label = f"{size:,} skills, {'CPU model' if cost == 'cpu' else 'zero cost'}"
            console.print(f"[bold]{label}")
            seed.clear(s.engine)
            seed.add_tenants(s.engine, ollama_url=fake.url)
            seed.seed_catalog(s.engine, size)
            count, loop_s = sequential_loop(s.engine, fake.url)
            seed.clear(s.engine, catalog=False)
            fake.reset()
            run = timed_backfill(s.engine, env, command=False, first_row=True, drain=True)
            stats = fake.stats()
            limit = model_limit(request_ms, input_ms, args.batch_size)
            rate = count / run.summary_s
            results.add(f"{label}: seed plan's loop", count / loop_s, "skills/s")
            results.add(
                f"{label}: tasks.backfill to its summary", rate, "skills/s",
                limit=("the model's limit", limit) if limit else None,
                target=">= 0.9x the limit" if limit else ">= 500/s",
            )  # fmt: skip
            results.add(f"{label}: speed-up over the seed loop", loop_s / run.summary_s, "x",
                        target=">= 3.4x" if limit else ">= 3x")  # fmt: skip
            assert run.drained_s is not None
            assert run.first_row_s is not None
            results.add(f"{label}: ... to its last job confirmed", count / run.drained_s,
                        "skills/s")  # fmt: skip
            results.add(f"{label}: queued -> first row", run.first_row_s, "s", target="<= 0.5 s")
            results.add(f"{label}: Ollama requests", stats["requests"], "requests")
            results.add(f"{label}: Ollama inputs", stats["inputs"], "inputs")
            series.append({"cost": cost, "skills": count, "seed_loop_per_s": count / loop_s,
                           "backfill_per_s": rate, "drained_per_s": count / run.drained_s,
                           "model_limit_per_s": limit or 0.0,
                           "load": os.getloadavg()[0]})  # fmt: skip
        results.add("worker RSS (main + pool), after the runs", tree_rss_mb(worker.pid), "MB")
    results.details["series"] = series
    results.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
