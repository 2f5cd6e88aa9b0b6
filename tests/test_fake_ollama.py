"""The fake Ollama server, spoken to over loopback HTTP as the embedder speaks to Ollama."""

from __future__ import annotations

import math
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.fake_ollama import BUSY, NO_EMBEDDINGS, TOO_LONG, FakeOllama, vector_for
from tests.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = "nomic-embed-text"
# The fake speaks plain HTTP: one shared context spares every client loading the CA bundle (50 ms).
PLAIN_HTTP = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def new_client(fake: FakeOllama) -> httpx.Client:
    return httpx.Client(base_url=fake.url, timeout=5.0, verify=PLAIN_HTTP)


@pytest.fixture
def fake() -> Iterator[FakeOllama]:
    with FakeOllama() as server:
        yield server


@pytest.fixture
def client(fake: FakeOllama) -> Iterator[httpx.Client]:
    with new_client(fake) as http_client:
        yield http_client


def embed(client: httpx.Client, **body: Any) -> httpx.Response:
    return client.post("/api/embed", json={"model": MODEL, **body})


def norm(vector: list[float]) -> float:
    return math.sqrt(math.fsum(x * x for x in vector))


# --- vectors ---------------------------------------------------------------------------------


def test_vector_for_is_deterministic_unit_length_and_differs_by_text() -> None:
    assert vector_for("review pull requests") == vector_for("review pull requests")
    assert vector_for("review pull requests") != vector_for("review pull request")
    assert len(vector_for("x", 64)) == 64
    assert norm(vector_for("x")) == pytest.approx(1.0)


def test_each_model_has_its_own_vectors_and_size(fake: FakeOllama, client: httpx.Client) -> None:
    fake.models = {MODEL, "mxbai-embed-large", "embeddinggemma"}
    fake.model_dimensions = {"mxbai-embed-large:latest": 1024}
    answers = {
        model: embed(client, model=model, input="x").json()["embeddings"][0]
        for model in fake.models
    }
    assert answers[MODEL] == vector_for("x")
    assert answers["embeddinggemma"] == vector_for("x", 768, "embeddinggemma") != answers[MODEL]
    assert len(answers["mxbai-embed-large"]) == 1024
    show = client.post("/api/show", json={"model": "mxbai-embed-large"}).json()
    assert show["model_info"]["nomic-bert.embedding_length"] == 1024
    assert client.post("/_fake/config", json={"model_dimensions": {"x": 0}}).status_code == 400


def test_string_input_is_embedded_as_one_vector_of_that_text(client: httpx.Client) -> None:
    response = embed(client, input="Review pull requests")
    assert response.status_code == 200
    assert response.json()["embeddings"] == [vector_for("Review pull requests")]


def test_list_input_is_embedded_in_order_with_unit_vectors(client: httpx.Client) -> None:
    texts = ["first", "second", "third"]
    embeddings = embed(client, input=texts).json()["embeddings"]
    assert embeddings == [vector_for(text) for text in texts]
    assert [norm(vector) for vector in embeddings] == pytest.approx([1.0, 1.0, 1.0])


def test_response_echoes_the_model_and_reports_durations_and_tokens(client: httpx.Client) -> None:
    # Tokens are approximated as ceil(characters / 4): "abcd" is 1, "abcde" is 2.
    body = embed(client, input=["abcd", "abcde"], model=f"{MODEL}:latest").json()
    assert body["model"] == f"{MODEL}:latest"
    assert body["prompt_eval_count"] == 3
    assert body["total_duration"] >= body["load_duration"] >= 0
    assert isinstance(body["total_duration"], int)


@pytest.mark.parametrize("body", [{"input": ""}, {"input": []}, {}], ids=["empty", "[]", "missing"])
def test_empty_input_returns_no_embeddings(client: httpx.Client, body: dict[str, Any]) -> None:
    response = embed(client, **body)
    assert response.status_code == 200
    assert response.json()["embeddings"] == []


def test_empty_string_inside_a_list_is_embedded_not_dropped(client: httpx.Client) -> None:
    assert embed(client, input=["a", ""]).json()["embeddings"] == [vector_for("a"), vector_for("")]


def test_prompt_field_is_ignored_like_any_unknown_field(client: httpx.Client) -> None:
    response = embed(client, prompt="a classic client bug")
    assert response.status_code == 200
    assert response.json()["embeddings"] == []


def test_long_input_is_cut_to_the_context_by_default(
    fake: FakeOllama, client: httpx.Client
) -> None:
    fake.context_length = 8  # 8 tokens = 32 characters
    body = embed(client, input="y" * 50).json()
    assert body["embeddings"] == [vector_for("y" * 32)]
    assert body["prompt_eval_count"] == 8


