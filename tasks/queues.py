"""Queue names shared by the worker's configuration and every producer."""

# The worker drains queues in sorted name order ("embed" < "embed_bulk"), so a job from the app
# is always taken before any waiting backfill job.
INTERACTIVE = "embed"
BULK = "embed_bulk"
EMBED_SKILL = "tasks.embed_skill"
