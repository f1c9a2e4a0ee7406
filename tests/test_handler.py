"""The Mixtral handler inside TorchServe's own worker machinery (Service, Context, wire protocol),
without the Java frontend: answers, batching, streaming, validation, metrics and settings."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from serving_utils import Body, Worker, make_model_dir

from gpt_fast_mixtral.generate import Engine, SamplingParams
from handler.request_schema import RequestError, fit_to_context, parse_request
from handler.settings import HandlerSettings, enable_fx_graph_cache, select_device

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_SEQ_LEN = 128  # make_model_dir's default


@pytest.fixture(scope="module")
def worker(tiny_converted_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Worker:
    """One worker for the module, as in production: every test also checks it survived the ones before."""
    return Worker(make_model_dir(tmp_path_factory.mktemp("model"), tiny_converted_dir))


@pytest.fixture(scope="module")
def engine(tiny_converted_dir: Path) -> Engine:
    """The engine alone, one request at a time: what each answer must match."""
    return Engine.from_checkpoint(tiny_converted_dir / "model.pth", dtype=torch.float32,
                                  max_seq_len=MAX_SEQ_LEN)


def expected(engine: Engine, prompt: str, **settings: Any) -> str:
    return engine.generate([prompt], [SamplingParams(**{"max_new_tokens": 20, **settings})])[0].text


# ---------------------------------------------------------------------------------------------------
# Answers.


def test_request_json_is_answered_with_the_engines_text(worker: Worker, engine: Engine) -> None:
    body = (REPO_ROOT / "request.json").read_bytes()
    # `curl -T request.json` sends no content type: the handler gets the raw bytes.
    [response], streamed = worker.predict(body, content_type="")
    assert response.status == 200
    assert response.content_type.startswith("text/plain")
    assert response.text == expected(engine, "The capital of France", max_new_tokens=50)
    assert response.text and not streamed


def test_json_sent_as_text_plain_is_accepted(worker: Worker, engine: Engine) -> None:
    [response], _ = worker.predict({"prompt": "def main", "max_new_tokens": 5}, content_type="text/plain")
    assert response.status == 200
    assert response.text == expected(engine, "def main", max_new_tokens=5)


def test_each_request_of_a_batch_gets_its_own_answer(worker: Worker, engine: Engine) -> None:
    requests = [
        {"prompt": "The capital of France", "max_new_tokens": 12},
        {"prompt": "import os", "max_new_tokens": 3},
        {"prompt": "class Point:", "temperature": 0.8, "top_k": 50, "top_p": 0.9, "seed": 7},
        {"prompt": "Return the value", "temperature": 1.2, "seed": 123, "max_new_tokens": 16},
    ]
    responses, _ = worker.predict(*requests)
    assert [r.request_id for r in responses] == ["req-0", "req-1", "req-2", "req-3"]
    for request, response in zip(requests, responses, strict=True):
        settings = {key: value for key, value in request.items() if key != "prompt"}
        assert response.status == 200
        assert response.text == expected(engine, request["prompt"], **settings), request


@pytest.mark.parametrize("top_k", [0, -1])
def test_top_k_zero_or_minus_one_means_no_limit(worker: Worker, top_k: int) -> None:
    """transformers' 0 and vLLM's -1: sampled from the whole vocabulary, as with a null top_k."""
    body = {"prompt": "class Point:", "temperature": 1.0, "seed": 5, "max_new_tokens": 16}
    unlimited = worker.answer({**body, "top_k": None})
    assert worker.answer({**body, "top_k": top_k}) == unlimited != worker.answer({**body, "top_k": 1})


def test_a_stop_string_ends_the_answer_before_it(worker: Worker, engine: Engine) -> None:
    full = expected(engine, "The capital of France", max_new_tokens=30)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    answer = worker.answer({"prompt": "The capital of France", "max_new_tokens": 30, "stop": [stop]})
    assert answer == full[:full.index(stop)]


def test_a_default_max_new_tokens_shrinks_to_the_room_left_in_the_context(
        worker: Worker, engine: Engine) -> None:
    prompt = "The capital"
    while len(engine.encode(prompt + " of France")) < MAX_SEQ_LEN - 10:
        prompt += " of France"
    room = MAX_SEQ_LEN - len(engine.encode(prompt))
    assert 0 < room < 20  # the YAML default of 20 would not fit
    assert worker.answer({"prompt": prompt}) == expected(engine, prompt, max_new_tokens=room)


# ---------------------------------------------------------------------------------------------------
# Streaming.


def test_streamed_pieces_join_to_the_plain_answer(worker: Worker) -> None:
    body = {"prompt": "The capital of France", "max_new_tokens": 30}
    plain = worker.answer(body)
    [final], streamed = worker.predict({**body, "stream": True})
    assert len(streamed) > 1
    assert all(len(message) == 1 and message[0].stream_next for message in streamed)
    assert final.status == 200 and final.headers.get("ts_stream_next") == "false"
    assert "".join(message[0].text for message in streamed) + final.text == plain


def test_only_the_streaming_requests_of_a_batch_are_streamed(worker: Worker) -> None:
    plain = {"prompt": "import sys", "max_new_tokens": 10}
    (first, second), streamed = worker.predict(plain, {**plain, "stream": True})
    assert {message[0].request_id for message in streamed} == {"req-1"}
    assert "ts_stream_next" not in first.headers
    assert first.text == "".join(message[0].text for message in streamed) + second.text


def test_stream_defaults_to_the_yaml_setting(tiny_converted_dir: Path, tmp_path: Path) -> None:
    streaming = Worker(make_model_dir(tmp_path, tiny_converted_dir, stream=True))
    _, streamed = streaming.predict({"prompt": "import sys", "max_new_tokens": 10})
    assert len(streamed) > 1
    _, streamed = streaming.predict({"prompt": "import sys", "max_new_tokens": 10, "stream": False})
    assert streamed == []


# ---------------------------------------------------------------------------------------------------
# Validation: every bad body is a 400 naming its field, alone, and the worker carries on.

LONG_PROMPT = "word " * 400  # far past the 128-token context
BAD_BODIES: list[tuple[str, Body, str | None, str]] = [
    # (case, body, field named in the answer, words the message must contain)
    ("not JSON", b"The capital of France", None, "not valid JSON"),
    ("not UTF-8", b"\xff\xfe{", None, "UTF-8"),
    ("empty body", b"", None, "empty"),
    ("JSON array", ["The capital of France"], None, "JSON object"),
    ("no prompt", {"max_new_tokens": 5}, "prompt", "required"),
    ("empty prompt", {"prompt": ""}, "prompt", "empty"),
    ("prompt not a string", {"prompt": 42}, "prompt", "string"),
    ("negative max_new_tokens", {"prompt": "x", "max_new_tokens": -1}, "max_new_tokens", "integer"),
    ("zero max_new_tokens", {"prompt": "x", "max_new_tokens": 0}, "max_new_tokens", "integer"),
    ("huge max_new_tokens", {"prompt": "x", "max_new_tokens": 10**9}, "max_new_tokens", "integer"),
    ("fractional max_new_tokens", {"prompt": "x", "max_new_tokens": 2.5}, "max_new_tokens", "integer"),
    ("boolean max_new_tokens", {"prompt": "x", "max_new_tokens": True}, "max_new_tokens", "integer"),
    ("negative temperature", {"prompt": "x", "temperature": -0.5}, "temperature", ">= 0"),
    ("temperature not a number", {"prompt": "x", "temperature": "hot"}, "temperature", "number"),
    ("top_p above 1", {"prompt": "x", "top_p": 1.5}, "top_p", "(0, 1]"),
    ("top_p zero", {"prompt": "x", "top_p": 0}, "top_p", "(0, 1]"),
    ("top_k below -1", {"prompt": "x", "top_k": -2}, "top_k", "integer >= 1, or 0 or -1 for no limit, got -2"),
    ("negative seed", {"prompt": "x", "seed": -1}, "seed", f"integer from 0 to {2**63 - 1}, got -1"),
    ("seed of 2**63", {"prompt": "x", "seed": 2**63}, "seed", f"integer from 0 to {2**63 - 1}, got {2**63}"),
    ("seed of 1e19", {"prompt": "x", "seed": 1e19}, "seed", f"integer from 0 to {2**63 - 1}"),
    ("stop not a list", {"prompt": "x", "stop": "###"}, "stop", "array"),
    ("empty stop string", {"prompt": "x", "stop": [""]}, "stop", "non-empty"),
    ("stream not a boolean", {"prompt": "x", "stream": "yes"}, "stream", "true or false"),
    ("unknown field", {"prompt": "x", "n": 2}, "n", "unknown field"),
    # A near miss, or another server's name for one of ours, gets the name to send instead.
    ("OpenAI's max_tokens", {"prompt": "x", "max_tokens": 5}, "max_tokens", 'did you mean "max_new_tokens"?'),
    ("misspelt field", {"prompt": "x", "temprature": 0.5}, "temprature", 'did you mean "temperature"?'),
    ("field in capitals", {"Prompt": "x"}, "Prompt", 'did you mean "prompt"?'),
    ("TGI's inputs", {"inputs": "x", "parameters": {"max_new_tokens": 5}}, "inputs", 'did you mean "prompt"?'),
    ("TGI's parameters", {"prompt": "x", "parameters": {"max_new_tokens": 5}}, "parameters", "at the top level"),
    ("lone surrogate in the prompt", b'{"prompt": "a\\ud800b"}', "prompt", "lone surrogate"),
    ("lone surrogate in a stop string", b'{"prompt": "a", "stop": ["\\udc00"]}', "stop", "lone surrogate"),
    # TorchServe parses an application/json body itself: what reaches the handler is the JSON value.
    ("JSON null", b"null", None, "not a JSON null"),
    ("JSON number", b"42", None, "not a JSON number"),
    ("JSON string", b'"The capital of France"', None, "not a JSON string"),
    ("JSON object encoded again as a JSON string", json.dumps(json.dumps({"prompt": "x"})).encode(), None,
     "not a JSON string"),
    # Python refuses to read integers of more than 4300 digits, and floats stop at about 1.8e308.
    ("integer too long to read", b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "seed", "5000 digits"),
    ("top_k too long to read", b'{"prompt": "x", "top_k": ' + b"9" * 5000 + b"}", "top_k", "at most 4300 digits"),
    ("temperature too large for a float", b'{"prompt": "x", "temperature": 1' + b"0" * 400 + b"}",
     "temperature", "finite number"),
    ("top_p too large for a float", b'{"prompt": "x", "top_p": 1' + b"0" * 400 + b"}", "top_p",
     "finite number"),
    ("body nested too deeply", b'{"prompt": "x", "stop": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None,
     "nested too deeply"),
    ("prompt past the context", {"prompt": LONG_PROMPT}, "prompt", "shorten the prompt"),
    ("prompt + max_new_tokens past the context", {"prompt": "word " * 60, "max_new_tokens": 100},
     "max_new_tokens", "exceed the context"),
]


@pytest.mark.parametrize(("body", "field", "words"), [case[1:] for case in BAD_BODIES],
                         ids=[case[0] for case in BAD_BODIES])
def test_a_bad_request_gets_400_naming_its_field_and_spares_its_batch(
        worker: Worker, body: Body, field: str | None, words: str) -> None:
    good = {"prompt": "The capital of France", "max_new_tokens": 8}
    alone = worker.answer(good)
    (before, bad, after), _ = worker.predict(good, body, good)
    assert bad.status == 400
    assert bad.content_type == "application/json"
    error = json.loads(bad.text)
    assert error["code"] == 400 and error["field"] == field
    assert words in error["message"]
    if field is not None:
        assert field in error["message"]
    # Its neighbours in the batch, and the next request, are served as if nothing happened.
    assert before.status == after.status == 200
    assert before.text == after.text == alone
    assert worker.answer(good) == alone


@pytest.mark.parametrize("name", ["n", "best_of", "logprobs", "x" * 100, "ab"])
def test_an_unknown_field_unlike_any_of_ours_gets_no_guess(name: str) -> None:
    with pytest.raises(RequestError) as raised:
        parse_request({"prompt": "x", name: 1}, default_max_new_tokens=8, default_stream=False, max_seq_len=64)
    assert raised.value.field == name
    assert "did you mean" not in raised.value.message and "allowed fields are prompt" in raised.value.message


@pytest.mark.parametrize(("body", "field"), [
    ({"prompt": "x", "k" * 100_000: 1}, "k" * 100_000),
    ({"prompt": "x", "temperature": "hot" * 100_000}, "temperature"),
    ({"prompt": "x", "stop": ["###" * 100_000]}, "stop"),
    ({"prompt": "x", "stop": [["###"] * 100_000]}, "stop"),
    (b'{"prompt": "x", "max_new_tokens": ' + b"9" * 4000 + b"}", "max_new_tokens"),
], ids=["long unknown field", "long string for a number", "long stop string", "long non-string stop",
        "4000-digit max_new_tokens"])
def test_an_error_message_quotes_a_huge_value_only_in_part(worker: Worker, body: Body, field: str,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    # The message goes to the client and into the worker's log: it must not carry megabytes back.
    caplog.set_level(logging.INFO)
    [response], _ = worker.predict(body)
    assert response.status == 400
    error = json.loads(response.text)
    assert error["field"] == field
    assert len(error["message"]) < 400, error["message"][:400]
    assert all(len(record.getMessage()) < 1000 for record in caplog.records)


def test_every_shape_of_body_torchserve_passes_is_read(worker: Worker) -> None:
    """Bytes, bytearray (what TorchServe's worker reads off its socket), str and an already-parsed object,
    under `body` or `data` (multipart forms, the KServe wrappers), with or without part headers."""
    from ts.context import RequestProcessor

    good = {"prompt": "The capital of France", "max_new_tokens": 5}
    alone = worker.answer(good)
    text = json.dumps(good)
    rows: list[Any] = [{"body": text.encode()}, {"data": bytearray(text.encode())}, {"data": dict(good)},
                       {"body": text}, {"body": None}, {"file": b"{}"}]
    context = worker.service.context
    context.request_ids = {index: f"direct-{index}" for index in range(len(rows))}
    context.request_processor = [RequestProcessor({}) for _ in rows]
    context.metrics.request_ids = context.request_ids
    answers = worker.handler.handle(rows, context)  # four valid rows: the engine's batch size
    assert [context.get_response_status(index)[0] for index in range(len(rows))] == [200] * 4 + [400] * 2
    assert answers[:4] == [alone] * 4
    assert "not a JSON null" in json.loads(answers[4])["message"]
    assert "no request body arrived" in json.loads(answers[5])["message"]


def test_a_form_field_beside_the_body_gets_400_rather_than_being_ignored(worker: Worker) -> None:
    """TorchServe hands the handler the fields of a multipart form as parts beside the body."""
    from ts.context import RequestProcessor

    good = {"prompt": "The capital of France", "max_new_tokens": 5}
    alone = worker.answer(good)
    rows: list[Any] = [{"data": dict(good), "stream": b"true"}, {"data": b"", "prompt": b"Hi"},
                       {"data": json.dumps(good).encode(), "max_new_tokens": "3"}, {"body": dict(good)},
                       {"file": b"{}"}]
    context = worker.service.context
    context.request_ids = {index: f"direct-{index}" for index in range(len(rows))}
    context.request_processor = [RequestProcessor({}) for _ in rows]
    context.metrics.request_ids = context.request_ids
    answers = worker.handler.handle(rows, context)
    assert [context.get_response_status(index)[0] for index in range(len(rows))] == [400, 400, 400, 200, 400]
    for answer, field in zip(answers[:3], ["stream", "prompt", "max_new_tokens"], strict=True):
        error = json.loads(answer)
        assert error["field"] == field
        assert field in error["message"] and "JSON body" in error["message"]
    assert answers[3] == alone
    error = json.loads(answers[4])
    assert "no request body arrived (only the form fields 'file')" in error["message"]
    assert "form field named data" in error["message"]


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", ""])
def test_a_utf8_byte_order_mark_before_the_json_is_skipped(worker: Worker, content_type: str) -> None:
    # Windows tools (PowerShell 5's Set-Content -Encoding UTF8, Notepad) start UTF-8 files with one; RFC 8259
    # lets a parser ignore it, and `curl -T request.json` sends the file as it is.
    good = {"prompt": "The capital of France", "max_new_tokens": 5}
    [response], _ = worker.predict("\ufeff".encode() + json.dumps(good).encode(), content_type=content_type)
    assert response.status == 200, response.text
    assert response.text == worker.answer(good)


def test_a_body_that_is_not_a_json_object_under_a_json_content_type_is_a_400(worker: Worker) -> None:
    # TorchServe parses application/json itself and passes the bytes on when that fails.
    [response], _ = worker.predict(b'{"prompt": "x",', content_type="application/json")
    assert response.status == 400
    assert "not valid JSON" in json.loads(response.text)["message"]


def test_an_unexpected_error_fails_only_its_own_request(worker: Worker, monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    assert worker.handler.engine is not None
    encode = worker.handler.engine.encode

    def encode_or_fail(prompt: str) -> list[int]:
        if prompt == "boom":
            raise RuntimeError("a bug")
        return encode(prompt)

    monkeypatch.setattr(worker.handler.engine, "encode", encode_or_fail)
    good = {"prompt": "The capital of France", "max_new_tokens": 8}
    (before, bad, after), _ = worker.predict(good, {"prompt": "boom"}, good)
    assert bad.status == 500 and "could not be prepared" in json.loads(bad.text)["message"]
    assert before.status == after.status == 200 and before.text == after.text


def test_a_failed_generate_fails_its_batch_but_not_the_worker(worker: Worker, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    assert worker.handler.engine is not None
    good = {"prompt": "The capital of France", "max_new_tokens": 8}
    alone = worker.answer(good)
    with monkeypatch.context() as patch:
        patch.setattr(worker.handler.engine, "generate", lambda *args, **kwargs: 1 / 0)
        responses, _ = worker.predict(good, good)
    assert [r.status for r in responses] == [500, 500]
    assert json.loads(responses[0].text)["message"] == "generation failed: ZeroDivisionError"
    assert worker.answer(good) == alone


def test_a_stream_that_fails_midway_ends_with_the_error(worker: Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its 200 went out with the first chunk; the last chunk is the error body, saying the text is cut short.
    assert worker.handler.engine is not None

    def stream_then_fail(prompts: list[list[int]], params: Any, on_text: Any = None, **kwargs: Any) -> Any:
        on_text(0, "Paris")
        on_text(0, " is")
        raise RuntimeError("device lost")

    streaming = {"prompt": "The capital of France", "max_new_tokens": 8, "stream": True}
    with monkeypatch.context() as patch:
        patch.setattr(worker.handler.engine, "generate", stream_then_fail)
        [response], streamed = worker.predict(streaming)
    assert "".join(m.text for [m] in streamed) == "Paris is"
    assert response.status == 500 and response.content_type == "application/json"
    assert json.loads(response.text) == {
        "code": 500, "type": "InternalServerError",
        "message": "generation failed: RuntimeError after 8 characters were streamed (that text is incomplete)"}
    # A request that had streamed nothing says nothing of the kind.
    with monkeypatch.context() as patch:
        patch.setattr(worker.handler.engine, "generate", lambda *args, **kwargs: 1 / 0)
        [response], streamed = worker.predict(streaming)
    assert streamed == [] and json.loads(response.text)["message"] == "generation failed: ZeroDivisionError"


def _generate_out_of_memory_with(worker: Worker, patch: pytest.MonkeyPatch, fits: Any) -> list[int]:
    """Make the engine raise torch.OutOfMemoryError for every batch `fits(prompts)` refuses; returns the
    sizes of the batches it was called with."""
    assert worker.handler.engine is not None
    generate, calls = worker.handler.engine.generate, []

    def generate_or_run_out(prompts: list[list[int]], *args: Any, **kwargs: Any) -> Any:
        calls.append(len(prompts))
        if not fits(prompts):
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return generate(prompts, *args, **kwargs)

    patch.setattr(worker.handler.engine, "generate", generate_or_run_out)
    return calls


def test_a_batch_out_of_gpu_memory_runs_its_requests_one_at_a_time(worker: Worker, engine: Engine,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    first = {"prompt": "The capital of France", "max_new_tokens": 8}
    second = {"prompt": "Once upon a time", "max_new_tokens": 6, "stream": True}
    third = {"prompt": "Hello", "max_new_tokens": 5}
    with monkeypatch.context() as patch:
        calls = _generate_out_of_memory_with(worker, patch, lambda prompts: len(prompts) == 1)
        responses, streamed = worker.predict(first, second, third)
    assert calls == [3, 1, 1, 1]
    assert [r.status for r in responses] == [200, 200, 200]
    assert responses[0].text == expected(engine, first["prompt"], max_new_tokens=8)
    assert "".join(m.text for [m] in streamed) + responses[1].text == expected(engine, second["prompt"],
                                                                               max_new_tokens=6)
    assert responses[2].text == expected(engine, third["prompt"], max_new_tokens=5)


def test_only_the_request_that_cannot_fit_gets_507(worker: Worker, engine: Engine,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    assert worker.handler.engine is not None
    huge = worker.handler.engine.encode("too long to fit")
    good = {"prompt": "The capital of France", "max_new_tokens": 8}
    with monkeypatch.context() as patch:
        calls = _generate_out_of_memory_with(worker, patch, lambda prompts: huge not in prompts)
        responses, _ = worker.predict(good, {"prompt": "too long to fit"}, good)
    assert calls == [3, 1, 1, 1]
    assert [r.status for r in responses] == [200, 507, 200]
    assert json.loads(responses[1].text) == {"code": 507, "type": "OutOfResources",
                                             "message": "generation failed: OutOfMemoryError"}
    assert responses[0].text == responses[2].text == expected(engine, good["prompt"], max_new_tokens=8)
    # A request alone that does not fit is not retried.
    with monkeypatch.context() as patch:
        calls = _generate_out_of_memory_with(worker, patch, lambda prompts: False)
        [alone], _ = worker.predict(good)
    assert calls == [1] and alone.status == 507


def test_other_errors_are_not_retried(worker: Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    assert worker.handler.engine is not None
    calls = []

    def fail(prompts: list[list[int]], *args: Any, **kwargs: Any) -> Any:
        calls.append(len(prompts))
        raise RuntimeError("not memory")

    good = {"prompt": "The capital of France", "max_new_tokens": 8}
    with monkeypatch.context() as patch:
        patch.setattr(worker.handler.engine, "generate", fail)
        responses, _ = worker.predict(good, good)
    assert calls == [2] and [r.status for r in responses] == [500, 500]


def test_the_schema_accepts_whole_floats_and_nulls() -> None:
    request = parse_request({"prompt": "x", "max_new_tokens": 5.0, "top_k": None, "top_p": 1, "seed": None},
                            default_max_new_tokens=20, default_stream=False, max_seq_len=64)
    assert request.params == SamplingParams(max_new_tokens=5, top_p=1.0)
    assert request.explicit_max_new_tokens and not request.stream


def test_an_explicit_max_new_tokens_is_never_shrunk() -> None:
    explicit = parse_request({"prompt": "x", "max_new_tokens": 10}, default_max_new_tokens=20,
                             default_stream=False, max_seq_len=64)
    with pytest.raises(RequestError, match="at most 4") as error:
        fit_to_context(explicit, prompt_tokens=60, max_seq_len=64)
    assert error.value.field == "max_new_tokens"
    default = parse_request({"prompt": "x"}, default_max_new_tokens=20, default_stream=True, max_seq_len=64)
    assert fit_to_context(default, prompt_tokens=60, max_seq_len=64).max_new_tokens == 4
    assert default.stream


# ---------------------------------------------------------------------------------------------------
# Metrics.


def test_each_answer_records_its_metrics(worker: Worker, engine: Engine, caplog: pytest.LogCaptureFixture
                                         ) -> None:
    caplog.set_level(logging.INFO)
    prompt = "The capital of France"
    worker.answer({"prompt": prompt, "max_new_tokens": 7})
    lines = [record.getMessage() for record in caplog.records if "[METRICS]" in record.getMessage()]

    def value(name: str) -> float:
        [line] = [line for line in lines if line.startswith(f"[METRICS]{name}.")]
        assert "ModelName:tiny" in line and "req-0" in line
        return float(line.split(":", 1)[1].split("|", 1)[0])

    assert value("PromptTokens") == len(engine.encode(prompt))
    assert value("GeneratedTokens") == 7
    assert value("TimeToFirstToken") > 0
    assert value("DecodeTokensPerSecond") > 0


# ---------------------------------------------------------------------------------------------------
# Loading and settings.


def test_an_int8_checkpoint_is_served(tiny_converted_dir: Path, tmp_path: Path) -> None:
    int8 = Worker(make_model_dir(tmp_path, tiny_converted_dir,
                                 converted_ckpt_dir="checkpoints/tiny/model_int8.pth"))
    assert int8.handler.engine is not None and int8.handler.engine.max_batch_size == 4
    assert len(int8.answer({"prompt": "The capital of France", "max_new_tokens": 10})) > 0


def test_loading_points_the_fx_graph_cache_at_the_model_directory(
        tiny_converted_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._inductor.config as inductor_config

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    # Inductor's config through its own patch (restored after the block): recent pytest restores a module
    # attribute missing from the module's __dict__ by deleting it, which hides an Inductor setting for good.
    with inductor_config.patch(fx_graph_cache=False):
        Worker(make_model_dir(tmp_path, tiny_converted_dir, fx_graph_cache=True,
                              fx_graph_cache_dir="cache/inductor"))
        assert inductor_config.fx_graph_cache is True
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")
    assert (tmp_path / "cache" / "inductor").is_dir()


@pytest.mark.slow
def test_the_fx_graph_cache_is_reused_by_the_next_process(tmp_path: Path) -> None:
    """What fx_graph_cache buys: a restarted worker finds the compiled graph on disk."""
    script = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from handler.settings import enable_fx_graph_cache\n"
        "enable_fx_graph_cache(True, Path(sys.argv[1]))\n"
        "torch.compile(lambda x: torch.sin(x) * 2 + 1)(torch.ones(8))\n"
        "from torch._dynamo.utils import counters\n"
        "print(dict(counters['inductor']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    env.pop("TORCHINDUCTOR_FX_GRAPH_CACHE", None)
    runs = [subprocess.run([sys.executable, "-c", script, str(tmp_path / "cache")], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300, check=True).stdout
            for _ in range(2)]
    assert "'fxgraph_cache_miss': 1" in runs[0]
    assert "'fxgraph_cache_hit': 1" in runs[1] and "fxgraph_cache_miss" not in runs[1]


@pytest.mark.parametrize(("section", "message"), [
    ({}, "converted_ckpt_dir"),
    ({"converted_ckpt_dir": "x.pth", "compile": "yes"}, "handler.compile must be a bool"),
    ({"converted_ckpt_dir": "x.pth", "max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
    ({"converted_ckpt_dir": "x.pth", "dtype": "int4"}, "handler.dtype must be one of"),
    ({"converted_ckpt_dir": "x.pth", "parallel_mode": "pp"}, r"handler.parallel_mode must be one of \['tp', 'ep'\]"),
    ({"converted_ckpt_dir": "x.pth", "all_reduce": "ring"},
     r"all_reduce must be one of \['push', 'one-shot', 'nccl'\]"),
])
def test_a_bad_handler_section_names_the_key(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HandlerSettings.from_yaml(section)


def test_unknown_handler_keys_are_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    settings = HandlerSettings.from_yaml({"converted_ckpt_dir": "x.pth", "profile": True})
    assert settings.converted_ckpt_dir == "x.pth"
    assert "handler.profile" in caplog.text


def test_a_missing_checkpoint_fails_the_load_with_its_path(tiny_converted_dir: Path, tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path, tiny_converted_dir, converted_ckpt_dir="checkpoints/none/model.pth")
    with pytest.raises(FileNotFoundError, match="checkpoints/none/model.pth"):
        Worker(model_dir)


def test_the_device_follows_device_type_gpu_id_and_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert select_device("cpu", 0) == torch.device("cpu")
    assert select_device("gpu", None) == torch.device("cpu")  # TorchServe assigned no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("gpu", 1) == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "3")  # under torchrun the rank picks among the worker's GPUs
    assert select_device("gpu", 1) == torch.device("cuda", 3)
    assert select_device("cpu", 1) == torch.device("cpu")


def test_enable_fx_graph_cache_can_turn_it_off(tmp_path: Path) -> None:
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fx_graph_cache=True):  # not monkeypatch: see the test above
        enable_fx_graph_cache(False, tmp_path / "unused")
        assert inductor_config.fx_graph_cache is False
    assert not (tmp_path / "unused").exists()
