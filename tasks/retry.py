"""When to try a failed job again: the error's type decides, the backoff grows with jitter."""

from __future__ import annotations

import random

from tasks.errors import EmbedderError, TransientError


def should_retry(error: BaseException, retries: int, max_retries: int) -> bool:
    """Transient errors retry until the bound; everything else fails at once."""
    return isinstance(error, TransientError) and retries < max_retries


def backoff_seconds(retries: int, *, base: float, cap: float) -> float:
    """Exponential backoff with full jitter: uniform in [base/2, min(cap, base * 2**retries)]."""
    ceiling = min(cap, base * (2**retries))
    return random.uniform(min(base / 2, ceiling), ceiling)


def describe(error: BaseException) -> str:
    """The one line an operator reads in the log and in Flower."""
    if isinstance(error, EmbedderError):
        return str(error)
    return f"{type(error).__name__}: {error}"
