"""Ollama as the embedding provider (tasks.provider): `POST /api/embed` over one pooled httpx
transport per server, its answers checked, its failures in the error tree of tasks.retry."""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from tasks.metrics import ollama_request_timer
from tasks.provider import ModelInfo
from tasks.retry import (
    BadEmbedding,
    MalformedAnswer,
    ModelCannotEmbed,
    ModelNotFound,
    OllamaRejected,
    OllamaUnavailable,
)
from tasks.slots import OllamaSlots

logger = logging.getLogger(__name__)

TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_JSON = {"Content-Type": "application/json", "Accept": "application/json"}
# httpcore's trace event for a request whose body has gone out on the connection.
_BODY_SENT = "http11.send_request_body.complete"


def _calling_once_sent(on_sent: Callable[[], None]) -> Callable[[str, dict[str, Any]], None]:
    def trace(event: str, info: dict[str, Any]) -> None:
        if event == _BODY_SENT:
            on_sent()

    return trace


def full_model_name(model: str) -> str:
    """Ollama lists models with their tag: `nomic-embed-text` is `nomic-embed-text:latest`."""
    return model if ":" in model else f"{model}:latest"


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:200]
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return response.text.strip()[:200]


class Turns:
    """One request at a time; an urgent caller (a job from the app) goes before batches."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._busy = False
        self._urgent_waiting = 0
        self._waiting = 0

    def waiting(self) -> int:
        """Callers waiting for their turn."""
        with self._changed:
            return self._waiting

    @contextmanager
    def turn(self, *, urgent: bool) -> Iterator[None]:
        with self._changed:
            self._urgent_waiting += urgent
            self._waiting += 1
            try:
                while self._busy or (not urgent and self._urgent_waiting):
                    self._changed.wait()
            finally:
                self._urgent_waiting -= urgent
                self._waiting -= 1
            self._busy = True
        try:
            yield
        finally:
            with self._changed:
                self._busy = False
                self._changed.notify_all()


class OllamaClient:
    """Talks to one Ollama server; reuse it: it keeps one connection pool.

    Requests go to httpx's transport, not through `httpx.Client`: Ollama needs none of the
    client's layers (cookies, auth, redirects, hooks), which cost more CPU than the exchange
    itself on an idle worker (about 0.6 ms of a lone publish's 2 on two cores, bench/README.md).
    """

    def __init__(
        self, base_url: str, *, timeout: float = 10.0, slots: OllamaSlots | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # One request at a time: Ollama serves embedding models with a single slot anyway.
        self._http = httpx.HTTPTransport(
            limits=httpx.Limits(max_connections=2, max_keepalive_connections=1)
        )
        self._extensions: dict[str, Any] = {
            "timeout": httpx.Timeout(timeout, connect=min(timeout, 3.0)).as_dict()
        }
        # Ollama must never see more requests at once than it has slots. With `slots` that holds
        # across every worker of the deployment; without, across this process's threads.
        self._slots = slots
        self._turns = Turns()

    def close(self) -> None:
        self._http.close()

    def _turn(self, *, urgent: bool) -> AbstractContextManager[None]:
        if self._slots is not None:
            return self._slots.hold(self.base_url, urgent=urgent)
        return self._turns.turn(urgent=urgent)

    def _send(
        self,
        method: str,
        path: str,
        payload: dict[str, Any] | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> httpx.Response:
        """One exchange, its body read; httpx's errors as the client would raise them."""
        extensions = self._extensions
        if on_sent is not None:
            extensions = {**extensions, "trace": _calling_once_sent(on_sent)}
        request = httpx.Request(
            method,
            self.base_url + path,
            content=None if payload is None else orjson.dumps(payload),
            headers=_JSON if payload is not None else None,
            extensions=extensions,
        )
        response = self._http.handle_request(request)
        try:
            response.read()
        finally:
            response.close()
        return response

    def _post(
        self,
        path: str,
        payload: dict[str, Any],
        *,
        urgent: bool = True,
        turn: bool = True,
        on_sent: Callable[[], None] | None = None,
    ) -> httpx.Response:
        try:
            with self._turn(urgent=urgent) if turn else nullcontext(), ollama_request_timer():
                return self._send("POST", path, payload, on_sent)
        except httpx.TimeoutException as exc:
            raise OllamaUnavailable(
                f"Ollama at {self.base_url} did not answer {path} in time ({type(exc).__name__})"
            ) from exc
        except httpx.TransportError as exc:
            raise OllamaUnavailable(
                f"cannot reach Ollama at {self.base_url} ({exc or type(exc).__name__}):"
                " is it running? (check OLLAMA_URL or site_settings.ollama_url)"
            ) from exc

    def embed(
        self, texts: Sequence[str], *, model: str, dimensions: int, urgent: bool = True
    ) -> list[list[float]]:
        """One vector per text, in order, each of `dimensions` finite floats.

        `urgent=False` (a batch claimed ahead) lets an urgent call waiting for Ollama go first.
        """
        return self.send(texts, model=model, dimensions=dimensions, urgent=urgent).vectors()

    def send(
        self,
        texts: Sequence[str],
        *,
        model: str,
        dimensions: int,
        urgent: bool = True,
        on_sent: Callable[[], None] | None = None,
    ) -> OllamaAnswer:
        """The request, answered and read, its status checked; its body not yet parsed, so the
        caller can send the next request first and parse this one while Ollama computes.
        `on_sent` runs once the request's body is on the connection (httpcore's trace)."""
        if not texts:
            return OllamaAnswer(self.base_url, None, 0, dimensions)
        payload = {"model": model, "input": list(texts)}
        response = self._post("/api/embed", payload, urgent=urgent, on_sent=on_sent)
        self._raise_for_status(response, model)
        return OllamaAnswer(self.base_url, response, len(texts), dimensions)

    def _raise_for_status(self, response: httpx.Response, model: str) -> None:
        status = response.status_code
        if status < 400:
            return
        # Ollama's texts changed across versions: decide by status, then by substring.
        error = _error_text(response)
        if status == 404 and "not found" in error and "page" not in error:
            raise ModelNotFound(
                f"model {model!r} is not pulled on Ollama at {self.base_url}:"
                f" run `ollama pull {model}` there"
            )
        if status == 501:
            raise ModelCannotEmbed(
                f"model {model!r} on {self.base_url} cannot produce embeddings ({error}):"
                " set OLLAMA_MODEL to an embedding model such as nomic-embed-text"
            )
        if status in TRANSIENT_STATUSES:
            raise OllamaUnavailable(f"Ollama at {self.base_url} answered {status}: {error}")
        if status == 404:
            raise OllamaRejected(
                f"{self.base_url} has no /api/embed (404 {error}): is OLLAMA_URL an Ollama server"
                " of version 0.3 or newer?"
            )
        raise OllamaRejected(f"Ollama at {self.base_url} refused the input ({status}: {error})")

    def version(self) -> str:
        try:
            response = self._send("GET", "/api/version")
        except httpx.HTTPError as exc:
            raise OllamaUnavailable(
                f"cannot reach Ollama at {self.base_url} ({exc or type(exc).__name__}):"
                " start it (`ollama serve`) or set OLLAMA_URL"
            ) from exc
        if response.status_code != 200:
            raise OllamaUnavailable(
                f"{self.base_url}/api/version answered {response.status_code}: is it Ollama?"
            )
        return str(response.json().get("version", "unknown"))

    def show(self, model: str) -> ModelInfo:
        # Not a model request: it needs no slot.
        response = self._post("/api/show", {"model": model}, turn=False)
        if response.status_code == 404:
            raise ModelNotFound(
                f"model {model!r} is not pulled on Ollama at {self.base_url}:"
                f" run `ollama pull {model}` there"
            )
        self._raise_for_status(response, model)
        body = response.json()
        info = body.get("model_info") or {}
        arch = info.get("general.architecture", "")
        capabilities = body.get("capabilities")
        return ModelInfo(
            name=model,
            embedding_length=_int_or_none(info.get(f"{arch}.embedding_length")),
            context_length=_int_or_none(info.get(f"{arch}.context_length")),
            # Servers older than capabilities reporting: assume it can, /api/embed will say.
            can_embed=capabilities is None or "embedding" in capabilities,
        )

    def describe(self, model: str) -> ModelInfo:
        """Up (`/api/version`) and `model` pulled (`/api/show`): what the server says of it."""
        self.version()
        return self.show(model)


@dataclass(frozen=True, slots=True)
class OllamaAnswer:
    """An `/api/embed` answer, read: its vectors parsed and checked on demand."""

    base_url: str
    response: httpx.Response | None  # None: no input, no request
    expected: int
    dimensions: int

    def vectors(self) -> list[list[float]]:
        response = self.response
        if response is None:
            return []
        try:
            # orjson: a batch's answer is ~0.5 MB of floats, four times faster to parse than
            # with the json module, in a process whose other threads need the GIL meanwhile.
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            try:  # the json module reads the NaN token a broken model emits, to say so
                body = json.loads(response.content)
            except ValueError:
                kind = response.headers.get("content-type", "no content type")
                raise MalformedAnswer(
                    f"{self.base_url}/api/embed answered 200 with {kind}, not JSON"
                    f" ({' '.join(response.text[:80].split())!r}): a proxy in front of Ollama?"
                ) from None
        return validate_embeddings(body, expected=self.expected, dimensions=self.dimensions)


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) else None


