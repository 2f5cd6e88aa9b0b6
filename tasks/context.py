"""What the job running in this thread is about (task, skill, run, tenant), for logs and metrics."""

from __future__ import annotations

from celery import current_task

from tasks.queues import EMBED_SKILL

# The ids a job's arguments may carry, in `tasks.embed_skill`'s order (skill_id, tenant_id, run_id).
JOB_FIELDS = ("skill_id", "tenant_id", "run_id")
# The longest id a job may carry (tasks.arguments refuses longer ones); a log line never names
# a longer value as an id.
MAX_ID_LENGTH = 200


def job_fields() -> dict[str, str]:
    """task_id, skill_id, tenant_id and run_id of the current job, those it knows.

    Empty outside a job: Celery keeps its current task per thread, so a batch thread's lines
    name their ids with `extra=` instead.
    """
    task = current_task
    request = getattr(task, "request", None) if task else None
    task_id = getattr(request, "id", None)
    if not task_id:
        return {}
    fields = {"task_id": str(task_id)}
    # Positional arguments mean these ids only for embed_skill (the app's producers send them).
    args = list(getattr(request, "args", None) or ()) if task.name == EMBED_SKILL else []
    kwargs = dict(getattr(request, "kwargs", None) or {})
    for index, name in enumerate(JOB_FIELDS):
        value = kwargs.get(name, args[index] if index < len(args) else None)
        if isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH:
            fields[name] = value
    return fields
