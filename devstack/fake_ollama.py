"""A fake Ollama server for the tests, the demo and the benchmarks (vectors are not semantic).

It serves POST /api/embed, POST /api/show, GET /api/tags, GET /api/version and GET|HEAD / with
Ollama's status codes and error bodies (devstack.ollama_protocol holds the wire rules), runs
embeddings through one slot as Ollama does, and takes knobs, faults and stats.

Faults queue up in order: each POST /api/embed consumes the oldest pending one. `requests`
counts every answered /api/embed (any status; a dropped one is not answered); `inputs`, `texts`
and `batch_sizes` count 200 answers only, texts as sent (before truncation).

The model's own time is counted too, for 200 answers: `model_seconds` is the sum of each
request's time in the slot (its knobs' cost, from its arrival or from the moment it took the
slot after a wait), and `idle_gaps` the time the model waited between one answer leaving and
the next request's start (0 for a request that was already queued), in order. A bench reads
from them how busy a client keeps the model, as the fake itself sees it. An answer that left
after its model time was up (this process short of CPU) counts from when it left, so the fake's
own delay is not the client's; `late_answers` says by how much each was late.

Control API, for a process that did not start the fake (answers are JSON):
  GET  /_fake/stats                     -> the stats, plus "pending_faults"
  POST /_fake/reset                     -> clears faults and stats, answers the stats
  GET|POST /_fake/config {knob: value}  -> request_latency, input_latency, dimensions, models,
                                           model_dimensions, embedding_capable, context_length,
                                           max_pending

Each model has its own vectors (see ollama_protocol.vector_for) and its own size: the one in
`model_dimensions` ({model: size}), else `dimensions`.
  POST /_fake/faults {"kind": "fail", "count": 1, "status": 500, "error": "..."}
                     {"kind": "hang", "count": 1, "seconds": 5.0}   {"kind": "drop", "count": 1}
                     {"kind": "corrupt", "count": 1, "corruption": "nan"}
                     {"kind": "html", "count": 1}  (a proxy's HTML page, status 200)
"""

from __future__ import annotations

import argparse
import contextlib
import http
import itertools
import json
import signal
import socket
import socketserver
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any

from devstack import ollama_protocol as wire
from devstack.ollama_protocol import BUSY, NAN_OUTPUT, NO_EMBEDDINGS, TOO_LONG, vector_for

__all__ = [
    "BUSY",
    "NAN_OUTPUT",
    "NO_EMBEDDINGS",
    "PROXY_PAGE",
    "TOO_LONG",
    "FakeOllama",
    "HtmlPage",
    "main",
    "vector_for",
]


class HtmlPage(str):
    """A payload sent as text/html: what a proxy in front of Ollama answers (a login page...)."""


PROXY_PAGE = HtmlPage(
    "<!DOCTYPE html>\n<html><head><title>Sign in</title></head>"
    "<body><h1>Sign in to continue</h1></body></html>\n"
)
# A str payload is sent as text/plain (an HtmlPage as text/html), bytes as a JSON body already
# encoded, anything else as JSON.
_Reply = tuple[int, object]
_KNOBS: dict[str, tuple[type, ...]] = {
    "request_latency": (int, float),
    "input_latency": (int, float),
    "dimensions": (int,),
    "context_length": (int,),
    "max_pending": (int,),
    "embedding_capable": (bool,),
    "models": (list,),
    "model_dimensions": (dict,),
}


