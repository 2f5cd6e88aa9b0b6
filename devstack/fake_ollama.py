"""A fake Ollama server, faithful to the parts of Ollama's API the embedder uses.

Routes: POST /api/embed, POST /api/show, GET /api/tags, GET /api/version, GET|HEAD /, with
Ollama's status codes and error bodies (see /work/shared/ollama-api.md). Vectors are
pseudo-random unit vectors seeded from the text's sha256: deterministic, not semantic.

Tokens are approximated as one per 4 characters, rounded up (CHARS_PER_TOKEN), so with
`truncate` a text is cut to 4 * context_length characters and without it a longer text is a 400.

Faults queue up in order: each POST /api/embed consumes the oldest pending one, whatever it asks.
Stats: `requests` counts every answered /api/embed (any status; a dropped one is not answered);
`inputs`, `texts` and `batch_sizes` count only 200 answers, texts as sent (before truncation).

Control API, for a process that did not start the fake (answers are JSON):
  GET  /_fake/stats                      -> the stats, plus "pending_faults"
  POST /_fake/reset                      -> clear faults and stats
  GET|POST /_fake/config {knob: value}   -> request_latency, input_latency, dimensions, models,
                                            embedding_capable, context_length, max_pending
  POST /_fake/faults {"kind": "fail", "count": 1, "status": 500, "error": "..."}
                     {"kind": "hang", "count": 1, "seconds": 5.0}   {"kind": "drop", "count": 1}
                     {"kind": "corrupt", "count": 1, "corruption": "nan"}
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http
import json
import math
import random
import signal
import socket
import socketserver
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, TypeVar

VERSION = "0.32.15"
BUSY = "server busy, please try again.  maximum pending requests exceeded"
NO_EMBEDDINGS = "This server does not support embeddings. Start it with `--embeddings`"
TOO_LONG = "the input length exceeds the context length"
CHARS_PER_TOKEN = 4
CORRUPTIONS = frozenset({"dimensions", "nan", "count", "empty"})
_DEFAULT_ERRORS = {
    400: "bad request",
    429: "too many requests",
    500: "llama runner process has terminated: exit status 2",
    501: NO_EMBEDDINGS,
    502: "bad gateway",
    503: BUSY,
    504: "gateway timeout",
}
_DETAILS: dict[str, object] = {
    "parent_model": "",
    "format": "gguf",
    "family": "nomic-bert",
    "families": ["nomic-bert"],
    "parameter_size": "137M",
    "quantization_level": "F16",
}
_Reply = tuple[int, object]  # a str payload is sent as text/plain, anything else as JSON
T = TypeVar("T")


def vector_for(text: str, dimensions: int = 768) -> list[float]:
    """Return the fake's embedding of `text`: a unit vector seeded from the sha256 of its UTF-8."""
    return list(_unit_vector(text, dimensions))


@lru_cache(maxsize=4096)
def _unit_vector(text: str, dimensions: int) -> tuple[float, ...]:
    rng = random.Random(int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest(), "big"))
    raw = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(math.fsum(x * x for x in raw))
    return tuple(x / norm for x in raw)


