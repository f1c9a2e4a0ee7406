"""Generation: batched prefill, incremental decode, per-row sampling and stopping, streaming.

Also the command line: `python -m gpt_fast_mixtral.generate --checkpoint-path P --prompt TEXT ...`.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import random
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from gpt_fast_mixtral.checkpoint import check_checkpoint_path, load_model
from gpt_fast_mixtral.config import load_model_args
from gpt_fast_mixtral.kernels.argmax import greedy_state
from gpt_fast_mixtral.model import Transformer
from gpt_fast_mixtral.quantize import block_int8_experts
from gpt_fast_mixtral.sampling import SamplingTensors, sample
from gpt_fast_mixtral.tokenizer import IncrementalDetokenizer, Tokenizer
from gpt_fast_mixtral.tp import (
    ALL_REDUCES,
    PARALLEL_MODES,
    apply_tensor_parallel,
    init_process_group,
    leave_process_group,
)

TextCallback = Callable[[int, str], None]
SEED_LIMIT = 2**63  # seeds travel as int64 tensors: 0 <= seed < SEED_LIMIT


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 is greedy
    top_k: int | None = None  # None, 0 and -1 (vLLM's and transformers' spellings) mean no limit
    top_p: float | None = None
    seed: int | None = None  # None draws a fresh seed; otherwise 0 <= seed < 2**63 (SEED_LIMIT)
    stop: Sequence[str] = ()  # a single string is one stop string, as in vLLM and OpenAI's API

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = ()
        elif isinstance(self.stop, str):  # iterated, "###" would stop at any "#"
            self.stop = (self.stop,)


def check_sampling_params(params: SamplingParams) -> None:
    """Raise GenerationError naming the first setting that is out of range or of the wrong kind.

    Needs no model: the command line checks its arguments with it before loading one."""

    def is_integer(value: object) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    def is_number(value: object) -> bool:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

    if not is_integer(params.max_new_tokens) or params.max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be an integer >= 1, got {params.max_new_tokens!r}")
    if not is_number(params.temperature) or params.temperature < 0:
        raise GenerationError(
            f"temperature must be a finite number >= 0 (0 is greedy), got {params.temperature!r}")
    if params.top_k is not None and (not is_integer(params.top_k) or params.top_k < -1):
        raise GenerationError(
            f"top_k must be an integer >= 1, or 0, -1 or None for no limit, got {params.top_k!r}")
    if params.top_p is not None and (not is_number(params.top_p) or not 0 < params.top_p <= 1):
        raise GenerationError(f"top_p must be a number in (0, 1] or None, got {params.top_p!r}")
    if params.seed is not None and (not is_integer(params.seed) or not 0 <= params.seed < SEED_LIMIT):
        # Not folded into range: -1 and 2**63 - 1 drew the same tokens, as did 0 and 2**63.
        raise GenerationError(f"seed must be an integer from 0 to {SEED_LIMIT - 1} (2**63 - 1) or None, "
                              f"got {params.seed!r}")
    if any(not isinstance(stop, str) or not stop for stop in params.stop):
        raise GenerationError(f"stop must be non-empty strings, got {list(params.stop)!r}")


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: list[int]
    tokens: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    time_to_first_token_s: float = 0.0
    total_time_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        decode_time = self.total_time_s - self.time_to_first_token_s
        return (len(self.tokens) - 1) / decode_time if len(self.tokens) > 1 and decode_time > 0 else 0.0


class GenerationError(ValueError):
    """A request the engine cannot run as given (too long, bad settings)."""


@dataclass
class _Row:
    """One request's decoding state: its text, stop strings and what has been streamed."""

    detokenizer: IncrementalDetokenizer
    params: SamplingParams
    eos_id: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None

    def push(self, token: int) -> str:
        """Take one generated token; return the text that is now safe to stream."""
        self.tokens.append(token)
        new_text = "" if token == self.eos_id else self.detokenizer.push(token)
        if token == self.eos_id:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.params.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason:
            new_text += self.detokenizer.flush()
        self.text += new_text
        if self._cut_at_stop_string(len(new_text)):
            self.finish_reason = "stop"
        end = len(self.text) if self.finish_reason else len(self.text) - self._held_back()
        piece, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return piece

    def _cut_at_stop_string(self, new_chars: int) -> bool:
        longest = max((len(s) for s in self.params.stop), default=0)
        search_from = max(0, len(self.text) - new_chars - longest + 1)
        hits = [i for s in self.params.stop if (i := self.text.find(s, search_from)) >= 0]
        if hits:
            self.text = self.text[:min(hits)]
        return bool(hits)

    def _held_back(self) -> int:
        """Length of the text's longest suffix that could still grow into a stop string."""
        held = 0
        for stop in self.params.stop:
            for size in range(min(len(stop) - 1, len(self.text)), held, -1):
                if self.text.endswith(stop[:size]):
                    held = size
                    break
        return held


