"""The chart bench/README.md shows: skills a second against catalog size, from one throughput
run, beside the seed's loop and the model's limit measured in that run.

`python -m bench.chart [--results bench/results/throughput.json] [--out bench/chart.png]`
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.harness import RESULTS

HERE = Path(__file__).resolve().parent


def draw(results: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # a file, no display
    import matplotlib.pyplot as plt

    run: dict[str, Any] = json.loads(results.read_text())
    series = run["details"]["series"]
    cpu = [p for p in series if p["cost"] == "cpu"]
    zero = [p for p in series if p["cost"] == "zero"]
    sizes = [p["skills"] for p in cpu]
    figure, axes = plt.subplots(figsize=(8, 5.6), dpi=110)
    axes.plot(sizes, [p["backfill_per_s"] for p in cpu], "o-", color="tab:blue",
              label="tasks.backfill, queued -> its summary")  # fmt: skip
    axes.plot(sizes, [p["drained_per_s"] for p in cpu], "o--", color="tab:blue", alpha=0.5,
              label="... to its last job confirmed")  # fmt: skip
    axes.plot(sizes, [p["seed_loop_per_s"] for p in cpu], "s-", color="tab:orange",
              label="the seed's loop (one request, one commit a skill)")  # fmt: skip
    for point in cpu:
        if "load" in point:  # the machine's load when the point was taken: a shared machine
            axes.annotate(f"load {point['load']:.1f}", (point["skills"], point["backfill_per_s"]),
                          textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7,
                          color="grey")  # fmt: skip
    limit = max(p["model_limit_per_s"] for p in cpu) if cpu else 0.0
    if limit:
        axes.axhline(limit, color="tab:red", linestyle=":",
                     label=f"the model's limit, {limit:.0f}/s (32 a batch)")  # fmt: skip
    for point in zero:
        zero_label = f"tasks.backfill at zero model cost ({point['skills']:,} skills)"
        axes.plot([point["skills"]], [point["backfill_per_s"]], "^", color="tab:green",
                  label=zero_label)  # fmt: skip
        axes.plot([point["skills"]], [point["seed_loop_per_s"]], "v", color="tab:green",
                  alpha=0.6, label="the seed's loop at zero model cost")  # fmt: skip
    cost = run["settings"]["cost_model_ms"]
    machine = run["machine"]
    axes.set_xscale("log")
    axes.set_xticks(sizes, [f"{n:,}" for n in sizes])
    axes.minorticks_off()
    axes.set_xlabel("published skills in the catalog")
    axes.set_ylabel("skills embedded a second")
    axes.set_ylim(bottom=0)
    axes.set_title(
        f"Backfill throughput, fake Ollama at {cost[0]} ms + {cost[1]} ms an input\n"
        f"{run['when'][:16].replace('T', ' ')} UTC, {machine['cores']} cores, load"
        f" {machine['load'][0]:.1f} -> {machine['load_end'][0]:.1f} (shared machine)",
        fontsize=10,
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chart", description=__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS / "throughput.json")
    parser.add_argument("--out", type=Path, default=HERE / "chart.png")
    args = parser.parse_args(argv)
    draw(args.results, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
