"""One hierarchy; the type carries the decision: retry later (transient) or fail now (permanent)."""

from __future__ import annotations


class EmbedderError(Exception):
    """Base of the errors the worker raises on purpose; the message is one sentence for a person."""


class TransientError(EmbedderError):
    """Worth retrying: the same call may succeed later."""


class PermanentError(EmbedderError):
    """Retrying cannot help; the message says what to fix."""


class OllamaUnavailable(TransientError):
    """Ollama did not answer, or answered busy / with a server error."""


class ModelNotFound(PermanentError):
    """The model is not pulled on that Ollama."""


class ModelCannotEmbed(PermanentError):
    """The model exists but is not an embedding model."""


class OllamaRejected(PermanentError):
    """Ollama refused the request itself (400): retrying the same input fails the same way."""


class BadEmbedding(PermanentError):
    """Ollama answered 200 with something we will not write: wrong count, size, or not finite."""


class DimensionMismatch(PermanentError):
    """The model's vectors, the tenant's settings and the database column disagree on size."""


class SkillNotFound(PermanentError):
    """No skill with that id is visible to the tenant."""


class TenantMismatch(PermanentError):
    """The job names a tenant the skill does not belong to."""


class UnknownTenant(PermanentError):
    """No active tenant has that id."""


class OllamaNotReady(PermanentError):
    """The preflight before a backfill failed: nothing was queued."""


class FailedInBatch(PermanentError):
    """A batch met this skill's permanent failure before its own job came; the message says why."""