class _StepStates:
    """Each row's state between decode steps, [2, B] int64 (its latest token, then the position that token
    goes to), and the tokens' way to the host.

    On a GPU the decode step's outputs live in its CUDA graph's memory until the next step, so put() copies
    each step's state into one of two device buffers (used in turn), which the next step reads; a side
    stream then copies it to pinned host memory while the main stream goes on with the next step, and
    finish() waits for the oldest copy only. The positions advance and the clamp is taken inside the step,
    so between two steps' graphs the main stream runs that one copy and the graph's own input copy. The loop
    before ran a token clone, two position kernels and the host copy there: from the argmax's end to the
    next step's first kernel 22.8 us against 9.2 now (H200, int8 Mixtral-8x7B batch 1: 278.5 against 277.0
    tok/s in one call; the host copy on the main stream instead: 277.2; benchmarks/NOTES.md, session 35).
    On the CPU a step has run when its call returns: put() keeps the state and finish() reads it."""

    def __init__(self, batch: int, device: torch.device) -> None:
        self.overlaps = device.type == "cuda"  # whether the next step runs while finish() waits
        self._pending: deque[Tensor | int] = deque()
        if self.overlaps:
            self._states = torch.empty(2, 2, batch, dtype=torch.int64, device=device)
            self._host = torch.empty(2, 2, batch, dtype=torch.int64, pin_memory=True)
            self._stream = torch.cuda.Stream(device)
            # freed with this object while a copy may still read it (the last step's, never waited for)
            self._states.record_stream(self._stream)
            self._ready = torch.cuda.Event()
            self._copied = [torch.cuda.Event(), torch.cuda.Event()]
            self._turn = 0

    def put(self, state: Tensor, tokens: Tensor | None = None) -> Tensor:
        """Take a step's state [2, B] (with its tokens replaced by `tokens` [B] when given, e.g. sampled);
        start the tokens' copy to the host; return the state where it outlives the next step."""
        if not self.overlaps:
            if tokens is not None:
                state = torch.stack([tokens, state[1]])
            self._pending.append(state)
            return state
        turn, self._turn = self._turn, 1 - self._turn
        kept = self._states[turn]
        kept.copy_(state)
        if tokens is not None:
            kept[0].copy_(tokens)
        self._ready.record()
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(self._ready)
            self._host[turn].copy_(kept, non_blocking=True)
            self._copied[turn].record(self._stream)
        self._pending.append(turn)
        return kept

    def finish(self) -> list[int]:
        """The tokens of the oldest state put and not yet finished (at most two are in flight)."""
        item = self._pending.popleft()
        if isinstance(item, Tensor):
            return item[0].tolist()
        self._copied[item].synchronize()
        return self._host[item, 0].tolist()