def test_truncate_false_fails_the_whole_batch_for_one_long_input(
    fake: FakeOllama, client: httpx.Client
) -> None:
    fake.context_length = 8
    response = embed(client, input=["short", "y" * 33], truncate=False)
    assert (response.status_code, response.json()) == (400, {"error": TOO_LONG})
    assert embed(client, input=["y" * 32], truncate=False).status_code == 200
    assert fake.texts == ["y" * 32]


def test_dimensions_param_cuts_and_renormalises(client: httpx.Client) -> None:
    vector = embed(client, input="x", dimensions=256).json()["embeddings"][0]
    assert vector == vector_for("x", 256)
    assert norm(vector) == pytest.approx(1.0)


@pytest.mark.parametrize("dimensions", [0, -3, 768, 1000])
def test_dimensions_param_out_of_range_is_ignored(client: httpx.Client, dimensions: int) -> None:
    assert embed(client, input="x", dimensions=dimensions).json()["embeddings"] == [vector_for("x")]


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"input": "x"}, 404, "model '' not found"),
        ({"model": "", "input": "x"}, 404, "model '' not found"),
        (
            {"model": "all-minilm", "input": "x"},
            404,
            'model "all-minilm" not found, try pulling it first',
        ),
        ({"model": MODEL, "input": 5}, 400, "invalid input type"),
        ({"model": MODEL, "input": ["ok", 5]}, 400, "invalid input type"),
        ({"model": MODEL, "input": {"text": "x"}}, 400, "invalid input type"),
    ],
    ids=["model-missing", "model-empty", "not-pulled", "number", "list-with-number", "object"],
)
def test_invalid_embed_request_is_answered_like_ollama(
    client: httpx.Client, body: dict[str, Any], status: int, error: str
) -> None:
    response = client.post("/api/embed", json=body)
    assert (response.status_code, response.json()) == (status, {"error": error})


def test_empty_body_is_missing_request_body(client: httpx.Client) -> None:
    response = client.post("/api/embed")
    assert (response.status_code, response.json()) == (400, {"error": "missing request body"})


def test_malformed_json_is_400_with_the_decoder_message(client: httpx.Client) -> None:
    response = client.post("/api/embed", content=b'{"model": ')
    assert response.status_code == 400
    assert response.json()["error"]


def test_wrong_field_type_is_400_with_the_decoder_message(client: httpx.Client) -> None:
    response = client.post("/api/embed", json={"model": 7, "input": "x"})
    assert response.status_code == 400
    assert "cannot unmarshal number" in response.json()["error"]


def test_model_that_cannot_embed_is_501(fake: FakeOllama, client: httpx.Client) -> None:
    fake.embedding_capable = False
    response = embed(client, input="x")
    assert (response.status_code, response.json()) == (501, {"error": NO_EMBEDDINGS})
    assert "embedding" not in client.post("/api/show", json={"model": MODEL}).json()["capabilities"]


def test_full_queue_is_503_server_busy(fake: FakeOllama) -> None:
    fake.max_pending, fake.request_latency = 0, 0.3
    with ThreadPoolExecutor(2) as pool, new_client(fake) as other:
        first = pool.submit(embed, other, input="first")
        deadline = time.monotonic() + 2
        while fake.in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        with new_client(fake) as client:
            second = embed(client, input="second")
        responses = [first.result(), second]
    assert sorted(r.status_code for r in responses) == [200, 503]
    assert {"error": BUSY} in [r.json() for r in responses]


def test_unknown_path_is_plain_text_404(client: httpx.Client) -> None:
    response = client.get("/api/nothing")
    assert (response.status_code, response.text) == (404, "404 page not found")
    assert response.headers["content-type"].startswith("text/plain")


def test_get_on_embed_is_plain_text_405(client: httpx.Client) -> None:
    response = client.get("/api/embed")
    assert (response.status_code, response.text) == (405, "405 method not allowed")


# --- discovery -------------------------------------------------------------------------------


def test_root_answers_get_and_head(client: httpx.Client) -> None:
    assert client.get("/").text == "Ollama is running"
    head = client.head("/")
    assert (head.status_code, head.content) == (200, b"")


def test_version(client: httpx.Client) -> None:
    assert client.get("/api/version").json() == {"version": "0.32.15"}


def test_tags_lists_pulled_models_with_their_tag(client: httpx.Client) -> None:
    models = client.get("/api/tags").json()["models"]
    assert [(m["name"], m["model"]) for m in models] == [(f"{MODEL}:latest", f"{MODEL}:latest")]
    assert "details" in models[0]


