"""`make demo ONCE=1`: the whole mission from nothing, then again with nothing to do."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from devstack.ports import free_port

SUMMARY = re.compile(r"Done\. Embedded (\d+)/(\d+) skills\. (\d+) failures\.")


def run_demo(data: Path, project_root: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        # Nothing listens there: the demo must notice and start its fake Ollama.
        "OLLAMA_URL": f"http://127.0.0.1:{free_port()}",
    }
    return subprocess.run(
        [sys.executable, "-m", "devstack.demo", "--once", "--data", str(data),
         "--flower-port", str(free_port())],
        env=env, cwd=project_root, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_the_demo_embeds_every_published_skill_then_finds_nothing_to_do(
    tmp_path: Path, project_root: Path
) -> None:
    first = run_demo(tmp_path / "data", project_root)

    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "using the built-in fake Ollama" in first.stdout
    assert "NOT semantic" in first.stdout
    # 160 published skills in the sample catalog's two enabled tenants.
    assert SUMMARY.findall(first.stdout)[0] == ("160", "160", "0")
    assert re.search(r"Flower: http://127\.0\.0\.1:\d+ +login admin / \S+", first.stdout)
    assert "Traceback" not in first.stdout + first.stderr

    second = run_demo(tmp_path / "data", project_root)

    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert SUMMARY.findall(second.stdout)[0] == ("160", "160", "0")
    worker_log = (tmp_path / "data" / "logs" / "worker.log").read_text()
    assert "160 published skills in 2 tenants, 0 to embed" in worker_log
