"""TorchServe handler for the gpt_fast_mixtral engine.

One worker holds one `Engine`. A TorchServe batch (up to `batchSize` requests) becomes one batched
`Engine.generate` call; each request keeps its own sampling settings, stop strings, stream flag and
answer. A bad request is answered with HTTP 400 on its own, without touching the rest of its batch.

Settings come from the `handler:` section of model_config.yaml (see handler/settings.py). TorchServe
wants exactly one class in this module, so everything else lives in the `handler` package beside it.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import time
from collections.abc import Callable
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ts.context import Context
from ts.handler_utils.utils import send_intermediate_predict_response
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

try:
    from gpt_fast_mixtral.generate import Engine, GenerationError, GenerationResult, SamplingParams
    from gpt_fast_mixtral.model import Transformer
    from gpt_fast_mixtral.tp import apply_tensor_parallel, init_process_group
    from handler.request_schema import (
        GenerationRequest,
        RequestError,
        body_part,
        fit_to_context,
        parse_request,
    )
    from handler.settings import HandlerSettings, enable_fx_graph_cache, resolve_path, select_device
except ModuleNotFoundError as error:  # say how to fix it, not only which import failed
    raise ModuleNotFoundError(
        f"{error}: the TorchServe worker cannot import the engine. Build the model directory with "
        "scripts/build_archive.py (it carries the gpt_fast_mixtral and handler packages), or "
        "`pip install -e .` the project into the Python that runs TorchServe") from error

logger = logging.getLogger(__name__)

TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"
# A validated request of the batch: (index in the batch, request, prompt token ids, fitted settings).
Job = tuple[int, GenerationRequest, list[int], SamplingParams]


class MixtralHandler(BaseHandler):
    """Loads the converted checkpoint once per worker and serves text generation requests."""

    def __init__(self) -> None:
        super().__init__()
        self.engine: Engine | None = None
        self.settings: HandlerSettings | None = None
        # Under torchrun TorchServe sends every batch to every rank and sends back what LOCAL_RANK 0 answers;
        # the other ranks compute their shards in step with it, and stream and record nothing.
        self.answers = True

    def initialize(self, context: Context) -> None:
        started = time.perf_counter()
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        model_yaml = context.model_yaml_config or {}
        settings = HandlerSettings.from_yaml(model_yaml.get("handler"))
        # First, so that nothing below (loading, warm-up) compiles without the cache.
        enable_fx_graph_cache(settings.fx_graph_cache, resolve_path(model_dir, settings.fx_graph_cache_dir))

        self.device = select_device(model_yaml.get("deviceType"), properties.get("gpu_id"))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        shard = None
        if world_size > 1:
            shard = self._setup_tensor_parallel(world_size, settings.parallel_mode, settings.all_reduce)
        self.answers = os.environ.get("LOCAL_RANK", "0") == "0"

        checkpoint = resolve_path(model_dir, settings.converted_ckpt_dir)
        if not checkpoint.is_file():
            raise FileNotFoundError(
                f"handler.converted_ckpt_dir points to {checkpoint}, which does not exist; the model "
                "directory must hold the checkpoint (scripts/build_archive.py puts it there)")
        compile_decode = settings.compile and self.device.type == "cuda"
        if settings.compile and not compile_decode:
            logger.info("compile is on but the device is %s: running eagerly", self.device)
        dtype = settings.torch_dtype(self.device)
        self.engine = Engine.from_checkpoint(
            checkpoint, device=self.device, dtype=dtype,
            max_batch_size=int(properties.get("batch_size") or 1), max_seq_len=settings.max_seq_len,
            compile=compile_decode, transform=shard)
        if compile_decode:
            self._warm_up()
        self.settings = settings
        self.initialized = True
        # Which engine code serves matters: the model directory's copy or an installed package.
        logger.info("loaded %s on %s (%s, batch %d, context %d) in %.1f s with the engine from %s",
                    checkpoint, self.device, dtype, self.engine.max_batch_size, self.engine.max_seq_len,
                    time.perf_counter() - started, inspect.getfile(Engine))

    def _setup_tensor_parallel(self, world_size: int, mode: str, all_reduce: str
                               ) -> Callable[[Transformer], Transformer]:
        """Join the process group of the ranks torchrun started (parallelType: tp) and return the
        sharding that loading applies before the model moves to this rank's device."""
        init_process_group(self.device, all_reduce)
        rank = dist.get_rank()
        logger.info("rank %d of %d: %s parallel on %s, %s all-reduce", rank, world_size, mode, self.device,
                    all_reduce if self.device.type == "cuda" else "gloo")
        return partial(apply_tensor_parallel, rank=rank, world_size=world_size, mode=mode, device=self.device)

    def _warm_up(self) -> None:
        """Compile at load time, for every batch size, not on the first requests (which would run
        into responseTimeout)."""
        assert self.engine is not None
        started = time.perf_counter()
        prompt = self.engine.encode("warm up")
        for batch in range(1, self.engine.max_batch_size + 1):
            for temperature in (0.0, 1.0):  # sampling also runs kernels outside the compiled step
                self.engine.generate([prompt] * batch, [SamplingParams(4, temperature, seed=0)] * batch)
        logger.info("warm-up (compile) took %.1f s", time.perf_counter() - started)

    # -----------------------------------------------------------------------------------------------
    # Requests.

    def handle(self, data: list[dict[str, Any]], context: Context) -> list[str]:
        """Answer every request of the batch: text for the good ones, a JSON error for the others."""
        started = time.perf_counter()
        self.context = context
        answers = [""] * len(data)
        jobs: list[Job] = []
        for index, row in enumerate(data):
            try:
                jobs.append(self._prepare(index, row, context))
            except RequestError as error:
                logger.info("request %s rejected: %s", context.get_request_id(index), error.message)
                answers[index] = self._error(context, index, 400, "BadRequest", error.message, error.field)
            except Exception as error:  # a bug met by one request must not fail its whole batch
                logger.exception("request %s could not be prepared", context.get_request_id(index))
                answers[index] = self._error(context, index, 500, "InternalServerError",
                                             f"the request could not be prepared: {type(error).__name__}")
        logger.info("batch of %d requests, %d valid", len(data), len(jobs))
        if jobs:
            self._generate(jobs, answers, context)
        if context.metrics is not None and self.answers:  # every rank's log reaches TorchServe: count once
            context.metrics.add_time("HandlerTime", round((time.perf_counter() - started) * 1000, 2),
                                     None, "ms", [])
        return answers

    def _prepare(self, index: int, row: dict[str, Any], context: Context) -> Job:
        assert self.engine is not None and self.settings is not None
        body, parsed = row, False
        if isinstance(row, dict):
            name = body_part(row)
            # TorchServe parses an application/json body itself (bytes stay bytes where that fails):
            # None is then a JSON null, and a str a JSON string rather than text to parse.
            body, parsed = row[name], self._content_type(context, index, name) == "application/json"
        request = parse_request(body, default_max_new_tokens=self.settings.max_new_tokens,
                                default_stream=self.settings.stream, max_seq_len=self.engine.max_seq_len,
                                parsed=parsed)
        prompt_tokens = self.engine.encode(request.prompt)
        params = fit_to_context(request, len(prompt_tokens), self.engine.max_seq_len)
        try:
            self.engine.check(prompt_tokens, params)
        except GenerationError as error:  # the engine's own limits; its message names the setting
            raise RequestError(None, str(error)) from None
        return index, request, prompt_tokens, params

    @staticmethod
    def _content_type(context: Context, index: int, name: str) -> str:
        """The content type TorchServe received request `index`'s part `name` with ('' when unknown)."""
        try:
            header = context.get_request_header(index, name)
        except (AttributeError, IndexError, KeyError, TypeError):  # no request headers (a direct call)
            return ""
        # An HTTP header of the same name would replace the part's {"content-type": ...}: then unknown.
        return str(header.get("content-type") or "") if isinstance(header, dict) else ""

    def _generate(self, jobs: list[Job], answers: list[str], context: Context) -> None:
        assert self.engine is not None
        streamed_chars = [0] * len(jobs)
        for index, *_ in jobs:
            context.set_response_content_type(index, TEXT_CONTENT_TYPE)

        def on_text(row: int, piece: str) -> None:
            index, request, _, _ = jobs[row]
            if request.stream:
                # Counted on every rank (the ranks generate the same text), sent by the answering one. Only
                # this request's id: its piece goes out as one HTTP chunk, the others get nothing.
                if self.answers:
                    send_intermediate_predict_response({index: piece}, {index: context.get_request_id(index)},
                                                       "Intermediate Prediction success", 200, context)
                streamed_chars[row] += len(piece)

        try:
            results = self.engine.generate([tokens for _, _, tokens, _ in jobs],
                                           [params for *_, params in jobs], on_text=on_text)
        except Exception as error:  # the batch fails, the worker lives on
            # (Under tensor parallelism only if every rank fails alike; a rank failing alone leaves the others
            # waiting in a collective until TorchServe's responseTimeout restarts the worker.)
            logger.exception("generation failed for a batch of %d", len(jobs))
            out_of_memory = isinstance(error, torch.OutOfMemoryError)
            message = f"generation failed: {type(error).__name__}"
        else:
            out_of_memory, message = False, None
        if message is not None:  # past the except block: the failed batch's tensors are released
            failed = range(len(jobs))  # rows of jobs
            if out_of_memory and len(jobs) > 1:
                # Together the batch did not fit (one long prompt or a large max_new_tokens is enough): each
                # request that has sent nothing yet runs again alone, so only those that cannot fit fail. Every
                # rank of a tensor-parallel worker sees the same batch and memory, so all of them retry alike.
                failed = [row for row in range(len(jobs)) if streamed_chars[row]]
                retry = [job for row, job in enumerate(jobs) if not streamed_chars[row]]
                logger.warning("out of GPU memory for a batch of %d: running %d of its requests one at a time",
                               len(jobs), len(retry))
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                for job in retry:
                    self._generate([job], answers, context)
            code, kind = (507, "OutOfResources") if out_of_memory else (500, "InternalServerError")
            for row in failed:
                index = jobs[row][0]
                # A streamed request that had sent text keeps the 200 that went out with its first chunk: its
                # last chunk is this JSON body, which says that the text before it is cut short.
                sent = (f" after {streamed_chars[row]} characters were streamed (that text is incomplete)"
                        if streamed_chars[row] else "")
                answers[index] = self._error(context, index, code, kind, message + sent)
            return
        for row, ((index, request, _, _), result) in enumerate(zip(jobs, results, strict=True)):
            # A streamed answer has gone out already; its final message carries whatever is left.
            answers[index] = result.text[streamed_chars[row]:] if request.stream else result.text
            if self.answers:
                self._record_metrics(context, index, result)

    @staticmethod
    def _error(context: Context, index: int, code: int, kind: str, message: str,
               field: str | None = None) -> str:
        """Mark request `index` as failed; its body, in the shape of TorchServe's own error bodies plus
        the field at fault, so a client can point at it."""
        context.set_response_status(code, HTTPStatus(code).phrase, idx=index)
        context.set_response_content_type(index, "application/json")
        body: dict[str, Any] = {"code": code, "type": kind, "message": message}
        if code == 400:
            body["field"] = field
        return json.dumps(body)

    @staticmethod
    def _record_metrics(context: Context, index: int, result: GenerationResult) -> None:
        metrics = context.metrics
        if metrics is None:
            return
        # A fresh dimensions list per call: TorchServe appends its default dimensions to the list given.
        metrics.add_counter("PromptTokens", len(result.prompt_tokens), index, [])
        metrics.add_counter("GeneratedTokens", len(result.tokens), index, [])
        metrics.add_time("TimeToFirstToken", round(result.time_to_first_token_s * 1000, 3), index, "ms", [])
        # TorchServe's metric log format allows only word characters in a unit.
        metrics.add_metric("DecodeTokensPerSecond", round(result.decode_tokens_per_s, 3), "tokens_per_second",
                           index, [], MetricTypes.GAUGE)