def test_show_reports_capability_dimensions_and_context(
    fake: FakeOllama, client: httpx.Client
) -> None:
    fake.dimensions = 384
    body = client.post("/api/show", json={"model": f"{MODEL}:latest"}).json()
    assert "embedding" in body["capabilities"]
    assert body["model_info"]["general.architecture"] == "nomic-bert"
    assert body["model_info"]["nomic-bert.embedding_length"] == 384
    assert body["model_info"]["nomic-bert.context_length"] == 2048


def test_show_of_a_model_not_pulled_is_404(client: httpx.Client) -> None:
    assert client.post("/api/show", json={"model": "all-minilm"}).status_code == 404


def test_chunked_request_body_is_read_whole(client: httpx.Client) -> None:
    chunks = iter([b'{"model": "nomic-embed-text", ', b'"input": "x"}'])
    response = client.post("/api/embed", content=chunks)
    assert response.json()["embeddings"] == [vector_for("x")]
    assert embed(client, input="y").status_code == 200  # the connection is still in step


def test_client_reuses_one_keep_alive_connection(client: httpx.Client) -> None:
    ports = [
        embed(client, input="x").extensions["network_stream"].get_extra_info("client_addr")
        for _ in range(3)
    ]
    assert len(set(ports)) == 1


# --- cost model and the single slot ------------------------------------------------------------


def test_latency_grows_with_the_number_of_inputs(fake: FakeOllama, client: httpx.Client) -> None:
    fake.request_latency, fake.input_latency = 0.05, 0.02
    started = time.monotonic()
    embed(client, input=[f"text {i}" for i in range(10)])
    assert 0.25 <= time.monotonic() - started < 2.0


def test_two_clients_at_once_are_served_one_at_a_time(fake: FakeOllama) -> None:
    fake.request_latency = 0.15

    def post(text: str) -> int:
        with new_client(fake) as client:
            return embed(client, input=text).status_code

    started = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        statuses = list(pool.map(post, ["a", "b"]))
    assert statuses == [200, 200]
    assert time.monotonic() - started >= 0.3
    assert fake.max_concurrent == 2


def test_sequential_requests_show_max_concurrent_one(
    fake: FakeOllama, client: httpx.Client
) -> None:
    for text in ("a", "b", "c"):
        embed(client, input=text)
    assert (fake.max_concurrent, fake.in_flight) == (1, 0)


# --- faults ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (404, f'model "{MODEL}" not found, try pulling it first'),
        (429, "too many requests"),
        (500, "llama runner process has terminated: exit status 2"),
        (501, NO_EMBEDDINGS),
        (502, "bad gateway"),
        (503, BUSY),
        (504, "gateway timeout"),
    ],
)
def test_fail_next_answers_ollamas_text_then_recovers(
    fake: FakeOllama, client: httpx.Client, status: int, error: str
) -> None:
    fake.fail_next(2, status)
    answers = [embed(client, input="x") for _ in range(3)]
    assert [(r.status_code, r.json().get("error")) for r in answers[:2]] == [(status, error)] * 2
    assert answers[2].status_code == 200
    assert (fake.requests, fake.texts) == (3, ["x"])


def test_fail_next_with_a_400_and_a_custom_error(fake: FakeOllama, client: httpx.Client) -> None:
    fake.fail_next(1, 400)
    assert embed(client, input="x").json()["error"]
    fake.fail_next(1, 500, "CUDA error: out of memory")
    assert embed(client, input="x").json() == {"error": "CUDA error: out of memory"}


def test_hang_next_makes_the_client_time_out_then_serving_resumes(
    fake: FakeOllama, client: httpx.Client
) -> None:
    fake.hang_next(1, 5.0)
    with pytest.raises(httpx.ReadTimeout):
        client.post("/api/embed", json={"model": MODEL, "input": "x"}, timeout=0.2)
    assert embed(client, input="y").json()["embeddings"] == [vector_for("y")]


def test_drop_next_closes_the_connection_without_a_response(
    fake: FakeOllama, client: httpx.Client
) -> None:
    fake.drop_next(1)
    with pytest.raises(httpx.RemoteProtocolError):
        embed(client, input="x")
    assert embed(client, input="y").status_code == 200
    assert fake.texts == ["y"]


def test_corrupt_dimensions_sends_vectors_of_the_wrong_length(
    fake: FakeOllama, client: httpx.Client
) -> None:
    fake.corrupt_next(1, "dimensions")
    assert [len(v) for v in embed(client, input=["a", "b"]).json()["embeddings"]] == [769, 769]


