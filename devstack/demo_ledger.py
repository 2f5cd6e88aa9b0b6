"""The demo's ledger, .data/demo.json: its own pid and each process it started, so that the next
demo can stop what a killed one (SIGKILL, a crash, a closed laptop) left running."""

from __future__ import annotations

import json
import os
import signal
from contextlib import suppress
from pathlib import Path
from typing import Any

import psutil

STATE_FILE = "demo.json"


class Ledger:
    """This demo's pid and each process it started, by name. A pid is only trusted together
    with its start time: the system may have given it to another process since."""

    def __init__(self, data: Path) -> None:
        self.path = data / STATE_FILE
        self.processes: dict[str, dict[str, float]] = {}

    def begin(self) -> None:
        self.processes = {}
        self._write()

    def add(self, name: str, pid: int) -> None:
        self.processes[name] = {"pid": pid, "started": _started(pid)}
        self._write()

    def end(self) -> None:
        self.path.unlink(missing_ok=True)

    def _write(self) -> None:
        document = {
            "demo": {"pid": os.getpid(), "started": _started(os.getpid())},
            "processes": self.processes,
        }
        scratch = self.path.with_suffix(".tmp")
        scratch.write_text(json.dumps(document, indent=2), encoding="utf-8")
        scratch.replace(self.path)

    def left_behind(self) -> tuple[psutil.Process | None, dict[str, psutil.Process]]:
        """The demo that wrote the file if it still runs, and its processes still running."""
        try:
            document: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None, {}
        alive = {
            name: process
            for name, entry in document.get("processes", {}).items()
            if (process := _alive(entry)) is not None
        }
        return _alive(document.get("demo", {})), alive


def _started(pid: int) -> float:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return 0.0


def _alive(entry: dict[str, Any]) -> psutil.Process | None:
    try:
        process = psutil.Process(int(entry["pid"]))
        if process.create_time() == float(entry["started"]) and process.is_running():
            return process
    except (KeyError, TypeError, ValueError, psutil.Error):
        pass
    return None


def stop_group(process: psutil.Process) -> bool:
    """SIGTERM to the process group it leads (a worker's pool with it), SIGKILL after 20 s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(20)
    except psutil.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, psutil.Error):
        return False
    return True
