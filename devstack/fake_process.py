"""A fake Ollama in a process of its own, for benchmarks: its CPU is not the bench's.

`python -m devstack.fake_ollama` serves; this starts it on a free port and reads its stats over
its control API (`GET /_fake/stats`), as a test reads an in-process FakeOllama's attributes.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx


class FakeOllamaProcess:
    """`python -m devstack.fake_ollama --port 0` at one cost (ms per request, ms per input)."""

    def __init__(self, request_ms: float, input_ms: float, log: Path) -> None:
        with log.open("wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "devstack.fake_ollama", "--port", "0",
                 "--request-ms", str(request_ms), "--input-ms", str(input_ms)],
                stdout=output, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while "listening on " not in log.read_text():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"the fake Ollama did not start: {log.read_text()}")
            time.sleep(0.05)
        self.url = log.read_text().split("listening on ")[1].split()[0]

    @property
    def pid(self) -> int:
        return self.process.pid

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = httpx.get(f"{self.url}/_fake/stats", timeout=10).json()
        return stats

    @property
    def requests(self) -> int:
        return int(self.stats()["requests"])

    @property
    def inputs(self) -> int:
        return int(self.stats()["inputs"])

    @property
    def batch_sizes(self) -> list[int]:
        return list(self.stats()["batch_sizes"])

    @property
    def max_concurrent(self) -> int:
        return int(self.stats()["max_concurrent"])

    def configure(self, **knobs: Any) -> dict[str, Any]:
        """Set knobs (request_latency and input_latency in seconds, models, ...) as the
        control API names them; answers every knob's value."""
        response = httpx.post(f"{self.url}/_fake/config", json=knobs, timeout=10)
        response.raise_for_status()
        config: dict[str, Any] = response.json()
        return config

    def reset(self) -> None:
        httpx.post(f"{self.url}/_fake/reset", timeout=10).raise_for_status()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
