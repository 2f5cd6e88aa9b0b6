"""Celery's consumer, surviving a Redis outage that kombu's clean-up trips over.

When the broker connection is lost, Celery closes it; kombu's Redis channel then restores the
messages the worker held, and when Redis is still away that can fail with an AttributeError
(the transport was already collected) instead of a connection error. Celery takes that for an
unrecoverable error and stops consuming for good. The connection is gone either way, and the
held messages stay with Redis (restored after the visibility timeout), so the consumer goes on
to reconnect.
"""

from __future__ import annotations

import logging

from celery.worker.consumer import Consumer

logger = logging.getLogger(__name__)


class EmbedderConsumer(Consumer):
    def on_connection_error_after_connected(self, exc: Exception) -> None:
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError as error:
            self.connection = None
            logger.warning("Closing the lost broker connection failed (%s): reconnecting", error)
