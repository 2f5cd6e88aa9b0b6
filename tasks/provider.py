"""The seam to whatever makes the vectors: one protocol, and what every caller does through it.

A provider embeds texts into vectors and says whether it is ready (reachable, the model there,
its size); Ollama (tasks.ollama) is the one there is, one client per server URL. The checks a
backfill or a model switch makes before it writes anything (`ready`), the one dimension check
and its message (`check_dimensions`), and the halving that isolates an input the provider
refuses (`embed_isolating`) live here once, for any provider.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from tasks.retry import DimensionMismatch, EmbedderError, ModelCannotEmbed, OllamaRejected


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    embedding_length: int | None  # None: the server does not say (ask with one probe)
    context_length: int | None
    can_embed: bool


class Answer(Protocol):
    """A provider's answer to one request, not yet parsed."""

    def vectors(self) -> list[list[float]]:
        """One vector per text sent, checked (errors of the answer's content raised here)."""
        ...


class EmbeddingProvider(Protocol):
    """One server that embeds (an Ollama, in this worker)."""

    @property
    def base_url(self) -> str: ...

    def embed(
        self, texts: Sequence[str], *, model: str, dimensions: int, urgent: bool = True
    ) -> list[list[float]]:
        """One vector per text, in order, each of `dimensions` finite floats (0: any size).

        `urgent=False` (a batch claimed ahead) lets an urgent call (an app job) go first.
        Raises the error tree of tasks.retry: transient (try later) or permanent."""
        ...

    def send(
        self,
        texts: Sequence[str],
        *,
        model: str,
        dimensions: int,
        urgent: bool = True,
        on_sent: Callable[[], None] | None = None,
    ) -> Answer:
        """`embed` in two steps: the request, answered (errors of the exchange raised here),
        and its vectors parsed when asked, so a pipeline sends its next request first.
        `on_sent` is called once the request is on its way, before the answer comes: a
        pipeline starts its other work then, so that work never delays a request."""
        ...

    def describe(self, model: str) -> ModelInfo:
        """The server answers and has `model`; what it says of it."""
        ...

    def close(self) -> None: ...


class Providers(Protocol):
    """The provider for each server URL a tenant names, made on first use."""

    def for_url(self, url: str) -> EmbeddingProvider: ...

    def close(self) -> None: ...


def check_dimensions(source: str, size: int, target: str, expected: int | None, fix: str) -> None:
    """The one dimension check: `source` makes vectors of `size`, `target` holds `expected`
    (None: unknown, nothing to check); DimensionMismatch names both and the fix."""
    if expected is not None and size != expected:
        raise DimensionMismatch(f"{source} makes {size}-dimension vectors but {target}: {fix}")


def column_target(column: int) -> str:
    return f"the app's skill_embeddings.embedding is vector({column})"


def ready(provider: EmbeddingProvider, model: str, *, configured: int | None = None) -> int:
    """Before anything is written: the server is up, has `model`, which embeds; the size of its
    vectors (from the server, or one probe), checked against `configured` when given."""
    info = provider.describe(model)
    if not info.can_embed:
        raise ModelCannotEmbed(
            f"model {model!r} on {provider.base_url} is not an embedding model:"
            " set OLLAMA_MODEL to one such as nomic-embed-text"
        )
    size = info.embedding_length
    if size is None:  # an older server: one probe says the size
        [vector] = provider.embed(["size probe"], model=model, dimensions=0)
        size = len(vector)
    if configured is not None:
        check_dimensions(
            f"model {model!r}",
            size,
            f"{configured} are configured",
            configured,
            f"set EMBEDDING_DIMENSIONS (and the column) to {size}, or use a"
            f" {configured}-dimension model",
        )
    return size


def embed_isolating(
    provider: EmbeddingProvider, texts: list[str], model: str, dimensions: int, *, urgent: bool
) -> list[list[float] | EmbedderError]:
    """Embed texts in one call; when the provider rejects the batch, halve it to isolate the bad
    input, so one bad input never fails its neighbours.

    Only a rejection (Ollama's 400) names an input. Any other error (a malformed answer
    included) is the same for every input of the batch, so halving would only spend requests.
    """
    try:
        return list(provider.embed(texts, model=model, dimensions=dimensions, urgent=urgent))
    except OllamaRejected as exc:
        if len(texts) == 1:
            return [exc]
        middle = len(texts) // 2
        return embed_isolating(
            provider, texts[:middle], model, dimensions, urgent=urgent
        ) + embed_isolating(provider, texts[middle:], model, dimensions, urgent=urgent)
    except EmbedderError as exc:
        return [exc] * len(texts)