class Gate:
    """Holds /api/embed requests (those with an input containing `match`, or all) unanswered
    until `release()`, so a test can act (kill a worker, cut a connection) while they wait."""

    def __init__(self, match: str | None, halt: threading.Event) -> None:
        self.match = match
        self._changed = threading.Condition()
        self._halt = halt
        self._open = False
        self.held = 0  # requests that have reached the gate, released or not

    def matches(self, inputs: list[str]) -> bool:
        return self.match is None or any(self.match in text for text in inputs)

    def wait_held(self, count: int = 1, timeout: float = 60.0) -> None:
        """Block until `count` requests wait at the gate; TimeoutError if they do not come."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.held >= count, timeout):
                raise TimeoutError(f"{self.held} of {count} requests reached the gate")

    def release(self) -> None:
        """Answer every request held, and let later ones through."""
        with self._changed:
            self._open = True
            self._changed.notify_all()

    @property
    def is_open(self) -> bool:
        return self._open

    def pass_through(self) -> None:
        with self._changed:
            self.held += 1
            self._changed.notify_all()
            while not (self._open or self._halt.is_set()):
                self._changed.wait(0.05)


@dataclass(frozen=True)
class _Fault:
    kind: str  # "fail" | "hang" | "drop" | "corrupt" | "html" | "none"
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
        model_dimensions: dict[str, int] | None = None,
        request_latency: float = 0.0,
        input_latency: float = 0.0,
        max_pending: int = 512,
        context_length: int = 2048,
        embedding_capable: bool = True,
    ) -> None:
        self.host, self.port = host, port
        self.dimensions, self.context_length = dimensions, context_length
        self.models: set[str] = {wire.bare_model(model) for model in models}
        self.model_dimensions: dict[str, int] = dict(model_dimensions or {})
        self.request_latency, self.input_latency = request_latency, input_latency
        self.max_pending, self.embedding_capable = max_pending, embedding_capable
        self._lock = threading.Lock()  # guards stats, faults, _waiting and _connections
        self._slot = threading.Lock()  # Ollama runs an embedding model with a single slot
        self._halt = threading.Event()  # set by down(): abandons requests that sleep
        self._server: _Server | None = None
        self._connections: set[socket.socket] = set()
        self._faults: deque[_Fault] = deque()
        self._gates: list[Gate] = []
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
        threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()

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

    def nan_for(self, match: str) -> None:
        """The model emits NaN for any input containing `match`: Ollama answers the whole
        request 400 `embedding contains NaN or Inf values`, as it does for such a text."""
        with self._lock:
            self._nan_matches.append(match)

    def hang_next(self, count: int, seconds: float) -> None:
        """Hold the next `count` requests for `seconds` before answering (client timeouts)."""
        if not seconds >= 0:
            raise ValueError(f"seconds must be >= 0, not {seconds!r}")
        self._queue(count, _Fault("hang", seconds=seconds))

    def drop_next(self, count: int) -> None:
        """Close the connection of the next `count` requests without any response."""
        self._queue(count, _Fault("drop"))

    def corrupt_next(self, count: int, kind: str) -> None:
        """Answer the next `count` requests 200 with data a client must reject (see CORRUPTIONS)."""
        if kind not in wire.CORRUPTIONS:
            raise ValueError(f"kind must be one of {sorted(wire.CORRUPTIONS)}, not {kind!r}")
        self._queue(count, _Fault("corrupt", corruption=kind))

    def proxy_page_next(self, count: int) -> None:
        """Answer the next `count` requests 200 with an HTML page, as a proxy in front of Ollama
        does (a login or maintenance page), without reaching the model."""
        self._queue(count, _Fault("html"))

    def hold(self, match: str | None = None) -> Gate:
        """Hold every /api/embed request (or those with an input containing `match`) unanswered
        until the returned gate is released."""
        gate = Gate(match, self._halt)
        with self._lock:
            self._gates.append(gate)
        return gate

    def _gate_for(self, body: bytes) -> Gate | None:
        with self._lock:
            self._gates = [gate for gate in self._gates if not gate.is_open]
            gates = list(self._gates)
        if not gates:
            return None
        try:
            inputs = wire.parse_embed(body).inputs
        except wire.Rejected:
            return None
        return next((gate for gate in gates if gate.matches(inputs)), None)

    def _queue(self, count: int, fault: _Fault) -> None:
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be an int >= 0, not {count!r}")
        with self._lock:
            self._faults.extend([fault] * count)

    def reset(self) -> None:
        """Clear pending faults and stats; knobs stay as they are."""
        with self._lock:
            for gate in self._gates:
                gate.release()
            self._gates = []
            self._nan_matches: list[str] = []
            self._faults.clear()
            self._requests = self._inputs = 0
            self._texts: list[str] = []
            self._batch_sizes: list[int] = []
            # Per 200 answer: [began, done, queued for the slot, when it began to leave] (ns)
            self._model_times: list[list[int]] = []
            self._max_concurrent = self._in_flight

    @property
    def requests(self) -> int:
        """POST /api/embed requests answered, whatever the status."""
        return int(self._stats()["requests"])

    @property
    def inputs(self) -> int:
        """Input texts embedded (200 answers only)."""
        return int(self._stats()["inputs"])

    @property
    def texts(self) -> list[str]:
        """Every text embedded, as sent, in order."""
        return list(self._stats()["texts"])

    @property
    def batch_sizes(self) -> list[int]:
        """Inputs per 200 answer of /api/embed."""
        return list(self._stats()["batch_sizes"])

    @property
    def max_concurrent(self) -> int:
        """Most /api/embed requests in flight at once."""
        return int(self._stats()["max_concurrent"])

    @property
    def in_flight(self) -> int:
        """/api/embed requests arrived and not yet answered."""
        return int(self._stats()["in_flight"])

    @property
    def model_seconds(self) -> float:
        """The model's own time for the 200 answers, each request's time in the slot."""
        return float(self._stats()["model_seconds"])

    @property
    def idle_gaps(self) -> list[float]:
        """Seconds the model sat idle between one answer leaving and the next request's start."""
        return list(self._stats()["idle_gaps"])

    @property
    def late_answers(self) -> list[float]:
        """Seconds each answer left after its model time was up: the fake's own delay."""
        return list(self._stats()["late_answers"])

    def _stats(self) -> dict[str, Any]:
        with self._lock:
            times = sorted(self._model_times)
            return {
                "model_seconds": sum(done - began for began, done, _, _ in times) / 1e9,
                # A queued request starts as the slot is let go: the hand-off is the fake's.
                "idle_gaps": [
                    0.0 if queued else max(0, began - left) / 1e9
                    for (_, _, _, left), (began, _, queued, _) in itertools.pairwise(times)
                ],
                "late_answers": [(left - done) / 1e9 for _, done, _, left in times],
                "requests": self._requests,
                "inputs": self._inputs,
                "texts": list(self._texts),
                "batch_sizes": list(self._batch_sizes),
                "max_concurrent": self._max_concurrent,
                "in_flight": self._in_flight,
                "pending_faults": len(self._faults),
            }

    def size_of(self, model: str) -> int:
        """The size of `model`'s vectors: its own in `model_dimensions`, else `dimensions`."""
        sizes = {wire.bare_model(name): size for name, size in self.model_dimensions.items()}
        return sizes.get(wire.bare_model(model), self.dimensions)

    def _has(self, model: str) -> bool:
        return wire.bare_model(model) in {wire.bare_model(pulled) for pulled in self.models}

    def _embed(self, body: bytes) -> _Reply | None:
        halt = self._halt
        with self._lock:
            fault = self._faults.popleft() if self._faults else _Fault("none")
            self._in_flight += 1
            self._max_concurrent = max(self._max_concurrent, self._in_flight)
        reply: _Reply | None = None
        gate = self._gate_for(body)
        if gate is not None:
            gate.pass_through()
        # The model's time starts at the request's arrival, or once a gate or a hang let it go.
        since = time.monotonic_ns() if gate is not None else getattr(_arrival, "ns", 0)
        try:
            if fault.kind == "fail":
                reply = (
                    fault.status,
                    {"error": fault.error or wire.fault_text(fault.status, body)},
                )
            elif fault.kind == "html":
                reply = (200, PROXY_PAGE)
            # A hang waits outside the slot: a client's retry is not stuck behind the request
            # it abandoned.
            elif fault.kind != "drop" and not (fault.kind == "hang" and halt.wait(fault.seconds)):
                if fault.kind == "hang":
                    since = time.monotonic_ns()
                request = wire.parse_embed(body)
                reply = self._embed_in_slot(request, fault.corruption, halt, since)
        except wire.Rejected as rejected:
            reply = (rejected.status, {"error": rejected.message})
        finally:
            # Counted before the answer is written, so a client that has it sees the stats.
            with self._lock:
                self._in_flight -= 1
                self._requests += reply is not None
        return reply

    def _embed_in_slot(
        self, request: wire.EmbedRequest, corruption: str, halt: threading.Event, since: int
    ) -> _Reply | None:
        if not self._has(request.model):
            raise wire.Rejected(404, wire.not_pulled(request.model))
        if not self.embedding_capable:
            raise wire.Rejected(501, NO_EMBEDDINGS)
        arrived = time.monotonic_ns()
        waited = not self._slot.acquire(blocking=False)
        if waited and not self._take_slot():
            raise wire.Rejected(503, BUSY)
        try:
            loaded = time.monotonic_ns()
            # The knobs are the client's view of the model: they run from `since`, the request's
            # arrival (reading and parsing it is the server's time, as in Ollama, not time on
            # top), or from taking the slot when the request waited for it.
            began = loaded if waited else (since or arrived)
            context = min(self.context_length, request.num_ctx or self.context_length)
            if not request.truncate and any(wire.count_tokens(t) > context for t in request.inputs):
                raise wire.Rejected(400, TOO_LONG)  # one long item fails the whole batch
            texts = [text[: context * wire.CHARS_PER_TOKEN] for text in request.inputs]
            with self._lock:
                nan = any(m in text for m in self._nan_matches for text in texts)
            if nan:
                raise wire.Rejected(400, NAN_OUTPUT)
            size, model = self.size_of(request.model), request.model
            dimensions = request.dimensions if 0 < request.dimensions < size else size
            if corruption:
                vectors = [vector_for(text, dimensions, model) for text in texts]
                embeddings = json.dumps(wire.corrupt(vectors, corruption))
            else:
                embeddings = (
                    "[" + ",".join(wire.vector_json(t, dimensions, model) for t in texts) + "]"
                )
            # The knobs are the time the slot is held, computing the vectors included.
            cost = self.request_latency + self.input_latency * len(texts)
            done = began + int(cost * 1e9)
            # Assembled as text (the vectors are JSON already, see wire.vector_json), and
            # before the wait: the answer leaves when the model's time is up.
            fields = json.dumps(
                {
                    "model": request.model,
                    "total_duration": max(done, time.monotonic_ns()) - arrived,
                    "load_duration": loaded - arrived,  # as in Ollama: the wait for the slot
                    "prompt_eval_count": sum(wire.count_tokens(text) for text in texts),
                }
            )
            body = f'{{"embeddings": {embeddings}, {fields[1:]}'.encode()
            if not _until(done, halt):
                return None
        finally:
            self._slot.release()
        with self._lock:
            self._inputs += len(texts)
            self._texts.extend(request.inputs)
            self._batch_sizes.append(len(texts))
            entry = [began, done, int(waited), done]
            self._model_times.append(entry)
        _answer.entry = entry  # the handler notes when it begins to send it
        return 200, body

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
        payload = wire.decode_object(body, "ShowRequest")
        model = wire.typed_field(payload, "ShowRequest", "model", str, "")
        model = model or wire.typed_field(payload, "ShowRequest", "name", str, "")
        if not model:
            raise wire.Rejected(400, "model is required")
        if not self._has(model):
            raise wire.Rejected(404, f"model '{model}' not found")
        return 200, wire.show_payload(
            self.size_of(model), self.context_length, self.embedding_capable
        )

    def _configure(self, body: bytes) -> _Reply:
        changes = wire.decode_object(body, "config") if body.strip() else {}
        for key, value in changes.items():
            kinds = _KNOBS.get(key, ())
            valid = isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))
            if key == "model_dimensions":
                valid = valid and all(
                    isinstance(m, str) and isinstance(n, int) and n >= 1 for m, n in value.items()
                )
            if not valid or (key == "models" and not all(isinstance(m, str) for m in value)):
                raise wire.Rejected(400, f"invalid config field {key!r}: {value!r}")
            minimum = 1 if key in ("dimensions", "context_length") else 0
            if not isinstance(value, bool | list | dict) and value < minimum:
                raise wire.Rejected(400, f"config field {key!r} must be >= {minimum}: {value!r}")
        for key, value in changes.items():  # applied only once every field is valid
            setattr(self, key, {wire.bare_model(m) for m in value} if key == "models" else value)
        return 200, {key: getattr(self, key) for key in _KNOBS} | {"models": sorted(self.models)}

    def _add_faults(self, body: bytes) -> _Reply:
        fault = wire.decode_object(body, "fault")
        kind, count = fault.get("kind"), fault.get("count", 1)
        try:
            if kind == "fail":
                self.fail_next(count, fault.get("status", 500), fault.get("error"))
            elif kind == "hang":
                self.hang_next(count, fault.get("seconds", 1.0))
            elif kind == "drop":
                self.drop_next(count)
            elif kind == "corrupt":
                self.corrupt_next(count, fault.get("corruption", "nan"))
            elif kind == "html":
                self.proxy_page_next(count)
            else:
                raise ValueError(f"kind must be fail, hang, drop, corrupt or html, not {kind!r}")
        except (TypeError, ValueError) as exc:
            raise wire.Rejected(400, str(exc)) from None
        return 200, {"pending_faults": self._stats()["pending_faults"]}

    def _reset(self, body: bytes) -> _Reply:
        self.reset()
        return 200, self._stats()


