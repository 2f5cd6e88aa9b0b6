"""Every bench, one after another, at sizes that fit about ten minutes on two cores; then the
chart.

`python -m bench` (`make bench`) runs each module in a process of its own (each starts and
stops its own stack), writes bench/results/<bench>.json and bench/results/all.json (each
bench's wall time and exit status), and draws bench/results/chart.png from the throughput run
(`--chart PATH` draws it elsewhere too). A bench that fails is reported and the others still
run. `--only NAME ...` runs some of them; `--full` runs each at its own defaults (hours, not
minutes); each module keeps its own flags for bigger runs (`python -m bench.<name> --help`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import RESULTS, Results, console

# Small enough for the whole set to take about ten minutes on the 2-core machine.
SMALL: dict[str, str] = {
    "throughput": "--sizes 100 300 1000 3000 --zero-cost-skills 1000",
    "from_command": "--sizes 150 500 1000 --bare-jobs 500",
    "model_busy": "--sizes 150 1000 --cold-starts 1",
    "app_lane": "--publishes 10 --burst 200 --busy-skills 1000 --enqueues 500",
    "publish_steps": "--publishes 30",
    "app_job_steps": "--jobs 30",
    "job_overhead": "--jobs 500",
    "fanout": "--skills 2000 10000",
    "scaleout": "--skills 1000",
    "catch_up": "--skills 10000",
    "switch": "--skills 300 --swap-sizes 1000",
    "catalog_scale": "--skills 20000 --tenants 5 --edits 200",
    "outage": "--lengths 5 20 --rounds 1 --cold-starts 1",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", nargs="+", choices=list(SMALL), default=list(SMALL))
    parser.add_argument("--full", action="store_true", help="each bench at its own defaults")
    parser.add_argument("--chart", type=Path, help="also write the chart here")
    args = parser.parse_args(argv)
    summary = Results("all", benches=args.only, full=args.full)
    failed = []
    for name in args.only:
        sizes = [] if args.full else SMALL[name].split()
        command = [sys.executable, "-m", f"bench.{name}", *sizes]
        console.rule(" ".join(command[1:]))
        started = time.perf_counter()
        code = subprocess.run(command, check=False).returncode
        summary.add(f"bench.{name}", time.perf_counter() - started, "s")
        if code:
            failed.append(name)
            console.print(f"[red]bench.{name} exited with status {code}")
    summary.details["failed"] = failed
    summary.write()
    if (RESULTS / "throughput.json").exists():
        from bench.chart import draw

        for path in [RESULTS / "chart.png", *([args.chart] if args.chart else [])]:
            draw(RESULTS / "throughput.json", path)
            console.print(f"chart: {path}")
    if failed:
        console.print(f"[red]failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
