"""The work: the Celery tasks, the Ollama client, a skill's text and hash, and the producer API.

`from tasks import enqueue_embed_skill` is what the web app (or any Python producer) calls; it
imports nothing heavy until first used.
"""

from __future__ import annotations

from tasks.producer import enqueue_embed_skill

__all__ = ["enqueue_embed_skill"]