_Route = Callable[[FakeOllama, bytes], _Reply | None]
_ROUTES: dict[str, dict[str, _Route]] = {
    "/": {"GET": lambda fake, body: (200, "Ollama is running")},
    "/api/version": {"GET": lambda fake, body: (200, {"version": wire.VERSION})},
    "/api/tags": {"GET": lambda fake, body: (200, wire.tags_payload(fake.models))},
    "/api/embed": {"POST": FakeOllama._embed},
    "/api/show": {"POST": FakeOllama._show},
    "/_fake/stats": {"GET": lambda fake, body: (200, fake._stats())},
    "/_fake/reset": {"POST": FakeOllama._reset},
    "/_fake/config": {"GET": FakeOllama._configure, "POST": FakeOllama._configure},
    "/_fake/faults": {"POST": FakeOllama._add_faults},
}
for _methods in _ROUTES.values():
    if "GET" in _methods:  # Ollama's GET routes answer HEAD too
        _methods.setdefault("HEAD", _methods["GET"])


# When the request line of the request this thread serves came in.
_arrival = threading.local()
_answer = threading.local()  # .entry: the model-time entry of the answer this thread sends
# The last stretch of a model's time is waited out awake: a timer wakes a sleeping thread a
# few hundred microseconds late on an idle machine, and a model answers when it is done.
_AWAKE_NS = 500_000


