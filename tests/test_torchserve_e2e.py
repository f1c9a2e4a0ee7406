"""End to end: a real TorchServe (Java frontend and Python worker) serving the tiny model from a model
directory built by scripts/build_archive.py with the real torch-model-archiver, on free local ports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from serving_utils import TorchServe

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_ARCHIVE = REPO_ROOT / "scripts" / "build_archive.py"
MAX_SEQ_LEN = 128
TIMEOUT = 120  # seconds, for any one HTTP request


def write_cpu_config(path: Path, **handler: Any) -> Path:
    config = {
        "minWorkers": 1, "maxWorkers": 1, "batchSize": 4,
        # Long enough that requests sent together are batched together even on a busy machine.
        "maxBatchDelay": 300, "responseTimeout": TIMEOUT, "deviceType": "cpu",
        "handler": {"converted_ckpt_dir": "checkpoints/tiny/model_int8.pth", "compile": False,
                    "fx_graph_cache": True, "max_new_tokens": 50, "max_seq_len": MAX_SEQ_LEN, **handler},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def build_archive(checkpoint_dir: Path, config: Path, model_store: Path, *extra: str
                  ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BUILD_ARCHIVE), "--checkpoint-dir", str(checkpoint_dir),
         "--config-file", str(config), "--model-name", "tiny", "--model-store", str(model_store), *extra],
        capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def server(tiny_converted_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    workdir = tmp_path_factory.mktemp("torchserve")
    built = build_archive(tiny_converted_dir, write_cpu_config(workdir / "model_config.yaml"),
                          workdir / "model_store")
    assert built.returncode == 0, built.stderr
    instance = TorchServe(workdir, workdir / "model_store", ["tiny"])
    try:
        instance.start(timeout=180)
        yield instance
    finally:
        killed = instance.stop()
        left = instance.leftover_processes()
        assert not killed, f"torchserve --stop left processes that had to be killed: {killed}"
        assert not left, f"processes left after stopping TorchServe: {[p.pid for p in left]}"


@pytest.fixture(autouse=True)
def show_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before and "server" in request.fixturenames:
        print(request.getfixturevalue("server").log_tail())


def predict(server: TorchServe, body: dict[str, Any] | bytes, **kwargs: Any) -> requests.Response:
    url = f"{server.inference_url}/predictions/tiny"
    if isinstance(body, bytes):
        return requests.post(url, data=body, timeout=TIMEOUT, **kwargs)
    return requests.post(url, json=body, timeout=TIMEOUT, **kwargs)


def answer(server: TorchServe, body: dict[str, Any]) -> str:
    reply = predict(server, body)
    assert reply.status_code == 200, reply.text
    return reply.text


# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_request_json_is_answered_with_text(server: TorchServe) -> None:
    # As the README does it: curl -T request.json (a PUT of the file, no content type).
    reply = requests.put(f"{server.inference_url}/predictions/tiny",
                         data=(REPO_ROOT / "request.json").read_bytes(), timeout=TIMEOUT)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain")
    assert reply.text.strip()


@pytest.mark.slow
def test_a_streamed_answer_arrives_in_chunks_that_join_to_the_plain_answer(server: TorchServe) -> None:
    body = {"prompt": "The capital of France", "max_new_tokens": 40}
    plain = answer(server, body)
    with predict(server, {**body, "stream": True}, stream=True) as reply:
        assert reply.status_code == 200
        assert reply.headers.get("transfer-encoding") == "chunked"
        chunks = [chunk for chunk in reply.iter_content(chunk_size=None) if chunk]
    assert len(chunks) > 1
    assert b"".join(chunks).decode("utf-8") == plain


CONCURRENT = [
    {"prompt": "The capital of France", "max_new_tokens": 20},
    {"prompt": "import os", "max_new_tokens": 5},
    {"prompt": "class Point:", "max_new_tokens": 12},
    {"prompt": "def main():", "max_new_tokens": 30},
    {"prompt": "Return the value", "temperature": 0.9, "seed": 1, "max_new_tokens": 15},
    {"prompt": "Return the value", "temperature": 0.9, "seed": 2, "max_new_tokens": 15},
    {"prompt": "The capital of France", "max_new_tokens": 25, "stop": ["and"]},
    {"prompt": "for line in lines:", "top_k": 5, "temperature": 1.0, "seed": 3, "max_new_tokens": 10},
]


@pytest.mark.slow
def test_concurrent_requests_in_batches_of_four_each_get_their_own_answer(server: TorchServe) -> None:
    alone = [answer(server, body) for body in CONCURRENT]
    assert len(set(alone)) == len(alone)  # distinct answers, so cross-talk could not go unnoticed
    with ThreadPoolExecutor(len(CONCURRENT)) as pool:
        together = list(pool.map(lambda body: answer(server, body), CONCURRENT))
    assert together == alone
    batch_sizes = [int(n) for n in re.findall(r"batch of (\d+) requests", server.log_tail(lines=2000))]
    assert max(batch_sizes, default=0) > 1, "the concurrent requests were never batched"


@pytest.mark.slow
def test_a_bad_request_does_not_fail_the_requests_batched_with_it(server: TorchServe) -> None:
    good = CONCURRENT[:3]
    alone = [answer(server, body) for body in good]
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda body: predict(server, body), [*good, {"prompt": 7}]))
    assert [reply.status_code for reply in replies] == [200, 200, 200, 400]
    assert [reply.text for reply in replies[:3]] == alone


BAD_BODIES: list[tuple[str, dict[str, Any] | bytes, str | None]] = [
    ("not JSON", b"The capital of France", None),
    ("no prompt", {"max_new_tokens": 5}, "prompt"),
    ("empty prompt", {"prompt": ""}, "prompt"),
    ("prompt not a string", {"prompt": ["The", "capital"]}, "prompt"),
    ("negative max_new_tokens", {"prompt": "x", "max_new_tokens": -3}, "max_new_tokens"),
    ("huge max_new_tokens", {"prompt": "x", "max_new_tokens": 10**12}, "max_new_tokens"),
    ("negative temperature", {"prompt": "x", "temperature": -1}, "temperature"),
    ("top_p above 1", {"prompt": "x", "top_p": 1.01}, "top_p"),
    ("unknown field", {"prompt": "x", "n": 2}, "n"),
    ("prompt past the context", {"prompt": "word " * 500}, "prompt"),
    ("prompt + max_new_tokens past the context", {"prompt": "word " * 60, "max_new_tokens": 120},
     "max_new_tokens"),
    ("stop not a list", {"prompt": "x", "stop": "\n"}, "stop"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("body", "field"), [case[1:] for case in BAD_BODIES], ids=[c[0] for c in BAD_BODIES])
def test_a_bad_request_gets_400_naming_the_field_and_the_worker_carries_on(
        server: TorchServe, body: dict[str, Any] | bytes, field: str | None) -> None:
    workers = server.worker_pids("tiny")
    headers = {"Content-Type": "application/json"} if isinstance(body, bytes) else {}
    reply = predict(server, body, headers=headers)
    assert reply.status_code == 400, reply.text
    error = json.loads(reply.text)
    assert error["field"] == field
    assert field is None or field in error["message"]
    if field is None:
        assert "not valid JSON" in error["message"]
    # The same worker answers the next request.
    assert answer(server, {"prompt": "The capital of France", "max_new_tokens": 5})
    assert server.worker_pids("tiny") == workers


@pytest.mark.slow
@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8"])
@pytest.mark.parametrize(("body", "kind"), [
    (b"null", "null"), (b"[1, 2]", "array"), (b'"The capital of France"', "string"),
    (json.dumps(json.dumps({"prompt": "x"})).encode(), "string"),
], ids=["null", "array", "string", "object encoded twice"])
def test_a_json_body_that_is_not_an_object_gets_400_saying_so(server: TorchServe, body: bytes, kind: str,
                                                               content_type: str) -> None:
    reply = predict(server, body, headers={"Content-Type": content_type})
    assert reply.status_code == 400, reply.text
    error = json.loads(reply.text)
    assert error["field"] is None
    assert f"must be a JSON object such as {{\"prompt\": \"Hi\"}}, not a JSON {kind}" in error["message"]


@pytest.mark.slow
def test_a_multipart_upload_under_another_name_gets_400_naming_the_form_field(server: TorchServe) -> None:
    request = b'{"prompt": "The capital of France", "max_new_tokens": 5}'
    reply = requests.post(f"{server.inference_url}/predictions/tiny", timeout=TIMEOUT,
                          files={"file": ("request.json", request, "application/json")})
    assert reply.status_code == 400, reply.text
    assert "'file'" in json.loads(reply.text)["message"]
    uploaded = requests.post(f"{server.inference_url}/predictions/tiny", timeout=TIMEOUT,
                             files={"data": ("request.json", request, "application/json")})
    assert uploaded.status_code == 200 and uploaded.text == answer(server, json.loads(request))
    # A setting in a form field of its own would be ignored: it is refused.
    streamed = requests.post(f"{server.inference_url}/predictions/tiny", timeout=TIMEOUT, data={"stream": "true"},
                             files={"data": ("request.json", request, "application/json")})
    assert streamed.status_code == 400, streamed.text
    error = json.loads(streamed.text)
    assert error["field"] == "stream" and "JSON body" in error["message"]


@pytest.mark.slow
def test_a_form_encoded_body_gets_400_saying_how_to_send_json(server: TorchServe) -> None:
    # `curl -d '{...}'` without a content type sends a form, which TorchServe drops before the handler.
    reply = predict(server, b'{"prompt": "x"}', headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert reply.status_code == 400
    assert "Content-Type: application/json" in json.loads(reply.text)["message"]


@pytest.mark.slow
def test_the_metrics_endpoint_shows_the_handler_metrics(server: TorchServe) -> None:
    answer(server, {"prompt": "The capital of France", "max_new_tokens": 5})
    metrics = requests.get(f"{server.metrics_url}/metrics", timeout=30).text
    for name in ("PromptTokens", "GeneratedTokens", "TimeToFirstToken", "DecodeTokensPerSecond"):
        assert re.search(rf'^{name}\{{ModelName="tiny",.*\}} [0-9.e+-]+$', metrics, re.MULTILINE), name


@pytest.mark.slow
def test_the_fx_graph_cache_lives_in_the_model_directory(server: TorchServe) -> None:
    # TorchServe runs the worker in a temporary link to the model directory; the cache must land in
    # the real one, which survives restarts.
    assert (server.model_store / "tiny" / "inductor_cache").is_dir()


# ---------------------------------------------------------------------------------------------------
# The archive script's own errors (no TorchServe needed).


def test_build_archive_names_a_missing_checkpoint(tiny_converted_dir: Path, tmp_path: Path) -> None:
    config = write_cpu_config(tmp_path / "model_config.yaml",
                              converted_ckpt_dir="checkpoints/tiny/model_fp8.pth")
    result = build_archive(tiny_converted_dir, config, tmp_path / "store")
    assert result.returncode == 1
    assert "model_fp8.pth does not exist" in result.stderr and "model_int8.pth" in result.stderr
    assert not (tmp_path / "store" / "tiny").exists()


def test_build_archive_says_how_to_get_a_missing_tokenizer(tiny_converted_dir: Path, tmp_path: Path) -> None:
    checkpoint_dir = tmp_path / "no_tokenizer"
    checkpoint_dir.mkdir()
    for name in ("model_int8.pth", "config.json"):
        (checkpoint_dir / name).symlink_to(tiny_converted_dir / name)
    result = build_archive(checkpoint_dir, write_cpu_config(tmp_path / "model_config.yaml"), tmp_path / "store")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "tokenizer.model is missing" in lines[0] and "copy" in lines[0], result.stderr
    assert not (tmp_path / "store" / "tiny").exists()


def test_build_archive_lays_out_the_model_directory(tiny_converted_dir: Path, tmp_path: Path) -> None:
    config = write_cpu_config(tmp_path / "model_config.yaml")
    assert build_archive(tiny_converted_dir, config, tmp_path / "store").returncode == 0
    model_dir = tmp_path / "store" / "tiny"
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    assert manifest["model"]["handler"] == "mixtral_handler.py"
    assert manifest["model"]["configFile"] == "model_config.yaml"
    for name in ("model_int8.pth", "config.json", "tokenizer.model"):
        assert (model_dir / "checkpoints" / "tiny" / name).is_file()
    assert (model_dir / "gpt_fast_mixtral" / "generate.py").is_file()
    assert (model_dir / "handler" / "request_schema.py").is_file()
    again = build_archive(tiny_converted_dir, config, tmp_path / "store")
    assert again.returncode == 1 and "--force" in again.stderr
    assert build_archive(tiny_converted_dir, config, tmp_path / "store", "--force").returncode == 0
