"""Ollama's embedding API as data: what a request must look like, what each answer says.

Pure functions for the fake server (devstack.fake_ollama): request decoding with the error texts
Ollama's Go handlers give, token counting, the /api/show and /api/tags payloads, and the fake's
deterministic vectors. Facts from /work/shared/ollama-api.md.

Tokens are approximated as one per 4 characters, rounded up (CHARS_PER_TOKEN): with `truncate`
a text is cut to 4 * context characters; without it a longer text fails the request.
"""

from __future__ import annotations

import contextlib
import hashlib
import http
import json
import math
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

VERSION = "0.32.15"
BUSY = "server busy, please try again.  maximum pending requests exceeded"
NO_EMBEDDINGS = "This server does not support embeddings. Start it with `--embeddings`"
TOO_LONG = "the input length exceeds the context length"
NAN_OUTPUT = "embedding contains NaN or Inf values"
CHARS_PER_TOKEN = 4
CORRUPTIONS = frozenset({"dimensions", "nan", "count", "empty"})
DEFAULT_ERRORS = {
    400: "bad request",
    429: "too many requests",
    500: "llama runner process has terminated: exit status 2",
    501: NO_EMBEDDINGS,
    502: "bad gateway",
    503: BUSY,
    504: "gateway timeout",
}
MODEL_DETAILS: dict[str, object] = {
    "parent_model": "",
    "format": "gguf",
    "family": "nomic-bert",
    "families": ["nomic-bert"],
    "parameter_size": "137M",
    "quantization_level": "F16",
}
T = TypeVar("T")


# The fake's reference model: its vectors are seeded from the text alone. Every other model
# seeds from its name too, so two models never give one text the same vector, as in Ollama.
REFERENCE_MODEL = "nomic-embed-text"


def vector_for(text: str, dimensions: int = 768, model: str = REFERENCE_MODEL) -> list[float]:
    """Return the fake's embedding of `text` by `model`: a unit vector seeded from a sha256."""
    return list(_unit_vector(text, dimensions, bare_model(model)))


@lru_cache(maxsize=4096)
def vector_json(text: str, dimensions: int = 768, model: str = REFERENCE_MODEL) -> str:
    """`vector_for` as JSON text, cached: encoding it anew for every request would cost more
    than the fake's whole latency budget for a small input."""
    return json.dumps(_unit_vector(text, dimensions, bare_model(model)))


@lru_cache(maxsize=4096)
def _unit_vector(text: str, dimensions: int, model: str) -> tuple[float, ...]:
    seed = text if model == REFERENCE_MODEL else f"{model}\0{text}"
    rng = random.Random(int.from_bytes(hashlib.sha256(seed.encode("utf-8")).digest(), "big"))
    raw = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(math.fsum(x * x for x in raw))
    return tuple(x / norm for x in raw)


