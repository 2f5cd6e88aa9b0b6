"""What does the worker's catch-up cost a turn on a large catalog?

`python -m bench.catch_up [--skills 50000] [--stale 100]` starts a throwaway stack, seeds N
published skills whose embeddings are current (vectors written in SQL; the HNSW index is
dropped first, since the reconcile never reads it and building it would take minutes), then
times the catch-up's turn (`CatchUp.tick`: the Redis lock, the bulk-lane check,
`tasks.reconcile`) with nothing to do and with `--stale` skills edited. No worker runs: the
queued jobs stay in Redis. See bench/README.md.
"""

from __future__ import annotations

import argparse
import statistics

import redis as redis_lib
import sqlalchemy as sa

from bench.harness import Results, catch_up_turns
from devstack import seed
from devstack.stack import stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.catch_up", description=__doc__)
    parser.add_argument("--skills", type=int, default=50_000)
    parser.add_argument("--stale", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    results = Results("catch_up", skills=args.skills, stale=args.stale, rounds=args.rounds)
    with stack(prefix="bench-catch-up-") as s:
        seed.add_tenants(s.engine, ollama_url="http://127.0.0.1:9")
        seed.drop_vector_index(s.engine)
        seed.seed_catalog(s.engine, args.skills, current=True)
        seed.analyze(s.engine)
        current = catch_up_turns(s.database_url, s.redis_url, args.rounds)
        with s.engine.begin() as connection:
            connection.execute(
                sa.text(
                    "UPDATE skills SET description = description || ' (edited)' WHERE id IN"
                    " (SELECT id FROM skills WHERE status = 'published' LIMIT :n)"
                ),
                {"n": args.stale},
            )
        stale = catch_up_turns(s.database_url, s.redis_url, 1)
        queued = redis_lib.Redis.from_url(s.redis_url).llen("embed_bulk")
    label = f"{args.skills:,} skills"
    results.add(f"{label}, all current: one turn, median", statistics.median(current), "s")
    results.add(f"{label}, all current: one turn, min", min(current), "s")
    results.add(f"{label}, all current: one turn, max", max(current), "s")
    results.add(f"{label}, {args.stale} edited: one turn", stale[0], "s")
    results.add(f"{label}, {args.stale} edited: jobs queued", queued, "jobs")
    results.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
