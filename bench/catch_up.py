"""What the worker's catch-up costs on a large catalog (numbers, not assertions).

`python -m bench.catch_up [--skills 50000] [--stale 100]` starts a throwaway PostgreSQL and
Redis, seeds N published skills whose embeddings are current (vectors written in SQL; the
HNSW index is dropped first, since the reconcile never reads it and building it would take
minutes), then times the catch-up's turn (`CatchUp.tick`: the Redis lock, the bulk-lane check,
`tasks.reconcile`) with nothing to do and with `--stale` skills edited. No worker runs: the
queued jobs stay in Redis. See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import redis as redis_lib
import sqlalchemy as sa

from bench.throughput import TENANT, psycopg_url, seed_catalog
from db import migrate
from devstack.postgres import LocalPostgres
from devstack.redis import LocalRedis

CURRENT_EMBEDDINGS_SQL = """
INSERT INTO skill_embeddings (id, tenant_id, skill_id, embedding, model_name, dimensions,
                              input_hash)
SELECT gen_random_uuid()::text, tenant_id, id, array_fill(0.01, ARRAY[768])::vector,
       'nomic-embed-text', 768,
       encode(sha256(convert_to(name || ' ' || coalesce(description, ''), 'UTF8')), 'hex')
FROM skills WHERE status = 'published'
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skills", type=int, default=50_000)
    parser.add_argument("--stale", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = LocalPostgres(Path(tmp) / "pg", durable=False).start()
        broker = LocalRedis().start()
        try:
            server.psql("CREATE DATABASE bench")
            url = server.url(database="bench")
            engine = sa.create_engine(psycopg_url(url))
            migrate.upgrade(engine)
            seed_catalog(engine, args.skills, "http://127.0.0.1:9")
            with engine.begin() as connection:
                connection.exec_driver_sql("DROP INDEX IF EXISTS skill_embeddings_embedding_idx")
                connection.exec_driver_sql(CURRENT_EMBEDDINGS_SQL)
            with engine.begin() as connection:
                connection.exec_driver_sql("ANALYZE")
            current = _time_turns(url, broker.url, args.rounds)
            with engine.begin() as connection:
                connection.execute(
                    sa.text(
                        "UPDATE skills SET description = description || ' (edited)' WHERE id IN"
                        " (SELECT id FROM skills WHERE status = 'published' LIMIT :n)"
                    ),
                    {"n": args.stale},
                )
            stale = _time_turns(url, broker.url, 1)
            queued = redis_lib.Redis.from_url(broker.url).llen("embed_bulk")
            engine.dispose()
        finally:
            broker.stop()
            server.destroy()
    print(f"catalog: {args.skills} published skills, tenant {TENANT}")
    print(f"catch-up turn, all current: median {statistics.median(current):.3f} s"
          f" over {len(current)} ({', '.join(f'{t:.3f}' for t in current)})")  # fmt: skip
    print(f"catch-up turn, {args.stale} stale: {stale[0]:.3f} s, {queued} jobs queued")


def _time_turns(database_url: str, redis_url: str, rounds: int) -> list[float]:
    os.environ.update(DATABASE_URL=database_url, REDIS_URL=redis_url)
    import worker.celery_app  # noqa: F401  (the app the tasks send through, on this Redis)
    from tasks import runtime
    from tasks.jobs import reconcile
    from worker.catch_up import LOCK_NAME, CatchUp
    from worker.settings import Settings

    rt = runtime.install(Settings())
    catch_up = CatchUp(rt.redis, reconcile, interval=60)
    times = []
    for _ in range(rounds):
        rt.redis.delete(LOCK_NAME)  # a new interval: the turn is free
        started = time.perf_counter()
        assert catch_up.tick()
        times.append(time.perf_counter() - started)
    return times


if __name__ == "__main__":
    main()