def test_corrupt_nan_sends_the_json_token_nan(fake: FakeOllama, client: httpx.Client) -> None:
    fake.corrupt_next(1, "nan")
    response = embed(client, input=["a"])
    assert response.status_code == 200
    assert "NaN" in response.text
    assert math.isnan(response.json()["embeddings"][0][0])


def test_corrupt_count_sends_one_vector_fewer(fake: FakeOllama, client: httpx.Client) -> None:
    fake.corrupt_next(1, "count")
    assert len(embed(client, input=["a", "b", "c"]).json()["embeddings"]) == 2
    assert len(embed(client, input=["a", "b", "c"]).json()["embeddings"]) == 3


def test_corrupt_empty_sends_no_embeddings(fake: FakeOllama, client: httpx.Client) -> None:
    fake.corrupt_next(1, "empty")
    assert embed(client, input=["a", "b"]).json()["embeddings"] == []


def test_a_proxy_page_is_a_200_html_answer_that_never_reaches_the_model(
    fake: FakeOllama, client: httpx.Client
) -> None:
    fake.proxy_page_next(1)
    response = embed(client, input=["a", "b"])
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html"
    assert response.text.startswith("<!DOCTYPE html>")
    assert fake.inputs == 0
    assert embed(client, input=["a"]).json()["embeddings"] == [vector_for("a")]


def test_fault_arguments_are_checked(fake: FakeOllama) -> None:
    with pytest.raises(ValueError, match="kind"):
        fake.corrupt_next(1, "garbled")
    with pytest.raises(ValueError, match="status"):
        fake.fail_next(1, 200)
    with pytest.raises(ValueError, match="count"):
        fake.drop_next(-1)


# --- stats, reset, down/up -------------------------------------------------------------------


def test_stats_record_texts_inputs_and_batch_sizes(fake: FakeOllama, client: httpx.Client) -> None:
    embed(client, input=["a", "b", "c"])
    embed(client, input="d")
    assert (fake.requests, fake.inputs, fake.batch_sizes) == (2, 4, [3, 1])
    assert fake.texts == ["a", "b", "c", "d"]


def test_stats_count_the_models_time_and_its_idle_gaps_between_requests(
    fake: FakeOllama, client: httpx.Client
) -> None:
    fake.request_latency, fake.input_latency = 0.02, 0.01
    embed(client, input=["a", "b"])
    threading.Event().wait(0.05)  # the client's own pause: the model sits idle through it
    embed(client, input="c")
    # Two more at once: the second queues for the slot and starts the moment it is let go.
    fake.request_latency = 0.5
    both = [threading.Thread(target=embed, args=(client,), kwargs={"input": t}) for t in "de"]
    for arrived, thread in enumerate(both, start=1):
        thread.start()
        # Within the first one's 0.5 s in the slot, or the second would not have queued.
        wait_until(lambda n=arrived: fake.in_flight == n, 0.4, f"{arrived} requests in flight")
    for thread in both:
        thread.join(10)
    assert fake.model_seconds == pytest.approx(0.04 + 0.03 + 0.51 + 0.51, abs=1e-6)
    gaps = fake.idle_gaps
    assert len(gaps) == 3
    assert gaps[0] >= 0.05
    assert gaps[2] == 0.0
    assert client.get("/_fake/stats").json()["idle_gaps"] == gaps
    assert len(fake.late_answers) == 4
    assert all(late >= 0 for late in fake.late_answers)
    fake.reset()
    assert (fake.model_seconds, fake.idle_gaps, fake.late_answers) == (0.0, [], [])


def test_reset_clears_stats_and_faults_but_keeps_knobs(
    fake: FakeOllama, client: httpx.Client
) -> None:
    fake.dimensions = 32
    embed(client, input="a")
    fake.fail_next(1, 500)
    fake.reset()
    assert (fake.requests, fake.inputs, fake.texts, fake.batch_sizes) == (0, 0, [], [])
    assert fake.max_concurrent == 0
    assert embed(client, input="b").json()["embeddings"] == [vector_for("b", 32)]


def test_down_refuses_connections_and_up_serves_on_the_same_port(
    fake: FakeOllama, client: httpx.Client
) -> None:
    url = fake.url
    embed(client, input="before")
    fake.down()
    with pytest.raises(httpx.ConnectError):
        client.get("/")
    fake.up()
    assert fake.url == url
    assert embed(client, input="after").status_code == 200
    assert fake.texts == ["before", "after"]


# --- control API -----------------------------------------------------------------------------


