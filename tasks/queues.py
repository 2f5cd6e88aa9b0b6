"""Queue names shared by the worker's configuration and every producer."""

# The worker drains queues in sorted name order ("embed" < "embed_bulk"), so a job from the app
# is always taken before any waiting backfill job.
INTERACTIVE = "embed"
BULK = "embed_bulk"
# Celery's default queue: where a producer that names no queue sends (celery-node's
# `createTask(...).applyAsync(...)` among them). The worker serves it as an interactive lane.
CELERY_DEFAULT = "celery"
CONSUMED = (CELERY_DEFAULT, INTERACTIVE, BULK)
EMBED_SKILL = "tasks.embed_skill"
