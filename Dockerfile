# syntax=docker/dockerfile:1
# One image for the worker, beat, migrate and flower services of docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin embedder

# The source is bind-mounted for the install only, so no copy of it stays in a layer; the
# migrations ship as package data, so everything runs from site-packages. The pip cache mount
# keeps rebuilds after a code change from downloading every dependency again.
RUN --mount=type=bind,target=/tmp/src,rw \
    --mount=type=cache,target=/root/.cache/pip \
    pip install /tmp/src

# Celery beat writes its schedule file into the working directory: it must be writable.
WORKDIR /home/embedder
USER embedder

CMD ["celery", "-A", "worker", "worker", "--loglevel=INFO"]