def test_control_stats_and_reset(client: httpx.Client) -> None:
    embed(client, input=["a", "b"])
    stats = client.get("/_fake/stats").json()
    assert (stats["requests"], stats["texts"], stats["batch_sizes"]) == (1, ["a", "b"], [2])
    assert client.post("/_fake/reset").json()["requests"] == 0
    assert client.get("/_fake/stats").json()["texts"] == []


def test_control_config_changes_knobs(fake: FakeOllama, client: httpx.Client) -> None:
    config = {"dimensions": 16, "models": ["all-minilm:latest"], "input_latency": 0.001}
    assert client.post("/_fake/config", json=config).json()["models"] == ["all-minilm"]
    assert (fake.dimensions, fake.input_latency) == (16, 0.001)
    assert embed(client, model="all-minilm", input="x").json()["embeddings"] == [
        vector_for("x", 16, "all-minilm")
    ]
    assert embed(client, input="x").status_code == 404


@pytest.mark.parametrize(
    "config", [{"dimensions": "768"}, {"dimensions": 0}, {"request_latency": -1}, {"colour": 1}]
)
def test_control_config_rejects_bad_values(client: httpx.Client, config: dict[str, Any]) -> None:
    assert client.post("/_fake/config", json=config).status_code == 400
    assert client.get("/_fake/config").json()["dimensions"] == 768


def test_control_faults_are_injected_over_http(fake: FakeOllama, client: httpx.Client) -> None:
    faults = [
        {"kind": "fail", "count": 1, "status": 500},
        {"kind": "corrupt", "count": 1, "corruption": "empty"},
        {"kind": "drop", "count": 1},
        {"kind": "html", "count": 1},
    ]
    for fault in faults:
        assert client.post("/_fake/faults", json=fault).status_code == 200
    assert client.get("/_fake/stats").json()["pending_faults"] == 4
    assert embed(client, input="x").status_code == 500
    assert embed(client, input="x").json()["embeddings"] == []
    with pytest.raises(httpx.RemoteProtocolError):
        embed(client, input="x")
    assert embed(client, input="x").headers["content-type"] == "text/html"
    assert client.post("/_fake/faults", json={"kind": "melt"}).status_code == 400


# --- command line ----------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_command_line_serves_until_terminated() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "devstack.fake_ollama", "--port", "0", "--dimensions", "8"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("Fake Ollama listening on http://127.0.0.1:")
        assert line.endswith("(vectors are not semantic)")
        with httpx.Client(base_url=line.split()[4], verify=PLAIN_HTTP) as client:
            assert client.get("/").text == "Ollama is running"
            body = embed(client, input="x").json()
        assert body["embeddings"] == [vector_for("x", 8)]
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0


def test_handler_threads_end_when_the_fake_stops() -> None:
    before = threading.active_count()
    with FakeOllama() as server, new_client(server) as client:
        server.hang_next(1, 30.0)
        with pytest.raises(httpx.ReadTimeout):
            client.post("/api/embed", json={"model": MODEL, "input": "x"}, timeout=0.1)
    deadline = time.monotonic() + 2
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before


def test_a_gate_holds_matching_requests_until_released(
    fake: FakeOllama, client: httpx.Client
) -> None:
    gate = fake.hold(match="HOLD ME")
    answers: list[int] = []

    def post_held() -> None:
        with new_client(fake) as own:
            body = {"model": MODEL, "input": ["HOLD ME"]}
            answers.append(own.post("/api/embed", json=body).status_code)

    held = threading.Thread(target=post_held)
    held.start()
    gate.wait_held()

    # Other requests pass while one waits at the gate; the held one has no answer yet.
    other = client.post("/api/embed", json={"model": MODEL, "input": ["go ahead"]})
    assert other.status_code == 200
    assert answers == []
    assert fake.in_flight == 1

    gate.release()
    held.join(10)
    assert answers == [200]
    assert fake.texts == ["go ahead", "HOLD ME"]


def test_a_released_request_takes_the_whole_model_time_after_its_release(
    fake: FakeOllama,
) -> None:
    """The model's time runs from a request's arrival, but a gate is no model: a request held
    at one gets its full time once released, as a test holding it expects."""
    fake.request_latency = 0.2
    gate = fake.hold()
    answered: list[float] = []

    def post_held() -> None:
        with new_client(fake) as own:
            embed(own, input="held")
            answered.append(time.monotonic())

    held = threading.Thread(target=post_held)
    held.start()
    gate.wait_held()
    released = time.monotonic()
    gate.release()
    held.join(10)
    assert answered
    assert answered[0] - released >= 0.2


def test_waiting_for_a_gate_that_nothing_reaches_times_out(fake: FakeOllama) -> None:
    gate = fake.hold()
    with pytest.raises(TimeoutError):
        gate.wait_held(timeout=0.05)
