"""Real worker, beat and Flower processes for end-to-end tests, with their logs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


class Process:
    """A child process in its own process group, its output in a file the test can read."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log_from = 0

    def start(self, ready: str | None = None, timeout: float = 60.0) -> Process:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        if ready is not None:
            self.wait_for(lambda text: ready in text, timeout, f"{ready!r} in the log")
        return self

    def log(self) -> str:
        """What the process wrote since it started, or since `new_log_section` if it serves
        test after test: each test reads its own part of a shared worker's log."""
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as log:
            log.seek(self._log_from)
            return log.read().decode(errors="replace")

    def new_log_section(self) -> None:
        self._log_from = self.log_path.stat().st_size if self.log_path.exists() else 0

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_for(self, predicate: Callable[[str], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.log()):
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"{self.args[0]} exited ({self.process.returncode}):\n"
                                     f"{self.log()[-3000:]}")  # fmt: skip
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the whole group: no warm shutdown, no message handed back."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def celery(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "worker", *args]


def start_worker(env: dict[str, str], log_path: Path, name: str = "test") -> Process:
    # As the README starts it: no mingle or gossip flags, those are off by default.
    return Process(
        celery("worker", "--loglevel=INFO", f"--hostname={name}@%h"), env, log_path
    ).start(ready="ready.")
