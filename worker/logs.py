"""The worker's logs: `LOG_FORMAT=json` (one JSON object per line, with the job's ids, for a
log pipeline), and libraries kept to the lines an operator needs."""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery.app.trace import LOG_RETRY
from kombu.exceptions import OperationalError as KombuOperationalError
from pythonjsonlogger.json import JsonFormatter

from tasks.metrics import job_fields
from tasks.retry import database_error

CONTEXT_FIELDS = ("task_id", "skill_id", "run_id", "tenant_id")


class JobContext(logging.Filter):
    """Adds the current job's task_id, skill_id, run_id and tenant_id to a record.

    Fields the call gave with `extra=` win: a batch thread has no current job and names its
    own skill and run.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        missing = [name for name in CONTEXT_FIELDS if getattr(record, name, None) is None]
        if missing:
            fields = job_fields()
            for name in missing:
                if name in fields:
                    setattr(record, name, fields[name])
        return True


def json_formatter() -> logging.Formatter:
    """time, level, logger, message, then every extra field (the job's ids among them)."""
    return JsonFormatter(
        ["levelname", "name", "message"],
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",
    )


def use_json(logger: logging.Logger) -> None:
    """Give each of the logger's handlers the JSON formatter and the job's context."""
    for handler in logger.handlers:
        handler.setFormatter(json_formatter())
        if not any(isinstance(f, JobContext) for f in handler.filters):
            handler.addFilter(JobContext())


def capture_warnings() -> None:
    """Python warnings as JSON lines too: Celery warns (superuser, ...) before its logging is
    set up, so they get a handler of their own."""
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    if not warnings_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(json_formatter())
        warnings_logger.addHandler(handler)
        warnings_logger.propagate = False


def on_logger_setup(logger: logging.Logger | None = None, **_: Any) -> None:
    """Celery's after_setup_logger / after_setup_task_logger, connected when LOG_FORMAT=json."""
    if logger is not None:
        use_json(logger)


class _OneLineForLostConnections(logging.Filter):
    """SQLAlchemy's pool logs a traceback when it cannot roll back a connection PostgreSQL has
    already closed (failover, pg_terminate_backend); the pool replaces it, so one line does."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        lost = database_error(error) if error is not None else None
        if lost is not None:
            record.msg, record.args = "Dropped a pooled connection: %s", (str(lost),)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


class _OneLineForBrokerOutages(logging.Filter):
    """Celery logs a traceback for each job it cannot acknowledge while Redis is away; the
    message stays with Redis and comes back, and the job then finds its outcome: one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and _broker_error(error):
            record.msg, record.args = "%s (Redis did not answer)", (record.getMessage(),)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        elif error is None and "\n" in (message := record.getMessage()):
            # "Cannot connect to ...\nTrying again in 2.00 seconds... (1/100)\n": one line.
            record.msg, record.args = " ".join(message.split()), None
        return True


class _OursIsTheRetryLine(logging.Filter):
    """Celery logs `Task ...[id] retry: Retry in 2s: ...` for each retry, after the job's own
    `Retrying <skill> in 2.0 s: <reason>` said it with the reason an operator acts on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != LOG_RETRY


class _OursIsTheRefusalLine(logging.Filter):
    """Celery logs `Task ...[id] raised expected: BadArguments(...)` for a job whose arguments
    do not fit, after its own `Refused ...` line gave the reason and where it was set aside."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = record.args
        return not (
            isinstance(context, dict)
            and context.get("description") == "raised expected"
            and str(context.get("exc", "")).startswith("BadArguments(")
        )


def _broker_error(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, (redis.RedisError, KombuOperationalError, ConnectionError)):
            return True
        error = error.__cause__ or error.__context__
    return False


def quiet_libraries() -> None:
    """httpx logs every request at INFO (a line per batch that says nothing ours does not), and
    Celery a retry or a refusal our job has already logged; the database pool's tracebacks for
    closed connections, and Celery's for acknowledgements Redis did not take, become one
    line."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    trace = logging.getLogger("celery.app.trace")
    for ours in (_OursIsTheRetryLine, _OursIsTheRefusalLine):
        if not any(isinstance(f, ours) for f in trace.filters):
            trace.addFilter(ours())
    # Filters do not pass down to child loggers: the pool logs under its class's name.
    pool = logging.getLogger("sqlalchemy.pool.impl.QueuePool")
    if not any(isinstance(f, _OneLineForLostConnections) for f in pool.filters):
        pool.addFilter(_OneLineForLostConnections())
    # "Couldn't ack ...", and the consumer's "Cannot connect to ...".
    for name in ("celery.worker.request", "celery.worker.consumer.consumer"):
        celery_logger = logging.getLogger(name)
        if not any(isinstance(f, _OneLineForBrokerOutages) for f in celery_logger.filters):
            celery_logger.addFilter(_OneLineForBrokerOutages())