def count_tokens(text: str) -> int:
    """Approximate the token count of `text` as the fake does: ceil(characters / 4)."""
    return -(-len(text) // CHARS_PER_TOKEN)


def bare_model(name: str) -> str:
    """Drop the implicit `:latest` tag, so "x" and "x:latest" compare equal."""
    return name.removesuffix(":latest")


def not_pulled(model: str) -> str:
    """Ollama's text for a model that is not pulled (Go's %q quoting)."""
    return f"model {json.dumps(model)} not found, try pulling it first"


class Rejected(Exception):
    """A request Ollama answers with `status` and `{"error": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _json_kind(value: object) -> str:
    kinds = ((bool, "bool"), (str, "string"), ((int, float), "number"), (list, "array"))
    return next((name for kind, name in kinds if isinstance(value, kind)), "object")


def decode_object(body: bytes, go_type: str) -> dict[str, Any]:
    """Decode a JSON object body, failing as Go's encoding/json does inside Ollama."""
    if not body.strip():
        raise Rejected(400, "missing request body")
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise Rejected(400, str(exc)) from None
    if not isinstance(payload, dict):
        kind = _json_kind(payload)
        raise Rejected(400, f"json: cannot unmarshal {kind} into Go value of type api.{go_type}")
    return payload


def typed_field(payload: dict[str, Any], go_type: str, key: str, want: type[T], default: T) -> T:
    """Read one field of a decoded body, with Go's error when its JSON type is wrong."""
    value = payload.get(key)
    if value is None:  # Go leaves the zero value for a missing field or a JSON null
        return default
    if isinstance(value, want) and not (want is int and isinstance(value, bool)):
        return value
    go_name = {str: "string", bool: "bool", int: "int"}.get(want, "map[string]interface {}")
    raise Rejected(
        400,
        f"json: cannot unmarshal {_json_kind(value)} into Go struct field "
        f"{go_type}.{key} of type {go_name}",
    )


@dataclass(frozen=True)
class EmbedRequest:
    """A valid POST /api/embed body; `dimensions` and `num_ctx` are 0 when not given."""

    model: str
    inputs: list[str]
    truncate: bool
    dimensions: int
    num_ctx: int


def parse_embed(body: bytes) -> EmbedRequest:
    """Validate an /api/embed body in the order Ollama's EmbedHandler does."""
    payload = decode_object(body, "EmbedRequest")
    model = typed_field(payload, "EmbedRequest", "model", str, "")
    truncate = typed_field(payload, "EmbedRequest", "truncate", bool, True)
    dimensions = typed_field(payload, "EmbedRequest", "dimensions", int, 0)
    options = typed_field(payload, "EmbedRequest", "options", dict, {})
    if not model:
        raise Rejected(404, "model '' not found")
    raw = payload.get("input")
    if isinstance(raw, str):
        inputs = [raw] if raw else []
    elif isinstance(raw, list) and all(isinstance(text, str) for text in raw):
        inputs = raw
    elif raw is None:
        inputs = []
    else:
        raise Rejected(400, "invalid input type")
    num_ctx = options.get("num_ctx")
    num_ctx = num_ctx if isinstance(num_ctx, int) and not isinstance(num_ctx, bool) else 0
    return EmbedRequest(model, inputs, truncate, dimensions, num_ctx)


def fault_text(status: int, body: bytes) -> str:
    """Ollama's wording for an injected failure; a 404 names the model the client sent."""
    if status != 404:
        return DEFAULT_ERRORS.get(status, http.HTTPStatus(status).phrase.lower())
    model: object = None
    with contextlib.suppress(ValueError, AttributeError):
        model = json.loads(body).get("model")
    return not_pulled(model if isinstance(model, str) and model else "nomic-embed-text")


def corrupt(vectors: list[list[float]], kind: str) -> list[list[float]]:
    """Spoil a 200 answer the way `kind` (one of CORRUPTIONS) says; a client must reject it."""
    if kind == "dimensions":
        return [[*vector, 0.0] for vector in vectors]  # still unit length, one too long
    if kind == "nan" and vectors:
        return [[math.nan, *vectors[0][1:]], *vectors[1:]]  # json.dumps writes the token NaN
    if kind == "count":
        return vectors[:-1]
    return []


def show_payload(
    dimensions: int, context_length: int, embedding_capable: bool
) -> dict[str, object]:
    """The /api/show answer for a pulled model (every model is presented as nomic-bert)."""
    return {
        "capabilities": ["embedding"] if embedding_capable else ["completion"],
        "model_info": {
            "general.architecture": "nomic-bert",
            "nomic-bert.embedding_length": dimensions,
            "nomic-bert.context_length": context_length,
        },
        "details": MODEL_DETAILS,
    }


def tags_payload(models: set[str]) -> dict[str, object]:
    """The /api/tags answer: every pulled model, its name carrying the tag."""
    names = sorted(m if ":" in m else f"{m}:latest" for m in map(bare_model, models))
    return {
        "models": [
            {
                "name": name,
                "model": name,
                "modified_at": "2025-01-01T00:00:00Z",
                "size": 274302450,
                "digest": hashlib.sha256(name.encode()).hexdigest(),
                "details": MODEL_DETAILS,
            }
            for name in names
        ]
    }
