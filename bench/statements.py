"""What one statement costs the worker in each way there is to send it to PostgreSQL.

`python -m bench.statements [--rounds 2000]` runs an app job's load (db.catalog's one statement:
the tenant's settings, the skills, their stored rows), on a catalog of 1,000 published skills with
their vectors, in a transaction scoped to the tenant, three ways on the same pooled connection:
psycopg alone (the statement as the driver takes it), SQLAlchemy Core (`text()` on a Connection:
the worker's one way, db.sql), and SQLAlchemy's ORM (`Session.execute(text())`). Each figure is
the median of `--rounds` calls, the transaction's begin and commit included; the limit beside
the others is psycopg's own, from the same run. `--pause 0.05` idles before each call, as a
lone publish meets the database (every step after a pause runs slower on this machine).
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections.abc import Callable
from typing import Any, cast

import psycopg
import sqlalchemy as sa
from sqlalchemy.orm import Session

from bench.harness import Results, console
from db import catalog
from db.sql import TENANT_SETTING, scope_to_tenant
from devstack import seed
from devstack.seed import TENANT
from devstack.stack import stack


def _psycopg_sql(statement: sa.TextClause) -> str:
    # The same statement in the driver's own parameter style.
    return re.sub(r"(?<!:):(\w+)", r"%(\1)s", statement.text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.statements", description=__doc__)
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--skills", type=int, default=1000)
    parser.add_argument(
        "--pause", type=float, default=0.0, help="seconds idle before each call (a lone publish's)"
    )
    args = parser.parse_args(argv)
    results = Results("statements", rounds=args.rounds, skills=args.skills, pause_s=args.pause)
    with stack(prefix="bench-statements-") as s:
        seed.add_tenants(s.engine, ollama_url="http://127.0.0.1:9")
        skills = seed.seed_catalog(s.engine, args.skills, drafts=False, current=True,
                                   label="Statement")  # fmt: skip
        ids = skills[:1]  # a lone publish's load
        load = catalog._LOAD
        params = {"tenant": TENANT, "ids": ids}
        raw_sql = _psycopg_sql(load)
        engine = s.engine

        def core() -> None:
            with engine.begin() as conn:
                scope_to_tenant(conn, TENANT)
                catalog.load_tenant(conn, TENANT, ids)

        def orm() -> None:
            with Session(engine) as session, session.begin():
                session.execute(sa.text("SELECT set_config(:s, :t, true)"),
                                {"s": TENANT_SETTING, "t": TENANT})  # fmt: skip
                session.execute(load, params).all()

        def driver() -> None:
            fairy = engine.raw_connection()
            try:
                conn = cast("psycopg.Connection[Any]", fairy.driver_connection)
                with conn.transaction():
                    conn.execute("SELECT set_config(%s, %s, true)", (TENANT_SETTING, TENANT))
                    conn.execute(raw_sql, params).fetchall()
            finally:
                fairy.close()

        ways: dict[str, Callable[[], None]] = {"psycopg alone": driver,
                                               "SQLAlchemy Core (the worker's)": core,
                                               "SQLAlchemy ORM Session": orm}  # fmt: skip
        timings: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(50):  # warm the pool, the caches and the plan
            for way in ways.values():
                way()
        for _ in range(args.rounds):
            for name, way in ways.items():  # interleaved: a busy moment weighs on all three
                if args.pause:
                    time.sleep(args.pause)
                started = time.perf_counter()
                way()
                timings[name].append(time.perf_counter() - started)
    floor = statistics.median(timings["psycopg alone"]) * 1e6
    for name, seconds in timings.items():
        median = statistics.median(seconds) * 1e6
        results.add(f"{name}: scope + load + commit, p50", median, "us",
                    limit=("psycopg alone", floor))  # fmt: skip
        console.print(f"{name:34} {median:8.1f} us  (+{median - floor:.1f} us over psycopg)")
    results.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