def check_context(prompt_length: int, max_new_tokens: int, max_seq_len: int) -> None:
    total = prompt_length + max_new_tokens
    if total > max_seq_len:
        raise GenerationError(
            f"the prompt has {prompt_length} tokens and max_new_tokens is {max_new_tokens}: {total} exceeds the "
            f"context of {max_seq_len} tokens; shorten the prompt or lower max_new_tokens")


class Engine:
    """A model, its tokenizer and its KV cache: turns prompts into text, several rows at a time."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, max_batch_size: int = 1,
                 max_seq_len: int | None = None, compile: bool = False, prefill_chunk: int = 2048) -> None:
        self.model, self.tokenizer = model, tokenizer
        if tokenizer.vocab_size > model.args.vocab_size:
            raise GenerationError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.args.vocab_size}: "
                "they do not belong together")
        for name, value in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len)):
            if value is not None and (not isinstance(value, numbers.Integral) or value < 1):
                raise GenerationError(f"{name} must be a positive integer, got {value!r}")
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len if max_seq_len is not None else min(model.args.max_position_embeddings, 4096)
        self.prefill_chunk = prefill_chunk
        self.device = model.device
        block_int8_experts(model)  # GPU models only: the decode kernels read contiguous blocks
        model.setup_caches(max_batch_size, self.max_seq_len)
        self._decode = self._step
        if compile and self.device.type == "cuda":
            # The whole step becomes one CUDA graph. Sampling with top-p stays outside it: Inductor
            # (torch 2.11) cannot fuse the vocabulary-long cumsum with a reduction. One compiled function
            # serves greedy and sampled batches: each compile of the 32-layer graph takes over a minute,
            # and a server compiles it at start for batch size 1 and again for larger batches.
            self._decode = torch.compile(self._step, mode="reduce-overhead", fullgraph=True)

    @classmethod
    def from_checkpoint(cls, checkpoint_path: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.bfloat16, tokenizer_path: str | Path | None = None,
                        transform: Callable[[Transformer], Transformer] | None = None,
                        **engine_kwargs: object) -> Engine:
        """Load a checkpoint; `transform` (e.g. tensor parallel sharding, see tp.py) runs on the loaded
        model before it moves to `device`."""
        checkpoint_path = Path(checkpoint_path)
        tokenizer = Tokenizer(tokenizer_path or checkpoint_path.parent / "tokenizer.model")
        model = load_model(checkpoint_path, device=device, dtype=dtype, transform=transform)
        return cls(model, tokenizer, **engine_kwargs)  # type: ignore[arg-type]

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, bos=True)

    def check(self, prompt_tokens: Sequence[int], params: SamplingParams) -> None:
        """Raise GenerationError if the request cannot run; the message names what to change."""
        if not prompt_tokens:
            raise GenerationError("the prompt is empty")
        check_sampling_params(params)
        check_context(len(prompt_tokens), params.max_new_tokens, self.max_seq_len)
        if bad := [t for t in prompt_tokens if not 0 <= t < self.model.args.vocab_size]:
            raise GenerationError(f"token id {bad[0]} is outside the vocabulary")

    @torch.inference_mode()
    def generate(self, prompts: str | Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 on_text: TextCallback | None = None) -> list[GenerationResult]:
        """Generate for every prompt in one batch; on_text(row, piece) streams text as it is final.

        A string is one prompt (not a sequence of one-character prompts); one SamplingParams serves every
        prompt, as in vLLM."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if not 0 < len(prompts) <= self.max_batch_size or len(params) != len(prompts):
            raise GenerationError(
                f"got {len(prompts)} prompts and {len(params)} settings; the engine takes 1 to "
                f"{self.max_batch_size} prompts with one settings object each")
        start = time.perf_counter()
        prompt_tokens = [self.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        for tokens, row_params in zip(prompt_tokens, params, strict=True):
            self.check(tokens, row_params)
        rows = [_Row(IncrementalDetokenizer(self.tokenizer), p, self.tokenizer.eos_id) for p in params]
        settings = self._settings(params)
        greedy = all(p.temperature == 0 for p in params)
        lengths = torch.tensor([len(t) for t in prompt_tokens], device=self.device)

        logits = self._prefill(prompt_tokens, lengths)
        steps = torch.zeros(len(rows), dtype=torch.int64, device=self.device)
        first_token_time: float | None = None
        states = _StepStates(len(rows), self.device)
        state = states.put(torch.stack([sample(logits, settings, steps), lengths]))
        # On a GPU the next step is queued before the host waits for this step's tokens: it streams text
        # and checks stops while the GPU computes the next token (a row that stops then discards that one
        # extra token). On the CPU a step runs to its end when called, so there is nothing to overlap: the
        # tokens are read and streamed first.
        overlap = states.overlaps
        in_flight = 1 if overlap else 0  # when the next step is decided: this step's token, not yet taken

        def take(host_tokens: list[int]) -> bool:
            nonlocal first_token_time
            if first_token_time is None:
                first_token_time = time.perf_counter()
            for index, (row, token) in enumerate(zip(rows, host_tokens, strict=True)):
                if row.finish_reason is None:
                    piece = row.push(token)
                    if piece and on_text is not None:
                        on_text(index, piece)
            return all(row.finish_reason for row in rows)

        while True:
            if not overlap and take(states.finish()):
                break
            if any(row.finish_reason is None and len(row.tokens) + in_flight < row.params.max_new_tokens
                   for row in rows):
                next_state, step_logits = self._decode(state[0], state[1])
                sampled = None
                if not greedy:
                    steps += 1
                    sampled = sample(step_logits, settings, steps)
                state = states.put(next_state, sampled)
                del next_state, step_logits  # the step's CUDA graph memory: not read after the next step
            if overlap and take(states.finish()):
                break
        end = time.perf_counter()
        return [GenerationResult(row.text, tokens, row.tokens, row.finish_reason or "length",
                                 first_token_time - start, end - start)
                for row, tokens in zip(rows, prompt_tokens, strict=True)]

    def _settings(self, params: Sequence[SamplingParams]) -> SamplingTensors:
        vocab = self.model.args.vocab_size

        def tensor(values: list, dtype: torch.dtype) -> Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        seed = tensor([random.getrandbits(63) if p.seed is None else p.seed for p in params], torch.int64)
        if any(p.seed is None for p in params) and _is_distributed():
            # Each rank drew its own seeds; all must sample the same tokens, so rank 0's win. Every rank
            # runs the same requests, so every rank takes this branch together.
            dist.broadcast(seed, src=0)
        return SamplingTensors(
            temperature=tensor([p.temperature for p in params], torch.float32),
            top_k=tensor([vocab if p.top_k is None or p.top_k < 1 else min(p.top_k, vocab) for p in params],
                         torch.int64),
            top_p=tensor([1.0 if p.top_p is None else p.top_p for p in params], torch.float32),
            seed=seed,
        )

    def _prefill(self, prompt_tokens: list[list[int]], lengths: Tensor) -> Tensor:
        """Run the prompts (right-padded) in chunks; return each row's logits at its last token [B, V]."""
        batch, longest = len(prompt_tokens), max(len(t) for t in prompt_tokens)
        tokens = torch.zeros(batch, longest, dtype=torch.int64)
        for row, ids in enumerate(prompt_tokens):
            tokens[row, :len(ids)] = torch.tensor(ids)
        tokens = tokens.to(self.device)
        positions = torch.arange(longest, device=self.device).expand(batch, longest)
        last = lengths - 1
        logits = torch.empty(batch, self.model.args.vocab_size, device=self.device)
        for begin in range(0, longest, self.prefill_chunk):
            end = min(begin + self.prefill_chunk, longest)
            chunk_logits = self.model(tokens[:, begin:end], positions[:, begin:end], kv_len=end,
                                      logits_index=(last - begin).clamp(0, end - begin - 1))[:, 0]
            in_chunk = (last >= begin) & (last < end)
            logits = torch.where(in_chunk[:, None], chunk_logits.float(), logits)
        return logits

    def _step(self, tokens: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """One decode step of each row's latest token [B] at its position [B]: the next state [2, B] (the
        greedy token and the position it goes to, clamped to the cache: a row that has stopped may run on
        past it) and the logits [B, V] in the model's dtype (for sampling).
        The positions reach the model as given (a graph input): clamped inside the step, they were copied
        into a buffer of their own for every layer's attention kernel, 32 more kernels a Mixtral step that
        also broke its chain of programmatic dependent launches (H200: 269.8 against 276.6 tok/s, session 35).
        The next state comes from one kernel after the output head (kernels.argmax.greedy_state), which
        replaced Inductor's argmax and position kernels: the step 3585.6 against 3597.1 us (H200, session 36)."""
        logits = self.model(tokens[:, None], positions[:, None])[:, -1]
        return greedy_state(logits, positions, self.max_seq_len - 1), logits


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ---------------------------------------------------------------------------------------------------
# Command line.

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


# The escapes --stop decodes: \\, \n, \t, \r, and \uXXXX, two of which may make a UTF-16 surrogate pair.
_STOP_ESCAPE = re.compile(r"\\(\\|n|t|r|u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|u[0-9a-fA-F]{4})")
_SIMPLE_ESCAPES = {"\\": "\\", "n": "\n", "t": "\t", "r": "\r"}


def _stop_string(text: str) -> str:
    """A --stop value with its escapes decoded, since a shell passes '\\n' as a backslash and an n. Any
    other backslash stays as written, and so does every other character, non-ASCII ones included: the
    string is not run through codecs' unicode_escape, which would read it as Latin-1."""

    def decode(match: re.Match[str]) -> str:
        escape = match.group(1)
        if escape in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[escape]
        if len(escape) > 5:  # \uD83D\uDE00: one character past the first 65536
            high, low = int(escape[1:5], 16), int(escape[7:], 16)
            return chr(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))
        if 0xD800 <= (code := int(escape[1:], 16)) <= 0xDFFF:
            raise argparse.ArgumentTypeError(
                f"\\{escape} is half of a UTF-16 surrogate pair, not a character: write the character itself "
                "or both halves (\\ud83d\\ude00 is U+1F600)")
        return chr(code)

    return _STOP_ESCAPE.sub(decode, text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Generate text with a converted Mixtral checkpoint.")
    parser.add_argument("--checkpoint-path", type=Path, required=True,
                        help="model.pth or model_int8.pth (config.json and tokenizer.model beside it)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    parser.add_argument("--top-k", type=int, default=None,
                        help="sample among the k likeliest tokens; 0 or -1 mean no limit, as does leaving it out")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None,
                        help="an integer from 0 to 2**63 - 1; the same seed and settings give the same text "
                             "(default: a fresh seed each run)")
    parser.add_argument("--stop", action="append", default=[], type=_stop_string,
                        help="stop string (repeatable); the escapes \\n, \\t, \\r, \\\\ and \\uXXXX are "
                             "decoded, so --stop '\\n' stops at a newline; any other backslash is kept as written")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--max-seq-len", type=_positive_int, default=None,
                        help="KV cache length (default: prompt + max new tokens)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--parallel", choices=PARALLEL_MODES, default="tp",
                        help="how to split the model when started by torchrun (WORLD_SIZE > 1): tp slices "
                             "every expert, ep gives each rank whole experts; attention is split by heads in both")
    parser.add_argument("--all-reduce", choices=ALL_REDUCES, default="push",
                        help="on GPUs under torchrun: push (our kernel) or one-shot (PyTorch's) sends "
                             "decode-sized all-reduces through symmetric memory (NVLink), nccl sends all of "
                             "them through NCCL")
    return parser


