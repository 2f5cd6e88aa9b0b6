"""One sentence for the errors an operator meets at the command line, instead of a traceback."""

from __future__ import annotations

from sqlalchemy.exc import OperationalError, ProgrammingError

from worker.settings import mask_url


def describe_operational_error(exc: BaseException) -> str | None:
    """A one-line explanation for an error we know how to explain, else None."""
    if isinstance(exc, OperationalError):
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        return f"cannot reach PostgreSQL ({mask_url(reason)}): check DATABASE_URL and that it runs"
    if isinstance(exc, ProgrammingError):
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        if "permission denied" in reason:
            return f"{reason}: grant the worker's role access, or run migrate as the tables' owner"
        if "does not exist" in reason:
            return f"{reason}: run `python -m worker migrate` first"
    return None