def count_tokens(text: str) -> int:
    """Approximate the token count of `text` the way the fake does: ceil(characters / 4)."""
    return -(-len(text) // CHARS_PER_TOKEN)


def _bare(model: str) -> str:
    return model.removesuffix(":latest")


class _Rejected(Exception):
    """An error answer, `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.reply: _Reply = (status, {"error": message})


def _json_kind(value: object) -> str:
    kinds = ((bool, "bool"), (str, "string"), ((int, float), "number"), (list, "array"))
    return next((name for kind, name in kinds if isinstance(value, kind)), "object")


def _decode(body: bytes, go_type: str) -> dict[str, Any]:
    """Decode a JSON object body with the errors Go's encoding/json gives Ollama."""
    if not body.strip():
        raise _Rejected(400, "missing request body")
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise _Rejected(400, str(exc)) from None
    if not isinstance(payload, dict):
        kind = _json_kind(payload)
        raise _Rejected(400, f"json: cannot unmarshal {kind} into Go value of type api.{go_type}")
    return payload


def _typed(payload: dict[str, Any], go_type: str, key: str, want: type[T], default: T) -> T:
    value = payload.get(key)
    if value is None:  # Go leaves the zero value for a missing field or a JSON null
        return default
    if isinstance(value, want) and not (want is int and isinstance(value, bool)):
        return value
    go_name = {str: "string", bool: "bool", int: "int"}.get(want, "map[string]interface {}")
    raise _Rejected(
        400,
        f"json: cannot unmarshal {_json_kind(value)} into Go struct field "
        f"{go_type}.{key} of type {go_name}",
    )


@dataclass(frozen=True)
class _EmbedRequest:
    model: str
    inputs: list[str]
    truncate: bool
    dimensions: int
    num_ctx: int


def _parse_embed(body: bytes) -> _EmbedRequest:
    """Validate an /api/embed body in the order Ollama's EmbedHandler does."""
    payload = _decode(body, "EmbedRequest")
    model = _typed(payload, "EmbedRequest", "model", str, "")
    truncate = _typed(payload, "EmbedRequest", "truncate", bool, True)
    dimensions = _typed(payload, "EmbedRequest", "dimensions", int, 0)
    options = _typed(payload, "EmbedRequest", "options", dict, {})
    if not model:
        raise _Rejected(404, "model '' not found")
    raw = payload.get("input")
    if isinstance(raw, str):
        inputs = [raw] if raw else []
    elif isinstance(raw, list) and all(isinstance(text, str) for text in raw):
        inputs = raw
    elif raw is None:
        inputs = []
    else:
        raise _Rejected(400, "invalid input type")
    num_ctx = options.get("num_ctx")
    num_ctx = num_ctx if isinstance(num_ctx, int) and not isinstance(num_ctx, bool) else 0
    return _EmbedRequest(model, inputs, truncate, dimensions, num_ctx)


def _fault_text(status: int, body: bytes) -> str:
    """Ollama's wording for an injected failure; a 404 names the model the client sent."""
    if status != 404:
        return _DEFAULT_ERRORS.get(status, http.HTTPStatus(status).phrase.lower())
    with contextlib.suppress(ValueError):
        model = json.loads(body).get("model")
    model = model if isinstance(model, str) and model else "nomic-embed-text"
    return f"model {json.dumps(model)} not found, try pulling it first"


def _corrupt(vectors: list[list[float]], kind: str) -> list[list[float]]:
    if kind == "dimensions":
        return [[*vector, 0.0] for vector in vectors]  # still unit length, one too long
    if kind == "nan" and vectors:
        return [[math.nan, *vectors[0][1:]], *vectors[1:]]
    if kind == "count":
        return vectors[:-1]
    return []


@dataclass(frozen=True)
class _Fault:
    kind: str  # "fail" | "hang" | "drop" | "corrupt"
    status: int = 0
    error: str | None = None
    seconds: float = 0.0
    corruption: str = ""


class FakeOllama:
    """An in-process fake Ollama: knobs and stats are attributes, faults are queued by methods."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        dimensions: int = 768,
        models: Iterable[str] = ("nomic-embed-text",),
        request_latency: float = 0.0,
        input_latency: float = 0.0,
        max_pending: int = 512,
        context_length: int = 2048,
        embedding_capable: bool = True,
    ) -> None:
        self.host, self.port = host, port
        self.dimensions, self.context_length = dimensions, context_length
        self.models: set[str] = {_bare(model) for model in models}
        self.request_latency, self.input_latency = request_latency, input_latency
        self.max_pending, self.embedding_capable = max_pending, embedding_capable
        self._lock = threading.Lock()  # guards stats, faults, _waiting and _connections
        self._slot = threading.Lock()  # Ollama runs an embedding model with a single slot
        self._halt = threading.Event()  # set by down(): abandons sleeping requests
        self._server: _Server | None = None
        self._connections: set[socket.socket] = set()
        self._faults: deque[_Fault] = deque()
        self._waiting = self._in_flight = 0
        self.reset()

    @property
    def url(self) -> str:
        """The base URL, e.g. http://127.0.0.1:11434."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeOllama:
        """Serve in a daemon thread (port 0 picks a free port) and return self."""
        self.up()
        return self

    def up(self) -> None:
        """Listen again, on the same port once one has been chosen."""
        if self._server is not None:
            return
        self._halt = threading.Event()
        server = _Server((self.host, self.port), _Handler)
        server.fake, self.port, self._server = self, server.server_address[1], server
        # A short poll interval keeps down() quick: shutdown() waits for the loop to notice.
        thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
        thread.start()

    def down(self) -> None:
        """Stop listening and cut every connection, as a crashed Ollama; knobs and stats stay."""
        server, self._server = self._server, None
        if server is None:
            return
        self._halt.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        """Close the listening socket and all connections."""
        self.down()

    def __enter__(self) -> FakeOllama:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def fail_next(self, count: int, status: int, error: str | None = None) -> None:
        """Answer the next `count` /api/embed requests with `status` and `{"error": ...}`."""
        if status < 400 or status not in set(http.HTTPStatus):
            raise ValueError(f"not an HTTP error status: {status!r}")
        self._queue(count, _Fault("fail", status=status, error=error))

    def hang_next(self, count: int, seconds: float) -> None:
        """Hold the next `count` requests for `seconds` before answering (client timeouts)."""
        if not seconds >= 0:
            raise ValueError(f"seconds must be >= 0, not {seconds!r}")
        self._queue(count, _Fault("hang", seconds=seconds))

    def drop_next(self, count: int) -> None:
        """Close the connection of the next `count` requests without any response."""
        self._queue(count, _Fault("drop"))

    def corrupt_next(self, count: int, kind: str) -> None:
        """Answer the next `count` requests 200 with bad data: see CORRUPTIONS."""
        if kind not in CORRUPTIONS:
            raise ValueError(f"kind must be one of {sorted(CORRUPTIONS)}, not {kind!r}")
        self._queue(count, _Fault("corrupt", corruption=kind))

    def _queue(self, count: int, fault: _Fault) -> None:
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be an int >= 0, not {count!r}")
        with self._lock:
            self._faults.extend([fault] * count)

    def reset(self) -> None:
        """Clear pending faults and stats; knobs stay as they are."""
        with self._lock:
            self._faults.clear()
            self._requests = self._inputs = 0
            self._texts: list[str] = []
            self._batch_sizes: list[int] = []
            self._max_concurrent = self._in_flight

    @property
    def requests(self) -> int:
        """POST /api/embed requests answered, whatever the status."""
        with self._lock:
            return self._requests

    @property
    def inputs(self) -> int:
        """Input texts embedded (200 answers only)."""
        with self._lock:
            return self._inputs

    @property
    def texts(self) -> list[str]:
        """Every text embedded, as sent, in order."""
        with self._lock:
            return list(self._texts)

    @property
    def batch_sizes(self) -> list[int]:
        """Inputs per 200 answer of /api/embed."""
        with self._lock:
            return list(self._batch_sizes)

    @property
    def max_concurrent(self) -> int:
        """Most /api/embed requests in flight at once."""
        with self._lock:
            return self._max_concurrent

    @property
    def in_flight(self) -> int:
        """/api/embed requests arrived and not yet answered."""
        with self._lock:
            return self._in_flight

    def _has(self, model: str) -> bool:
        return _bare(model) in {_bare(pulled) for pulled in self.models}

    def _embed(self, body: bytes) -> _Reply | None:
        halt = self._halt
        with self._lock:
            fault = self._faults.popleft() if self._faults else _Fault("none")
            self._in_flight += 1
            self._max_concurrent = max(self._max_concurrent, self._in_flight)
        reply: _Reply | None = None
        try:
            if fault.kind == "fail":
                reply = (fault.status, {"error": fault.error or _fault_text(fault.status, body)})
            elif fault.kind != "drop" and not (fault.kind == "hang" and halt.wait(fault.seconds)):
                reply = self._embed_in_slot(_parse_embed(body), fault.corruption, halt)
        except _Rejected as rejected:
            reply = rejected.reply
        finally:
            # Counted before the answer is written, so a client that has it sees the stats.
            with self._lock:
                self._in_flight -= 1
                self._requests += reply is not None
        return reply

    def _embed_in_slot(
        self, request: _EmbedRequest, corruption: str, halt: threading.Event
    ) -> _Reply | None:
        if not self._has(request.model):
            raise _Rejected(
                404, f"model {json.dumps(request.model)} not found, try pulling it first"
            )
        if not self.embedding_capable:
            raise _Rejected(501, NO_EMBEDDINGS)
        arrived = time.monotonic_ns()
        if not self._take_slot():
            raise _Rejected(503, BUSY)
        try:
            loaded = time.monotonic_ns()
            context = self.context_length
            if request.num_ctx > 0:
                context = min(context, request.num_ctx)
            if not request.truncate and any(count_tokens(t) > context for t in request.inputs):
                raise _Rejected(400, TOO_LONG)  # one long item fails the whole batch
            texts = [text[: context * CHARS_PER_TOKEN] for text in request.inputs]
            if halt.wait(self.request_latency + self.input_latency * len(texts)):
                return None
            size = request.dimensions if 0 < request.dimensions < self.dimensions else None
            vectors = [vector_for(text, size or self.dimensions) for text in texts]
        finally:
            self._slot.release()
        with self._lock:
            self._inputs += len(texts)
            self._texts.extend(request.inputs)
            self._batch_sizes.append(len(texts))
        return 200, {
            "model": request.model,
            "embeddings": _corrupt(vectors, corruption) if corruption else vectors,
            "total_duration": time.monotonic_ns() - arrived,
            "load_duration": loaded - arrived,  # as in Ollama, includes the wait for the slot
            "prompt_eval_count": sum(count_tokens(text) for text in texts),
        }

    def _take_slot(self) -> bool:
        """Take the model's slot, queueing unless `max_pending` requests already wait for it."""
        with self._lock:
            if self._slot.acquire(blocking=False):
                return True
            if self._waiting >= self.max_pending:
                return False
            self._waiting += 1
        try:
            self._slot.acquire()
        finally:
            with self._lock:
                self._waiting -= 1
        return True

    def _show(self, body: bytes) -> _Reply:
        payload = _decode(body, "ShowRequest")
        model = _typed(payload, "ShowRequest", "model", str, "")
        model = model or _typed(payload, "ShowRequest", "name", str, "")
        if not model:
            raise _Rejected(400, "model is required")
        if not self._has(model):
            raise _Rejected(404, f"model '{model}' not found")
        info = {
            "general.architecture": "nomic-bert",
            "nomic-bert.embedding_length": self.dimensions,
            "nomic-bert.context_length": self.context_length,
        }
        capabilities = ["embedding"] if self.embedding_capable else ["completion"]
        return 200, {"capabilities": capabilities, "model_info": info, "details": _DETAILS}

    def _tags(self, body: bytes) -> _Reply:
        names = sorted(m if ":" in m else f"{m}:latest" for m in map(_bare, self.models))
        digest = {name: hashlib.sha256(name.encode()).hexdigest() for name in names}
        return 200, {
            "models": [
                {"name": name, "model": name, "size": 274302450, "digest": digest[name]}
                | {"modified_at": "2025-01-01T00:00:00Z", "details": _DETAILS}
                for name in names
            ]
        }

    def _stats(self, body: bytes) -> _Reply:
        with self._lock:
            return 200, {
                "requests": self._requests,
                "inputs": self._inputs,
                "texts": list(self._texts),
                "batch_sizes": list(self._batch_sizes),
                "max_concurrent": self._max_concurrent,
                "in_flight": self._in_flight,
                "pending_faults": len(self._faults),
            }

    def _reset(self, body: bytes) -> _Reply:
        self.reset()
        return self._stats(body)

    def _config(self, body: bytes) -> _Reply:
        changes = _decode(body, "config") if body.strip() else {}
        for key, value in changes.items():
            kinds = _KNOBS.get(key, ())
            valid = isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))
            if not valid or (key == "models" and not all(isinstance(m, str) for m in value)):
                raise _Rejected(400, f"invalid config field {key!r}: {value!r}")
            minimum = 1 if key in _POSITIVE else 0
            if not isinstance(value, bool | list) and value < minimum:
                raise _Rejected(400, f"config field {key!r} is too small: {value!r}")
        for key, value in changes.items():
            setattr(self, key, {_bare(m) for m in value} if key == "models" else value)
        return 200, {key: getattr(self, key) for key in _KNOBS} | {"models": sorted(self.models)}

    def _add_faults(self, body: bytes) -> _Reply:
        payload = _decode(body, "fault")
        kind, count = payload.get("kind"), payload.get("count", 1)
        try:
            if kind == "fail":
                self.fail_next(count, payload.get("status", 500), payload.get("error"))
            elif kind == "hang":
                self.hang_next(count, payload.get("seconds", 1.0))
            elif kind == "drop":
                self.drop_next(count)
            elif kind == "corrupt":
                self.corrupt_next(count, payload.get("corruption", "nan"))
            else:
                raise ValueError(f"kind must be fail, hang, drop or corrupt, not {kind!r}")
        except (TypeError, ValueError) as exc:
            raise _Rejected(400, str(exc)) from None
        with self._lock:
            return 200, {"pending_faults": len(self._faults)}


