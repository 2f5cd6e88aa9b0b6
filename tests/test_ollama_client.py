"""The Ollama client over loopback HTTP to the fake: vectors, and what each failure decides."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import closing

import pytest

from devstack.fake_ollama import FakeOllama, vector_for
from tasks.ollama import OllamaClient, Turns
from tasks.provider import ready
from tasks.retry import (
    BadEmbedding,
    DimensionMismatch,
    MalformedAnswer,
    ModelCannotEmbed,
    ModelNotFound,
    OllamaRejected,
    OllamaUnavailable,
    PermanentError,
    TransientError,
)
from tests.waiting import wait_until

MODEL = "nomic-embed-text"


@pytest.fixture
def client(ollama: FakeOllama) -> Iterator[OllamaClient]:
    ollama_client = OllamaClient(ollama.url, timeout=0.5)
    try:
        yield ollama_client
    finally:
        ollama_client.close()


def embed(client: OllamaClient, *texts: str) -> list[list[float]]:
    return client.embed(list(texts), model=MODEL, dimensions=768)


def test_a_batch_comes_back_one_vector_per_text_in_order(
    client: OllamaClient, ollama: FakeOllama
) -> None:
    texts = ["Review pull requests", "Plan a sprint", "Überprüfe Verträge 📄"]

    vectors = embed(client, *texts)

    assert vectors == [pytest.approx(vector_for(text)) for text in texts]
    assert (ollama.requests, ollama.batch_sizes) == (1, [3])


def test_on_sent_is_called_once_the_request_is_out_and_before_its_answer(
    ollama: FakeOllama,
) -> None:
    ollama_client = OllamaClient(ollama.url, timeout=10)
    gate = ollama.hold()
    out = threading.Event()
    answers: list[list[list[float]]] = []

    def send() -> None:
        answer = ollama_client.send(["a", "b"], model=MODEL, dimensions=768, on_sent=out.set)
        answers.append(answer.vectors())

    sender = threading.Thread(target=send)
    sender.start()
    try:
        gate.wait_held(timeout=10)  # the fake has the whole request and holds its answer
        assert out.wait(10), "on_sent was not called while the answer was held"
        assert not answers
    finally:
        gate.release()
        sender.join(10)
        ollama_client.close()
    assert answers == [[pytest.approx(vector_for("a")), pytest.approx(vector_for("b"))]]


def test_no_texts_make_no_request(client: OllamaClient, ollama: FakeOllama) -> None:
    assert embed(client) == []
    assert ollama.requests == 0


def test_a_model_that_is_not_pulled_says_how_to_pull_it(
    client: OllamaClient, ollama: FakeOllama
) -> None:
    ollama.models = set()

    with pytest.raises(ModelNotFound, match="run `ollama pull nomic-embed-text` there"):
        embed(client, "x")


def test_a_model_that_cannot_embed_is_permanent(client: OllamaClient, ollama: FakeOllama) -> None:
    ollama.embedding_capable = False

    with pytest.raises(ModelCannotEmbed, match="set OLLAMA_MODEL"):
        embed(client, "x")


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_busy_and_server_errors_are_transient(
    client: OllamaClient, ollama: FakeOllama, status: int
) -> None:
    ollama.fail_next(1, status)

    with pytest.raises(TransientError, match=str(status)):
        embed(client, "x")
    assert embed(client, "x") == [pytest.approx(vector_for("x"))]


def test_a_rejected_input_is_permanent(client: OllamaClient, ollama: FakeOllama) -> None:
    ollama.fail_next(1, 400, "the input length exceeds the context length")

    with pytest.raises(OllamaRejected, match="exceeds the context length"):
        embed(client, "x")


def test_an_ollama_that_is_down_is_transient_and_says_where(
    client: OllamaClient, ollama: FakeOllama
) -> None:
    ollama.down()

    with pytest.raises(OllamaUnavailable, match=f"cannot reach Ollama at {ollama.url}"):
        embed(client, "x")


def test_a_hung_ollama_times_out_as_transient(client: OllamaClient, ollama: FakeOllama) -> None:
    ollama.hang_next(1, 3.0)

    with pytest.raises(OllamaUnavailable, match="did not answer /api/embed in time"):
        embed(client, "x")


def test_a_dropped_connection_is_transient(client: OllamaClient, ollama: FakeOllama) -> None:
    ollama.drop_next(1)

    with pytest.raises(OllamaUnavailable):
        embed(client, "x")


@pytest.mark.parametrize(
    ("corruption", "message"),
    [
        ("dimensions", "vector of 769 dimensions where 768 are configured"),
        ("nan", "NaN or Inf"),
    ],
)
def test_an_answer_we_would_not_write_is_a_bad_embedding(
    client: OllamaClient, ollama: FakeOllama, corruption: str, message: str
) -> None:
    ollama.corrupt_next(1, corruption)

    with pytest.raises(BadEmbedding, match=message) as caught:
        embed(client, "a", "b")
    assert isinstance(caught.value, PermanentError)


@pytest.mark.parametrize(
    ("corruption", "message"),
    [
        ("count", "returned 1 vectors for 2 inputs"),
        ("empty", "returned 0 vectors for 2 inputs"),
        ("html", "answered 200 with text/html, not JSON .*a proxy in front of Ollama"),
    ],
)
def test_a_malformed_answer_is_transient(
    client: OllamaClient, ollama: FakeOllama, corruption: str, message: str
) -> None:
    if corruption == "html":
        ollama.proxy_page_next(1)
    else:
        ollama.corrupt_next(1, corruption)

    with pytest.raises(MalformedAnswer, match=message) as caught:
        embed(client, "a", "b")
    assert isinstance(caught.value, TransientError)
    assert "\n" not in str(caught.value)


def test_a_path_that_is_not_ollama_is_refused_permanently(ollama: FakeOllama) -> None:
    client = OllamaClient(f"{ollama.url}/not-ollama", timeout=0.5)
    with closing(client), pytest.raises(OllamaRejected, match="has no /api/embed"):
        embed(client, "x")


# --- preflight (tasks.provider.ready through the client) --------------------------------


def test_preflight_reports_the_models_size_and_context(client: OllamaClient) -> None:
    info = client.describe(MODEL)

    assert (info.embedding_length, info.context_length, info.can_embed) == (768, 2048, True)
    assert ready(client, MODEL, configured=768) == 768


def test_preflight_of_a_missing_model_says_how_to_pull_it(
    client: OllamaClient, ollama: FakeOllama
) -> None:
    ollama.models = {"llama3"}

    with pytest.raises(ModelNotFound, match="ollama pull nomic-embed-text"):
        ready(client, MODEL, configured=768)


def test_preflight_of_another_size_names_both(client: OllamaClient, ollama: FakeOllama) -> None:
    ollama.dimensions = 1024

    with pytest.raises(DimensionMismatch, match="makes 1024-dimension vectors but 768"):
        ready(client, MODEL, configured=768)


def test_preflight_of_a_model_that_cannot_embed(client: OllamaClient, ollama: FakeOllama) -> None:
    ollama.embedding_capable = False

    with pytest.raises(ModelCannotEmbed, match="not an embedding model"):
        ready(client, MODEL, configured=768)


def test_preflight_of_an_ollama_that_is_down(client: OllamaClient, ollama: FakeOllama) -> None:
    ollama.down()

    with pytest.raises(OllamaUnavailable, match="start it"):
        ready(client, MODEL, configured=768)


def test_a_job_from_the_app_goes_before_waiting_batches() -> None:
    turns = Turns()
    order: list[str] = []

    def take(name: str, urgent: bool) -> None:
        with turns.turn(urgent=urgent):
            order.append(name)

    with turns.turn(urgent=False):  # a batch is with Ollama
        batch = threading.Thread(target=take, args=("next batch", False))
        batch.start()
        wait_until(lambda: turns.waiting() == 1, what="the batch to wait")
        job = threading.Thread(target=take, args=("publish", True))
        job.start()
        wait_until(lambda: turns.waiting() == 2, what="the publish to wait")
    batch.join(5)
    job.join(5)

    assert order == ["publish", "next batch"]