def _until(deadline_ns: int, halt: threading.Event) -> bool:
    """Wait until `deadline_ns` (time.monotonic_ns); False if `halt` was set meanwhile."""
    if halt.wait(max(0.0, (deadline_ns - _AWAKE_NS - time.monotonic_ns()) / 1e9)):
        return False
    while time.monotonic_ns() < deadline_ns:
        if halt.is_set():
            return False
    return True


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
    disable_nagle_algorithm = True  # no 40 ms delayed ACK on a write that follows another
    # Buffered: the status line, headers and a small body leave in one write at the end of
    # the request, so the client wakes once for its answer.
    wbufsize = 1 << 16
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
        pass  # quiet: the tests and the demo have their own output

    def parse_request(self) -> bool:
        _arrival.ns = time.monotonic_ns()  # the request line has just been read
        return super().parse_request()

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        length = self.headers.get("Content-Length", "0")
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        if not length.isdigit():
            self.close_connection = True
            return self._send((400, "invalid Content-Length"), method)
        # Read the body even when it is not needed: left unread it would pass for the next request.
        body = self._read_chunks() if chunked else self.rfile.read(int(length))
        routes = _ROUTES.get(self.path.split("?", 1)[0])
        route = routes.get(method) if routes else None
        try:
            if routes is None:
                reply: _Reply | None = (404, "404 page not found")
            elif route is None:
                reply = (405, "405 method not allowed")
            else:
                reply = route(self.server.fake, body)
        except wire.Rejected as rejected:
            reply = (rejected.status, {"error": rejected.message})
        if reply is None:
            self.close_connection = True  # a dropped request: no status line at all
            return None
        return self._send(reply, method)

    def _read_chunks(self) -> bytes:
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0] or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline().strip():
            pass  # trailer fields, up to the blank line
        return b"".join(chunks)

    def _send(self, reply: _Reply, method: str) -> None:
        status, payload = reply
        text = isinstance(payload, str)
        if isinstance(payload, bytes):
            data = payload
        else:
            data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        entry, _answer.entry = getattr(_answer, "entry", None), None
        if entry is not None:
            entry[3] = max(entry[1], time.monotonic_ns())
        try:
            self.send_response(status)
            kind = "text/html" if isinstance(payload, HtmlPage) else "text/plain"
            self.send_header("Content-Type", kind if text else "application/json")
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
