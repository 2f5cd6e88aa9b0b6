"""Flower started through this app refuses to serve without a login.

Flower without an authentication setting serves its pages (each job's skill and tenant ids) to
anyone who reaches its port. Celery loads the app in its command line's group callback, when
click already knows the sub-command: for `flower`, the command's callback is wrapped so that it
checks Flower's own authentication settings (environment, `.env`, command line, config file)
before Flower reads them, and stops with one line when there is none.
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

# Flower's settings that put a login in front of it: basic auth, OAuth (`auth` names who may
# log in), or a handler of one's own.
AUTH_OPTIONS = ("basic_auth", "auth", "auth_provider")
DEFAULT_CONFIG = "flowerconfig.py"  # Flower's own default for `--conf`
REFUSAL = (
    "error: Flower would serve every job's skill and tenant ids without a login: set"
    " FLOWER_BASIC_AUTH=user:password (in the environment or .env), or FLOWER_AUTH for OAuth"
)


def guard_flower(basic_auth: str | None) -> None:
    """When this process is `celery ... flower`, make its start refuse without a login."""
    click = sys.modules.get("click")
    if click is None:  # not Celery's command line: nothing serves Flower here
        return
    ctx = click.get_current_context(silent=True)
    if ctx is None or ctx.invoked_subcommand != "flower" or not hasattr(ctx.command, "commands"):
        return
    command = ctx.command.commands.get("flower")
    if command is None or command.callback is None:
        return
    command.callback = _checked(command.callback, basic_auth)


def _checked(callback: Callable[..., Any], basic_auth: str | None) -> Callable[..., Any]:
    def start_flower(*args: Any, **kwargs: Any) -> Any:
        if not basic_auth and not has_login(kwargs.get("tornado_argv", ()), os.environ):
            print(REFUSAL, file=sys.stderr)  # noqa: T201
            raise SystemExit(2)
        return callback(*args, **kwargs)

    return start_flower


def has_login(argv: Iterable[str], environ: Mapping[str, str]) -> bool:
    """Whether Flower's command line, environment or config file sets an authentication option."""
    config = DEFAULT_CONFIG
    for arg in argv:
        name, _, value = arg.lstrip("-").partition("=")
        name = name.replace("-", "_")
        if name in AUTH_OPTIONS and value:
            return True
        if name == "conf" and value:
            config = value
    if any(environ.get(f"FLOWER_{name.upper()}") for name in AUTH_OPTIONS):
        return True
    path = Path(config)
    if not path.is_file():
        return False
    # Flower executes its config file as Python and reads the names it defines: so do we.
    values = runpy.run_path(str(path))
    return any(values.get(name) for name in AUTH_OPTIONS)