def _print_text(text: str) -> None:
    """Write the prompt or generated text to stdout at once. A character stdout's encoding lacks (under
    PYTHONIOENCODING=ascii, on a Latin-1 terminal) is written as a backslash escape (\\u2713): printed as
    it is, it raised UnicodeEncodeError partway through the answer."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding), end="", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda was asked for, but there is no CUDA GPU here (or torch was built without "
              "CUDA): pass --device cpu, or leave --device out to use a GPU when there is one", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                            tuple(args.stop))
    # Under torchrun every rank runs this same program on its shard; rank 0 alone prints the answer.
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    try:
        transform = None
        if world_size > 1:
            if device.type == "cuda":
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            init_process_group(device, args.all_reduce)
            transform = partial(apply_tensor_parallel, rank=rank, world_size=world_size, mode=args.parallel,
                                device=device)
        try:
            # Everything the arguments alone decide is checked before the model loads (minutes for Mixtral)
            # and before the prompt is echoed.
            check_sampling_params(params)
            check_checkpoint_path(args.checkpoint_path)
            tokenizer = Tokenizer(args.checkpoint_path.parent / "tokenizer.model")
            prompt_tokens = tokenizer.encode(args.prompt, bos=True)
            context = load_model_args(args.checkpoint_path.parent).max_position_embeddings
            if args.max_seq_len is not None and args.max_seq_len > context:
                raise GenerationError(f"--max-seq-len {args.max_seq_len} exceeds the model's context of "
                                      f"{context} tokens (max_position_embeddings in config.json)")
            max_seq_len = args.max_seq_len or min(len(prompt_tokens) + args.max_new_tokens, context)
            check_context(len(prompt_tokens), params.max_new_tokens, max_seq_len)
        except GenerationError as error:
            # The same arguments give every rank the same error: rank 0 says it once, and the others wait
            # until it has (torchrun stops the remaining ranks as soon as one of them exits).
            if rank == 0:
                print(f"error: {error}", file=sys.stderr, flush=True)
            leave_process_group()
            return 2
        model = load_model(args.checkpoint_path, device=device, dtype=dtype, transform=transform)
        engine = Engine(model, tokenizer, max_seq_len=max_seq_len, compile=args.compile)
        stream = None if args.json or rank != 0 else (lambda _row, piece: _print_text(piece))
        if stream:
            _print_text(args.prompt)
        result = engine.generate([prompt_tokens], [params], on_text=stream)[0]
        # Leave together: a rank tearing the group down while another still talks to it aborted
        # ("terminate called without an active exception") in about one run of ten under gloo.
        leave_process_group()
    except (ValueError, OSError) as error:
        # Every rank says what went wrong: a failure on one rank alone must not go unseen.
        print(f"error: {f'rank {rank}: ' if world_size > 1 else ''}{error}", file=sys.stderr)
        return 2
    if rank != 0:
        return 0
    if args.json:
        print(json.dumps({"text": result.text, "prompt_tokens": result.prompt_tokens, "tokens": result.tokens,
                          "finish_reason": result.finish_reason,
                          "time_to_first_token_s": round(result.time_to_first_token_s, 6),
                          "decode_tokens_per_s": round(result.decode_tokens_per_s, 3)}))
    else:
        print()
        print(f"[{len(result.tokens)} tokens, {result.finish_reason}; first token after "
              f"{result.time_to_first_token_s * 1000:.1f} ms, {result.decode_tokens_per_s:.1f} tok/s]",
              file=sys.stderr)
    return 0


def exit_rank(code: int) -> None:
    """End a torchrun rank without running C++ static destructors.

    With torch 2.13 and gloo, about one rank exit in ten aborted after everything had finished and the
    process group was destroyed ("terminate called without an active exception", exit -6), which
    torchrun reports as a failed run. The work is done and flushed by then, so skip the teardown.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    status = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_rank(status)
    sys.exit(status)