_KNOBS: dict[str, tuple[type, ...]] = {
    "request_latency": (int, float),
    "input_latency": (int, float),
    "dimensions": (int,),
    "context_length": (int,),
    "max_pending": (int,),
    "embedding_capable": (bool,),
    "models": (list,),
}
_POSITIVE = frozenset({"dimensions", "context_length"})
_Route = Callable[[FakeOllama, bytes], _Reply | None]
_GET_ONLY: dict[str, _Route] = {"/": lambda f, b: (200, "Ollama is running")}
_GET_ONLY |= {
    "/api/version": lambda f, b: (200, {"version": VERSION}),
    "/api/tags": FakeOllama._tags,
}
_ROUTES: dict[str, dict[str, _Route]] = {
    path: {"GET": r, "HEAD": r} for path, r in _GET_ONLY.items()
}
_ROUTES |= {
    "/api/embed": {"POST": FakeOllama._embed},
    "/api/show": {"POST": FakeOllama._show},
    "/_fake/stats": {"GET": FakeOllama._stats},
    "/_fake/reset": {"POST": FakeOllama._reset},
    "/_fake/config": {"GET": FakeOllama._config, "POST": FakeOllama._config},
    "/_fake/faults": {"POST": FakeOllama._add_faults},
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # down() must not wait for requests that hang
    fake: FakeOllama

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), which can stall offline.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so an httpx client reuses its connection
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms ACK wait
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.fake._lock:
            self.server.fake._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.fake._lock:
            self.server.fake._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: tests and the demo have their own output

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        # Read the whole body first: an unread body would be parsed as the next request.
        length = self.headers.get("Content-Length", "0")
        if not length.isdigit():
            self.close_connection = True
            return self._send((400, "invalid Content-Length"), method)
        body = self.rfile.read(int(length))
        routes = _ROUTES.get(self.path.split("?", 1)[0])
        route = routes.get(method) if routes else None
        try:
            if routes is None:
                reply: _Reply | None = (404, "404 page not found")
            elif route is None:
                reply = (405, "405 method not allowed")
            else:
                reply = route(self.server.fake, body)
        except _Rejected as rejected:
            reply = rejected.reply
        if reply is None:
            self.close_connection = True  # a dropped request: no status line at all
            return None
        return self._send(reply, method)

    def _send(self, reply: _Reply, method: str) -> None:
        status, payload = reply
        text = isinstance(payload, str)
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header(
                "Content-Type", f"{'text/plain' if text else 'application/json'}; charset=utf-8"
            )
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(data)
        except OSError:
            self.close_connection = True  # the client gave up (a timeout) before the answer


def main(argv: list[str] | None = None) -> None:
    """Serve a fake Ollama until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m devstack.fake_ollama", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434, help="0 picks a free port")
    parser.add_argument("--dimensions", type=int, default=768)
    parser.add_argument("--request-ms", type=float, default=0.0, help="latency per request")
    parser.add_argument("--input-ms", type=float, default=0.0, help="latency per input text")
    parser.add_argument("--context-length", type=int, default=2048)
    parser.add_argument("--model", action="append", help="a pulled model (repeatable)")
    args = parser.parse_args(argv)
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    fake = FakeOllama(
        host=args.host,
        port=args.port,
        dimensions=args.dimensions,
        models=args.model or ("nomic-embed-text",),
        request_latency=args.request_ms / 1000,
        input_latency=args.input_ms / 1000,
        context_length=args.context_length,
    ).start()
    print(f"Fake Ollama listening on {fake.url} (vectors are not semantic)", flush=True)
    try:
        stopping.wait()
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
