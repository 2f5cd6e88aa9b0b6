"""What gets embedded for a skill and its hash: the contract the app's own code shares."""

from __future__ import annotations

import hashlib


def skill_text(name: str, description: str | None) -> str:
    """`f"{name} {description}"`, as the app and its earlier backfill embedded it."""
    return f"{name} {description or ''}"


def input_hash(text: str) -> str:
    """sha256 hex of the UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
