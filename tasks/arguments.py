"""Each task's arguments, checked against its signature before its body runs.

Anyone who can write to Redis can send a job, and Celery hands its arguments to the body as
they came: an integer id met string code three modules down, a megabyte id went to PostgreSQL
as a parameter. CheckedTask (the base of every task in tasks.jobs) binds the arguments to the
body's signature and validates them with a pydantic model built from its annotations; a job
that does not fit fails at once (BadArguments, never retried), is set aside like any refused
message (tasks.refusals), and gets one line that says what the job must carry.
"""

from __future__ import annotations

import inspect
import json
import logging
import types
import typing
from collections.abc import Callable
from functools import cached_property
from typing import Annotated, Any, Union

from celery import Task, current_app
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError, create_model

from tasks import refusals, runtime
from tasks.metrics import MAX_ID_LENGTH
from tasks.retry import PermanentError

logger = logging.getLogger(__name__)

# Ids in this catalog are UUIDs or slugs; anything longer is not one, and must not reach a log
# line or an SQL parameter whole.
Identifier = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]


class BadArguments(PermanentError):
    """The job's arguments do not fit its task's signature; the message shows the signature."""


class CheckedTask(Task[Any, Any]):
    """A task whose arguments are checked against its body's signature before it runs."""

    # Extended, not replaced, by a task's own `throws`: see __init_subclass__.
    throws: tuple[type[Exception], ...] = (BadArguments,)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Celery builds each task's class with the decorator's options as attributes: a task
        # that names the errors it expects must still log BadArguments as expected (one line).
        if BadArguments not in cls.throws:
            cls.throws = (*cls.throws, BadArguments)

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        problem = self.arguments.problem(args, kwargs)
        if problem is None:
            return
        reason = f"{problem}; the job must carry {self.arguments}"
        logger.warning("Refused %s[%s]: %s", self.name, task_id, reason)
        refusals.set_aside(
            runtime.current().redis,
            queue=str((self.request.delivery_info or {}).get("routing_key") or self.name),
            reason=refusals.BAD_ARGUMENTS,
            entry=_job_record(self.name, task_id, args, kwargs),
        )
        raise BadArguments(reason)

    @cached_property
    def arguments(self) -> Signature:
        return Signature(self.name, self.run)


def fits(task_name: str, args: Any, kwargs: Any) -> bool:
    """Whether a job of `task_name` with these arguments would pass its task's check (for a
    job read off a queue before its own turn: the app lane's companions)."""
    task = current_app.tasks.get(task_name)
    return isinstance(task, CheckedTask) and task.arguments.problem(args, kwargs) is None


class Signature:
    """A task body's parameters: how a job's arguments bind to them, and their types."""

    def __init__(self, task_name: str, body: Callable[..., Any]) -> None:
        self.name = task_name.rsplit(".", 1)[-1]
        self.signature = inspect.signature(body)
        hints = typing.get_type_hints(body, include_extras=True)
        fields: dict[str, Any] = {
            name: (hints.get(name, Any), ... if p.default is p.empty else p.default)
            for name, p in self.signature.parameters.items()
        }
        self.model: type[BaseModel] = create_model(
            f"{self.name}_arguments",
            __config__=ConfigDict(strict=True, extra="forbid"),
            **fields,
        )
        self.hints = hints

    def problem(self, args: Any, kwargs: Any) -> str | None:
        """What is wrong with `args` and `kwargs` for this body, in a few words; None if nothing."""
        if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
            return "its arguments are not a list and a mapping"
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            return str(exc)
        try:
            self.model.model_validate(bound.arguments)
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            where = ".".join(str(part) for part in error["loc"])
            return f"{where}: {error['msg'].lower()}, got {refusals.shown(error['input'])}"
        return None

    def __str__(self) -> str:
        parts = []
        for name, parameter in self.signature.parameters.items():
            if parameter.kind is parameter.KEYWORD_ONLY and "*" not in parts:
                parts.append("*")
            text = f"{name}: {_type_name(self.hints.get(name, Any))}"
            if parameter.default is not parameter.empty:
                text += f" = {parameter.default!r}"
            parts.append(text)
        return f"{self.name}({', '.join(parts)})"


def _type_name(hint: Any) -> str:
    """`str | None` for Annotated[str, ...] | None: the type a producer sends, without bounds."""
    if typing.get_origin(hint) is Annotated:
        return _type_name(typing.get_args(hint)[0])
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if hint is Any:
        return "Any"
    if typing.get_args(hint):
        args = ", ".join(_type_name(arg) for arg in typing.get_args(hint))
        return f"{typing.get_origin(hint).__name__}[{args}]"
    return getattr(hint, "__name__", str(hint))


def _job_record(name: str, task_id: str, args: Any, kwargs: Any) -> str:
    # What a person needs to find the producer: the task, its id and the arguments it came with.
    # The standard library's encoder: it takes whatever JSON decoded (orjson refuses integers
    # past 64 bits).
    return json.dumps({"task": name, "id": task_id, "args": args, "kwargs": kwargs}, default=repr)
