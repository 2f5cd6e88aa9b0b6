"""The Celery app, light to load: the broker, the queues and the task names, nothing more.

`celery -A worker call tasks.backfill`, Flower and `inspect` load this module only to send or
read messages, so it imports no task module, SQLAlchemy, psycopg, pydantic or prometheus_client.
A worker or beat process configures the rest when it starts: Celery calls the loader's
`init_worker` there (and only there), which imports the tasks and hands over to worker.serve.
"""

from __future__ import annotations

import os

from celery import Celery
from celery.loaders.app import AppLoader
from kombu import Exchange, Queue

from tasks import BULK, CELERY_DEFAULT, INTERACTIVE
from worker.environment import Messaging, load_or_exit
from worker.flower_guard import guard_flower


class EmbedderLoader(AppLoader):
    """Celery's loader, plus the worker's own start: settings, runtime, observability."""

    def on_worker_init(self) -> None:
        from worker.serve import configure_worker
        from worker.settings import Settings

        configure_worker(self.app, load_or_exit(Settings.load))


def create_app(messaging: Messaging) -> Celery:
    """The app as every process sees it: where messages go and how they are encoded."""
    app = Celery(
        "everyskill-embedder",
        broker=messaging.redis_url,
        backend=messaging.redis_url,
        loader=EmbedderLoader,
        # Imported by a worker or beat when it starts (the loader's init_worker), never here.
        include=["tasks.jobs"],
    )
    app.conf.update(
        # Ollama serves one embedding request at a time: more would only queue inside it. Here,
        # not with the worker's other options: `celery worker` reads these two while it parses
        # its command line, before the loader's init_worker runs.
        worker_concurrency=1,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # kombu's Redis transport, with a screen for entries that are not messages.
        broker_transport="worker.transport:ScreenedTransport",
        # Sorted queue order: "celery" < "embed" < "embed_bulk". Both interactive lanes, the
        # default queue of a producer that names none and the app's own, drain before bulk.
        # "celery" keeps Celery's own exchange and key for it, so that no message routed to
        # the other queues is also bound to it.
        task_queues=(
            Queue(CELERY_DEFAULT, Exchange(CELERY_DEFAULT), routing_key=CELERY_DEFAULT),
            Queue(INTERACTIVE),
            Queue(BULK),
        ),
        task_default_queue=INTERACTIVE,
        result_backend_transport_options={"retry_policy": {"timeout": 5.0}},
        result_expires=86400,
        broker_connection_retry_on_startup=True,
    )
    if messaging.flower_basic_auth:
        # Flower reads FLOWER_BASIC_AUTH from its own environment only, never app.conf; this
        # carries a value that came from .env over to it (it loads the app before reading).
        os.environ.setdefault("FLOWER_BASIC_AUTH", messaging.flower_basic_auth)
    return app


_messaging = load_or_exit(Messaging.load)
app = create_app(_messaging)
guard_flower(_messaging.flower_basic_auth)