def validate_embeddings(body: Any, *, expected: int, dimensions: int) -> list[list[float]]:
    """The response's vectors, if there is one per input, each of the right size and finite."""
    vectors = body.get("embeddings") if isinstance(body, dict) else None
    if not isinstance(vectors, list):
        raise MalformedAnswer(f"Ollama's answer has no 'embeddings' list: {str(body)[:80]}")
    if len(vectors) != expected:
        raise MalformedAnswer(f"Ollama returned {len(vectors)} vectors for {expected} inputs")
    for index, vector in enumerate(vectors):
        if not isinstance(vector, list) or (dimensions and len(vector) != dimensions):
            size = len(vector) if isinstance(vector, list) else type(vector).__name__
            raise BadEmbedding(
                f"Ollama returned a vector of {size} dimensions where {dimensions} are"
                f" configured (input {index}): check EMBEDDING_DIMENSIONS and the model"
            )
        # One sum in C instead of a check per value: NaN or Inf anywhere makes it non-finite,
        # and a value that is not a number makes it fail.
        try:
            finite = math.isfinite(sum(vector))
        except TypeError:
            finite = False
        if not finite:
            raise BadEmbedding(
                f"Ollama returned a vector with NaN or Inf values or non-numbers (input {index})"
            )
    return vectors


class OllamaClients:
    """One client per Ollama URL (tenants may point at different servers), created on demand."""

    def __init__(self, *, timeout: float, slots: OllamaSlots | None = None) -> None:
        self.timeout = timeout
        self._slots = slots
        self._clients: dict[str, OllamaClient] = {}
        self._lock = threading.Lock()

    def for_url(self, url: str) -> OllamaClient:
        with self._lock:
            client = self._clients.get(url)
            if client is None:
                client = self._clients[url] = OllamaClient(
                    url, timeout=self.timeout, slots=self._slots
                )
            return client

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()
