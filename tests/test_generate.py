"""Engine.generate on the tiny checkpoint: batching never changes a row's tokens, sampling is seeded,
stopping and streaming are exact, bad requests are refused; and the `python -m gpt_fast_mixtral.generate` CLI."""

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gpt_fast_mixtral.checkpoint import convert_checkpoint, load_model
from gpt_fast_mixtral.generate import Engine, GenerationError, GenerationResult, SamplingParams
from gpt_fast_mixtral.tokenizer import IncrementalDetokenizer, Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_BATCH, MAX_SEQ_LEN = 4, 160
PROMPT = "Hello world"


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_checkpoint(tiny_checkpoint_dir, tmp_path_factory.mktemp("generate") / "model.pth")


@pytest.fixture(scope="module")
def engine(checkpoint: Path) -> Engine:
    return Engine.from_checkpoint(checkpoint, dtype=torch.float32, max_batch_size=MAX_BATCH,
                                  max_seq_len=MAX_SEQ_LEN)


@pytest.fixture(scope="module")
def greedy(engine: Engine) -> GenerationResult:
    """The unrestricted greedy continuation of PROMPT: the reference the stopping tests cut."""
    result = generate_one(engine, PROMPT, SamplingParams(max_new_tokens=48))
    assert result.finish_reason == "length" and len(result.tokens) == 48
    return result


def generate_one(engine: Engine, prompt, params: SamplingParams, on_text=None) -> GenerationResult:
    return engine.generate([prompt], [params], on_text=on_text)[0]


def token_pieces(tokenizer: Tokenizer, tokens: list[int]) -> list[str]:
    """The text each token adds when streamed."""
    detokenizer = IncrementalDetokenizer(tokenizer)
    return [detokenizer.push(token) for token in tokens]


def straddling_stops(pieces: list[str], start: int, tail: str | None = None):
    """Stop strings made of the last 2 characters of a token's piece (at or after `start`) and the first
    2 of the next one's, so that each can only be recognised one token after it begins; with that token's
    index."""
    for index in range(start, len(pieces) - 1):
        left, right = pieces[index], pieces[index + 1]
        if len(left) >= 2 and len(right) >= 2 and (left[-2:] + right[:2]).isprintable():
            yield left[-2:] + (right[:2] if tail is None else tail), index


def straddling_stop(pieces: list[str], start: int, tail: str | None = None) -> tuple[str, int]:
    for found in straddling_stops(pieces, start, tail):
        return found
    raise AssertionError("no two neighbouring printable pieces: the tiny model's output changed")


def tokens_through(pieces: list[str], end: int) -> int:
    """How many tokens it takes for the streamed text to be `end` characters long."""
    length = 0
    for count, piece in enumerate(pieces, start=1):
        length += len(piece)
        if length >= end:
            return count
    raise AssertionError("the text is shorter than that")


def collect_stream(results: dict[int, list[str]]):
    def on_text(row: int, piece: str) -> None:
        assert piece, "empty pieces are not streamed"
        results.setdefault(row, []).append(piece)

    return on_text


def random_prompt(length: int, seed: int, vocab_size: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return [1, *torch.randint(3, vocab_size, (length - 1,), generator=generator).tolist()]


# ---------------------------------------------------------------------------------------------------
# Batching: a row's tokens do not depend on what else is in the batch.

BATCH_LENGTHS = (3, 17, 9)


def batch_prompts(engine: Engine) -> list[list[int]]:
    return [random_prompt(length, seed, engine.model.args.vocab_size)
            for seed, length in enumerate(BATCH_LENGTHS)]


@pytest.mark.parametrize("mode", ["greedy", "sampled", "mixed"])
def test_a_batch_gives_every_row_the_tokens_it_gets_alone(engine, mode):
    prompts = batch_prompts(engine)
    assert [len(p) for p in prompts] == list(BATCH_LENGTHS)
    sampled = [SamplingParams(max_new_tokens=10, temperature=0.8, top_k=40, seed=1),
               SamplingParams(max_new_tokens=24, temperature=0.8, top_p=0.9, seed=2),
               SamplingParams(max_new_tokens=16, temperature=0.8, top_k=100, top_p=0.8, seed=3)]
    greedy_ = [SamplingParams(max_new_tokens=n) for n in (10, 24, 16)]
    params = {"greedy": greedy_, "sampled": sampled, "mixed": [greedy_[0], sampled[1], greedy_[2]]}[mode]
    together = engine.generate(prompts, params)
    alone = [generate_one(engine, prompt, p) for prompt, p in zip(prompts, params, strict=True)]
    for row, (batched, single) in enumerate(zip(together, alone, strict=True)):
        assert batched.tokens == single.tokens, f"row {row}"
        assert batched.text == single.text
        assert batched.prompt_tokens == prompts[row]
        assert len(batched.tokens) == params[row].max_new_tokens and batched.finish_reason == "length"
    assert len({tuple(r.tokens) for r in together}) == 3, "rows must not all generate the same tokens"


def test_rows_of_a_batch_stream_only_their_own_text(engine, greedy):
    pieces = token_pieces(engine.tokenizer, greedy.tokens)
    stop, _ = straddling_stop(pieces, 20)
    prompts = [PROMPT, batch_prompts(engine)[1], PROMPT]
    params = [SamplingParams(max_new_tokens=48, stop=[stop]),
              SamplingParams(max_new_tokens=30, temperature=0.9, seed=11),
              SamplingParams(max_new_tokens=20)]
    streamed: dict[int, list[str]] = {}
    results = engine.generate(prompts, params, on_text=collect_stream(streamed))
    assert results[0].finish_reason == "stop" and results[0].text == greedy.text[:greedy.text.find(stop)]
    assert results[2].text == engine.tokenizer.decode(greedy.tokens[:20], continuation=True)
    assert len({r.text for r in results}) == 3
    for row, result in enumerate(results):
        assert "".join(streamed[row]) == result.text, f"row {row}"


# ---------------------------------------------------------------------------------------------------
# Seeds.


def test_seeded_sampling_is_reproducible(engine):
    params = SamplingParams(max_new_tokens=24, temperature=0.8, top_k=50, top_p=0.95, seed=1234)
    first, second = generate_one(engine, PROMPT, params), generate_one(engine, PROMPT, params)
    assert first.tokens == second.tokens and first.text == second.text


def test_different_seeds_give_different_tokens(engine, greedy):
    runs = {tuple(generate_one(engine, PROMPT, SamplingParams(max_new_tokens=24, temperature=0.8, seed=seed)).tokens)
            for seed in (1, 2, 3)}
    assert len(runs) == 3
    assert tuple(greedy.tokens[:24]) not in runs


def test_every_seed_the_server_accepts_is_its_own(engine):
    """The handler takes seeds in [0, 2**63): seeds 2**62 apart drew the same tokens (62 bits were kept)."""
    def tokens(seed: int) -> list[int]:
        return generate_one(engine, PROMPT, SamplingParams(max_new_tokens=12, temperature=1.0, seed=seed)).tokens

    assert tokens(5) != tokens(5 + 2**62)
    assert tokens(2**63 - 1) == tokens(2**63 - 1)


@pytest.mark.parametrize("seed", [-1, -2**63, 2**63, 2**64 + 5])
def test_a_seed_outside_0_to_2_63_is_refused_not_folded_into_range(engine, seed):
    """-1 drew the same tokens as 2**63 - 1, and 2**63 + 5 the same as 5: refused, naming the range."""
    with pytest.raises(GenerationError, match=rf"^seed must be an integer from 0 to {2**63 - 1} .*got {seed}$"):
        generate_one(engine, PROMPT, SamplingParams(max_new_tokens=4, temperature=1.0, seed=seed))


def test_the_smallest_and_largest_seeds_are_accepted(engine):
    for seed in (0, 2**63 - 1):
        assert generate_one(engine, PROMPT, SamplingParams(max_new_tokens=4, temperature=1.0, seed=seed)).tokens


@pytest.mark.parametrize("top_k", [0, -1])
def test_top_k_zero_or_minus_one_means_no_limit(engine, greedy, top_k):
    """As in transformers (0) and vLLM (-1): the whole vocabulary, exactly as without a top_k."""
    def tokens(top_k: int | None) -> list[int]:
        params = SamplingParams(max_new_tokens=24, temperature=1.0, top_k=top_k, seed=77)
        return generate_one(engine, PROMPT, params).tokens

    unlimited = tokens(None)
    assert tokens(top_k) == unlimited
    assert unlimited != greedy.tokens[:len(unlimited)] and unlimited != tokens(1)


def test_unseeded_sampling_draws_a_fresh_seed_each_call(engine):
    params = SamplingParams(max_new_tokens=24, temperature=1.0)
    runs = [generate_one(engine, PROMPT, params) for _ in range(3)]
    for run in runs:  # a run may draw EOS and stop early
        assert 1 <= len(run.tokens) <= 24 and run.finish_reason in ("stop", "length")
        visible = [t for t in run.tokens if t != engine.tokenizer.eos_id]
        assert run.text == engine.tokenizer.decode(visible, continuation=True)
    assert len({tuple(run.tokens) for run in runs}) > 1


# ---------------------------------------------------------------------------------------------------
# Stopping.


def test_max_new_tokens_is_respected_and_reported_as_length(engine, greedy):
    result = generate_one(engine, PROMPT, SamplingParams(max_new_tokens=7))
    assert result.tokens == greedy.tokens[:7]
    assert result.finish_reason == "length"
    assert result.text == engine.tokenizer.decode(greedy.tokens[:7], continuation=True)


def test_stop_string_cuts_the_text_right_before_its_first_occurrence(engine, greedy):
    pieces = token_pieces(engine.tokenizer, greedy.tokens)
    stop, _ = straddling_stop(pieces, len(pieces) // 2)
    first = greedy.text.find(stop)
    result = generate_one(engine, PROMPT, SamplingParams(max_new_tokens=48, stop=[stop]))
    assert result.finish_reason == "stop"
    assert result.text == greedy.text[:first]
    # Generation ends with the token that completes the stop string.
    assert result.tokens == greedy.tokens[:tokens_through(pieces, first + len(stop))]
    assert len(result.tokens) < 48


def test_of_several_stop_strings_the_first_to_appear_wins(engine, greedy):
    pieces = token_pieces(engine.tokenizer, greedy.tokens)
    early, early_token = straddling_stop(pieces, 6)
    first = greedy.text.find(early)
    # a later straddling stop that does not also occur before `early` (repetitive text can hold one there:
    # the GPU's greedy text of this model did)
    late = next((stop for stop, _ in straddling_stops(pieces, early_token + 8) if greedy.text.find(stop) > first),
                None)
    assert late is not None, "no later stop string first appearing after the early one: the tiny model's output changed"
    for stops in ([late, early], [early, late]):
        result = generate_one(engine, PROMPT, SamplingParams(max_new_tokens=48, stop=stops))
        assert result.finish_reason == "stop"
        assert result.text == greedy.text[:first], stops


def test_of_stop_strings_completed_by_the_same_token_the_one_starting_earliest_wins(engine, greedy):
    pieces = token_pieces(engine.tokenizer, greedy.tokens)
    # `longer` starts one character before `shorter`, and both end inside the same token's piece.
    longer, shorter = next((stop, stop[1:]) for stop, _ in straddling_stops(pieces, 4)
                           if greedy.text.find(stop[1:]) == greedy.text.find(stop) + 1)
    for stops in ([shorter, longer], [longer, shorter]):
        result = generate_one(engine, PROMPT, SamplingParams(max_new_tokens=48, stop=stops))
        assert result.finish_reason == "stop"
        assert result.text == greedy.text[:greedy.text.find(longer)], stops


def test_a_stop_string_that_never_appears_changes_nothing(engine, greedy):
    result = generate_one(engine, PROMPT, SamplingParams(max_new_tokens=48, stop=["\x00never\x00"]))
    assert result.tokens == greedy.tokens and result.text == greedy.text and result.finish_reason == "length"


class TokenizerWithEos(Tokenizer):
    """The tiny tokenizer, but with another token playing end-of-sequence."""

    def __init__(self, path: Path, eos_id: int) -> None:
        super().__init__(path)
        self._eos_id = eos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id


def test_eos_stops_generation_and_adds_no_text(checkpoint, greedy):
    # The first token of the greedy output that was not generated before, at index 3 or later.
    index = next(i for i in range(3, len(greedy.tokens)) if greedy.tokens[i] not in greedy.tokens[:i])
    eos = greedy.tokens[index]
    tokenizer = TokenizerWithEos(checkpoint.parent / "tokenizer.model", eos)
    engine = Engine(load_model(checkpoint, dtype=torch.float32), tokenizer, max_seq_len=MAX_SEQ_LEN)
    streamed: dict[int, list[str]] = {}
    result = generate_one(engine, PROMPT, SamplingParams(max_new_tokens=48), on_text=collect_stream(streamed))
    assert result.finish_reason == "stop"
    assert result.tokens == greedy.tokens[:index + 1]
    assert result.tokens[-1] == eos
    expected_text = tokenizer.decode(greedy.tokens[:index], continuation=True)
    assert result.text == expected_text
    assert "".join(streamed.get(0, [])) == expected_text


# ---------------------------------------------------------------------------------------------------
# Streaming.


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the next step is queued before the read, by design")
def test_on_the_cpu_the_first_token_is_streamed_and_timed_before_the_next_step_runs(engine, greedy, monkeypatch):
    """A CPU step runs to its end when called: reading the previous token after it (the GPU's overlap) only
    delayed the first piece by a step and counted that step in time_to_first_token_s."""
    import gpt_fast_mixtral.generate as generate_module

    clock, events = [0.0], []
    monkeypatch.setattr(generate_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    step = engine._decode

    def timed_step(*args):
        events.append("step")
        clock[0] += 1.0  # each decode step takes one "second" of the fake clock; nothing else does
        return step(*args)

    monkeypatch.setattr(engine, "_decode", timed_step)
    result = generate_one(engine, PROMPT, SamplingParams(max_new_tokens=4),
                          on_text=lambda _row, piece: events.append("text"))
    assert result.tokens == greedy.tokens[:4]
    assert events[0] == "text" and events.count("step") == 3
    assert result.time_to_first_token_s == 0.0 and result.total_time_s == 3.0
    assert result.decode_tokens_per_s == 1.0


def test_streamed_pieces_join_to_the_text(engine, greedy):
    streamed: dict[int, list[str]] = {}
    result = generate_one(engine, PROMPT, SamplingParams(max_new_tokens=48), on_text=collect_stream(streamed))
    assert "".join(streamed[0]) == result.text == greedy.text
    assert len(streamed[0]) > 10, "text is streamed as it is generated, not at the end"


def test_no_text_of_a_stop_string_is_ever_streamed(engine, greedy):
    """The stop string begins inside one token and ends inside the next: its beginning must be held
    back until it is clear whether it completes."""
    pieces = token_pieces(engine.tokenizer, greedy.tokens)
    stop, index = straddling_stop(pieces, 10)
    streamed: dict[int, list[str]] = {}
    result = generate_one(engine, PROMPT, SamplingParams(max_new_tokens=48, stop=[stop]),
                          on_text=collect_stream(streamed))
    assert result.finish_reason == "stop"
    assert "".join(streamed.get(0, [])) == result.text == greedy.text[:greedy.text.find(stop)]


def test_held_back_text_is_streamed_once_it_cannot_become_a_stop_string(engine, greedy):
    pieces = token_pieces(engine.tokenizer, greedy.tokens)
    never, index = straddling_stop(pieces, 10, tail="\x00")  # its first two characters do appear
    assert never[:2] in greedy.text and never not in greedy.text
    streamed: dict[int, list[str]] = {}
    result = generate_one(engine, PROMPT, SamplingParams(max_new_tokens=48, stop=[never]),
                          on_text=collect_stream(streamed))
    assert result.finish_reason == "length" and result.tokens == greedy.tokens
    assert "".join(streamed[0]) == greedy.text
    # The two characters were held back, then streamed at the start of the next piece.
    assert streamed[0] != [piece for piece in pieces if piece]
    assert any(piece.startswith(never[:2]) for piece in streamed[0])


# ---------------------------------------------------------------------------------------------------
# Prefill in chunks.


def test_prefill_in_small_chunks_gives_the_same_tokens(checkpoint, engine):
    chunked = Engine(load_model(checkpoint, dtype=torch.float32), engine.tokenizer, max_batch_size=2,
                     max_seq_len=MAX_SEQ_LEN, prefill_chunk=4)
    vocab = engine.model.args.vocab_size
    prompts = [random_prompt(30, 7, vocab), random_prompt(7, 8, vocab)]
    params = [SamplingParams(max_new_tokens=16), SamplingParams(max_new_tokens=12, temperature=0.7, seed=4)]
    expected = [generate_one(engine, prompt, p).tokens for prompt, p in zip(prompts, params, strict=True)]
    assert [generate_one(chunked, prompts[0], params[0]).tokens] == expected[:1]
    assert [r.tokens for r in chunked.generate(prompts, params)] == expected


# ---------------------------------------------------------------------------------------------------
# Requests the engine refuses.


def test_prompt_plus_max_new_tokens_past_the_context_is_refused_naming_both(engine):
    prompt = random_prompt(150, 9, engine.model.args.vocab_size)
    with pytest.raises(GenerationError, match=r"prompt has 150 tokens and max_new_tokens is 20.*170.*160"):
        generate_one(engine, prompt, SamplingParams(max_new_tokens=20))
    assert len(generate_one(engine, prompt, SamplingParams(max_new_tokens=10)).tokens) == 10  # 160 fits


def test_empty_prompt_is_refused(engine):
    with pytest.raises(GenerationError, match="empty"):
        generate_one(engine, [], SamplingParams(max_new_tokens=4))


def test_a_prompt_string_is_one_prompt_and_one_settings_object_serves_every_prompt(engine, greedy):
    # A string was taken as a sequence of one-character prompts: "Hi" with two settings ran "H" and "i".
    with pytest.raises(GenerationError, match="got 1 prompts and 2 settings"):
        engine.generate("Hi", [SamplingParams(max_new_tokens=2)] * 2)
    (alone,) = engine.generate(PROMPT, SamplingParams(max_new_tokens=8))
    assert alone.tokens == greedy.tokens[:8]
    both = engine.generate([PROMPT, "def f"], SamplingParams(max_new_tokens=6))
    assert [r.tokens for r in both] == [r.tokens for r in engine.generate([PROMPT, "def f"],
                                                                            [SamplingParams(max_new_tokens=6)] * 2)]


def test_more_prompts_than_max_batch_size_are_refused(engine):
    with pytest.raises(GenerationError, match=f"1 to {MAX_BATCH} prompts"):
        engine.generate([PROMPT] * (MAX_BATCH + 1), [SamplingParams(max_new_tokens=2)] * (MAX_BATCH + 1))
    with pytest.raises(GenerationError, match="one settings object each"):
        engine.generate([PROMPT, PROMPT], [SamplingParams(max_new_tokens=2)])


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=4, temperature=-0.1),
    SamplingParams(max_new_tokens=4, temperature=0.8, top_p=0.0),
    SamplingParams(max_new_tokens=4, temperature=0.8, top_p=1.5),
    SamplingParams(max_new_tokens=4, temperature=0.8, top_k=-2),
    SamplingParams(max_new_tokens=0),
    SamplingParams(max_new_tokens=4, stop=("",)),
], ids=["negative_temperature", "top_p_zero", "top_p_above_one", "top_k_minus_two", "no_new_tokens", "empty_stop"])
def test_bad_sampling_settings_are_refused(engine, params):
    with pytest.raises(GenerationError):
        generate_one(engine, PROMPT, params)


@pytest.mark.parametrize(("params", "field"), [
    (SamplingParams(max_new_tokens=4, temperature=float("nan")), "temperature"),
    (SamplingParams(max_new_tokens=4, temperature=float("inf")), "temperature"),
    (SamplingParams(max_new_tokens=4, temperature=True), "temperature"),
    (SamplingParams(max_new_tokens=4, temperature="0.5"), "temperature"),
    (SamplingParams(max_new_tokens=4, temperature=0.8, top_p=float("nan")), "top_p"),
    (SamplingParams(max_new_tokens=5.5), "max_new_tokens"),
    (SamplingParams(max_new_tokens=True), "max_new_tokens"),
    (SamplingParams(max_new_tokens=4, temperature=0.8, top_k=2.5), "top_k"),
    (SamplingParams(max_new_tokens=4, temperature=0.8, top_k=-2), "top_k"),
    (SamplingParams(max_new_tokens=4, temperature=0.8, seed=1.5), "seed"),
    (SamplingParams(max_new_tokens=4, stop=[7]), "stop"),
], ids=["nan_temperature", "inf_temperature", "bool_temperature", "str_temperature", "nan_top_p",
        "fractional_max_new_tokens", "bool_max_new_tokens", "fractional_top_k", "negative_top_k", "fractional_seed",
        "int_stop"])
def test_settings_of_the_wrong_kind_are_refused_naming_the_setting_and_value(engine, params, field):
    """Not silently greedy (NaN temperature), rounded (5.5 tokens gave 6) or truncated (top_k 2.5 gave 2)."""
    with pytest.raises(GenerationError, match=rf"^{field} must .*got "):
        generate_one(engine, PROMPT, params)


def test_a_refused_top_k_is_told_that_0_and_minus_1_mean_no_limit(engine):
    with pytest.raises(GenerationError, match=r"^top_k must .*0, -1 or None for no limit, got -5$"):
        generate_one(engine, PROMPT, SamplingParams(max_new_tokens=4, temperature=0.8, top_k=-5))


def test_a_single_stop_string_is_one_stop_string_not_its_characters(engine, greedy):
    """As in vLLM and OpenAI's API, `stop="..."` is one string; iterated, it would stop at any of its
    characters."""
    pieces = token_pieces(engine.tokenizer, greedy.tokens)
    stop, _ = straddling_stop(pieces, len(pieces) // 2)
    as_string = generate_one(engine, PROMPT, SamplingParams(max_new_tokens=48, stop=stop))
    assert as_string.text == generate_one(engine, PROMPT, SamplingParams(max_new_tokens=48, stop=[stop])).text
    assert as_string.text == greedy.text[:greedy.text.find(stop)]
    unset = generate_one(engine, PROMPT, SamplingParams(max_new_tokens=48, stop=None))
    assert unset.text == greedy.text and unset.finish_reason == "length"


def test_token_ids_outside_the_vocabulary_are_refused(engine):
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        generate_one(engine, [1, engine.model.args.vocab_size], SamplingParams(max_new_tokens=2))


@pytest.mark.parametrize("kwargs", [{"max_seq_len": 0}, {"max_seq_len": -4}, {"max_batch_size": 0}])
def test_an_engine_without_room_is_refused(checkpoint, engine, kwargs):
    # max_seq_len=0 took the default silently, -4 failed inside the KV cache's allocation.
    with pytest.raises(GenerationError, match=f"{next(iter(kwargs))} must be a positive integer"):
        Engine(load_model(checkpoint, dtype=torch.float32), engine.tokenizer, **kwargs)


def test_a_refused_request_leaves_the_engine_usable(engine, greedy):
    with pytest.raises(GenerationError):
        engine.generate([PROMPT, PROMPT], [SamplingParams(max_new_tokens=5), SamplingParams(temperature=-1)])
    assert generate_one(engine, PROMPT, SamplingParams(max_new_tokens=8)).tokens == greedy.tokens[:8]


# ---------------------------------------------------------------------------------------------------
# The command line.


def start_cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-m", "gpt_fast_mixtral.generate", *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=120)
    return process.returncode, stdout, stderr


def test_cli_prints_one_json_object_with_the_generation(checkpoint, engine):
    code, stdout, stderr = finish(start_cli("--checkpoint-path", str(checkpoint), "--prompt", "Hello world",
                                            "--max-new-tokens", "8", "--json"))
    assert code == 0, stderr
    assert len(stdout.strip().splitlines()) == 1
    output = json.loads(stdout)
    tokenizer = engine.tokenizer
    assert output["prompt_tokens"] == tokenizer.encode("Hello world") and output["prompt_tokens"][0] == 1
    assert 1 <= len(output["tokens"]) <= 8
    assert output["finish_reason"] in {"stop", "length"}
    visible = [t for t in output["tokens"] if t != tokenizer.eos_id]
    assert output["text"] == tokenizer.decode(visible, continuation=True)
    assert output["tokens"] == generate_one(engine, "Hello world", SamplingParams(max_new_tokens=8)).tokens


def test_cli_seeded_sampling_prints_the_same_output_twice(checkpoint):
    args = ("--checkpoint-path", str(checkpoint), "--prompt", "Hello world", "--max-new-tokens", "8",
            "--temperature", "0.7", "--seed", "5", "--json")
    first, second = start_cli(*args), start_cli(*args)  # two cores: run them side by side
    (code1, out1, err1), (code2, out2, err2) = finish(first), finish(second)
    assert code1 == code2 == 0, err1 + err2
    keep = ("text", "prompt_tokens", "tokens", "finish_reason")  # timings differ between runs
    one, two = json.loads(out1), json.loads(out2)
    assert {k: one[k] for k in keep} == {k: two[k] for k in keep}


NON_ASCII_PROMPT = "Caf\u00e9 \u2713 Hello"


def test_cli_text_output_to_an_ascii_stdout_escapes_what_it_cannot_encode(checkpoint, engine):
    """PYTHONIOENCODING=ascii: the prompt's \u00e9 raised UnicodeEncodeError as it was echoed."""
    text = generate_one(engine, NON_ASCII_PROMPT, SamplingParams(max_new_tokens=8)).text
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt_fast_mixtral.generate", "--checkpoint-path", str(checkpoint), "--prompt",
         NON_ASCII_PROMPT, "--max-new-tokens", "8"], cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONIOENCODING": "ascii"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr.decode(errors="replace")
    assert stdout == (NON_ASCII_PROMPT + text + "\n").encode("ascii", "backslashreplace")
    assert stdout.startswith(b"Caf\\xe9 \\u2713 Hello")


def test_cli_text_output_keeps_what_a_latin_1_stdout_can_encode(capsys, checkpoint, engine, monkeypatch):
    from gpt_fast_mixtral.generate import main

    text = generate_one(engine, NON_ASCII_PROMPT, SamplingParams(max_new_tokens=8)).text
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="latin-1", write_through=True))
    code = main(["--checkpoint-path", str(checkpoint), "--prompt", NON_ASCII_PROMPT, "--max-new-tokens", "8"])
    assert code == 0, capsys.readouterr().err
    assert raw.getvalue() == (NON_ASCII_PROMPT + text + "\n").encode("latin-1", "backslashreplace")
    assert raw.getvalue().startswith("Caf\u00e9 \\u2713 Hello".encode("latin-1"))


def test_cli_json_output_to_an_ascii_stdout_is_unchanged(capsys, checkpoint, monkeypatch):
    from gpt_fast_mixtral.generate import main

    args = ["--checkpoint-path", str(checkpoint), "--prompt", NON_ASCII_PROMPT, "--max-new-tokens", "8", "--json"]
    assert main(args) == 0
    expected = capsys.readouterr().out
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="ascii", write_through=True))
    assert main(args) == 0
    got = json.loads(raw.getvalue().decode("ascii"))
    keep = ("text", "prompt_tokens", "tokens", "finish_reason")
    assert {k: got[k] for k in keep} == {k: json.loads(expected)[k] for k in keep}


def test_cli_missing_checkpoint_exits_with_a_one_line_error(tmp_path):
    code, stdout, stderr = finish(start_cli("--checkpoint-path", str(tmp_path / "nowhere" / "model.pth"),
                                            "--prompt", "Hello", "--json"))
    assert code != 0
    assert stdout == ""
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "nowhere" in lines[0]


@pytest.fixture(scope="module")
def damaged_checkpoint(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model.pth that cannot be loaded, beside a good config.json and tokenizer.model: an argument
    error reported with it was found before the (for Mixtral, minutes long) load."""
    directory = tmp_path_factory.mktemp("damaged")
    for name in ("config.json", "tokenizer.model"):
        (directory / name).write_bytes((checkpoint.parent / name).read_bytes())
    (directory / "model.pth").write_bytes(b"not a checkpoint" * 64)
    return directory / "model.pth"


def run_main(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """The command line in this process (no torch import to wait for): exit status, stdout, stderr."""
    from gpt_fast_mixtral.generate import main

    try:
        code = main(list(args))
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(code: int, stdout: str, stderr: str) -> str:
    assert code == 2, stderr
    assert stdout == "", "nothing (not even the prompt) is printed before the error"
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.mark.parametrize(("args", "message"), [
    (("--max-new-tokens", "0"), "max_new_tokens must be an integer >= 1, got 0"),
    (("--temperature", "-1"), "temperature must be"),
    (("--temperature", "nan"), r"temperature must be a finite number >= 0 .*got nan"),
    (("--top-p", "0"), "top_p must be"),
    (("--top-k", "-2"), "top_k must be an integer >= 1, or 0, -1 or None for no limit, got -2"),
    (("--stop", ""), "stop must be non-empty strings"),
    (("--seed", "-1"), rf"seed must be an integer from 0 to {2**63 - 1} .*got -1$"),
    (("--seed", str(2**63)), rf"seed must be an integer from 0 to {2**63 - 1} .*got {2**63}$"),
    (("--max-new-tokens", "2000"), r"max_new_tokens is 2000: \d+ exceeds the context of 1024 tokens"),
    (("--max-new-tokens", "20", "--max-seq-len", "10"), "exceeds the context of 10 tokens"),
    (("--max-seq-len", "5000"), "--max-seq-len 5000 exceeds the model's context of 1024"),
], ids=["max_new_tokens", "temperature", "nan_temperature", "top_p", "top_k", "empty_stop", "negative_seed",
        "seed_past_63_bits", "past_the_model",
        "past_max_seq_len", "max_seq_len_past_the_model"])
@pytest.mark.parametrize("output", ["text", "json"])
def test_cli_bad_arguments_are_reported_before_the_model_loads_and_before_any_output(
        capsys, damaged_checkpoint, args, message, output):
    extra = ("--json",) if output == "json" else ()
    line = one_error_line(*run_main(capsys, "--checkpoint-path", str(damaged_checkpoint), "--prompt", "Hello world",
                                    *args, *extra))
    assert re.search(message, line) and "cannot read" not in line


def test_cli_top_k_zero_or_minus_one_samples_as_without_top_k(capsys, checkpoint):
    def output(*extra: str) -> dict:
        code, stdout, stderr = run_main(capsys, "--checkpoint-path", str(checkpoint), "--prompt", PROMPT,
                                        "--max-new-tokens", "12", "--temperature", "1.0", "--seed", "9", "--json",
                                        *extra)
        assert code == 0, stderr
        return json.loads(stdout)["tokens"]

    unlimited = output()
    assert output("--top-k", "0") == output("--top-k", "-1") == unlimited != output("--top-k", "1")


def stop_values(*values: str) -> list[str]:
    """The stop strings the command line makes of these --stop values."""
    from gpt_fast_mixtral.generate import _parser

    args = ["--checkpoint-path", "model.pth", "--prompt", "Hi"]
    for value in values:
        args += ["--stop", value]
    return _parser().parse_args(args).stop


@pytest.mark.parametrize(("value", "stop"), [
    (r"\n", "\n"),
    (r"\n\n", "\n\n"),
    (r"a\tb\rc", "a\tb\rc"),
    (r"\\", "\\"),
    (r"\\n", "\\n"),  # an escaped backslash, then a plain n
    (r"\u00e9t\u00C9", "\u00e9t\u00c9"),
    (r"\ud83d\ude00", "\U0001f600"),  # a surrogate pair, as JSON writes characters past U+FFFF
    ("\\x41 \\q \\u12 \\U0001f600 \\N{BULLET} \\0 end\\", "\\x41 \\q \\u12 \\U0001f600 \\N{BULLET} \\0 end\\"),
    ("\u00e9t\u00e9 \u20ac \U0001f600 \u4e2d\n", "\u00e9t\u00e9 \u20ac \U0001f600 \u4e2d\n"),  # as typed
    ("caf\u00e9\\n", "caf\u00e9\n"),  # unicode_escape made the \u00e9 two characters
], ids=["newline", "two_newlines", "tab_and_return", "backslash", "escaped_backslash", "bmp_escape",
        "surrogate_pair", "other_escapes_kept", "non_ascii_kept", "non_ascii_beside_an_escape"])
def test_cli_stop_decodes_the_common_backslash_escapes(value, stop):
    assert stop_values(value) == [stop]


def test_cli_stop_refuses_half_a_surrogate_pair(capsys):
    with pytest.raises(SystemExit) as exit_:
        stop_values(r"a\ud83db")
    assert exit_.value.code == 2
    assert "argument --stop: \\ud83d is half of a UTF-16 surrogate pair" in capsys.readouterr().err


def test_cli_stop_escapes_stop_generation_where_the_character_appears(capsys, checkpoint, engine, greedy):
    """The stop string, every character written as \\uXXXX, cuts the CLI's text as the string itself
    cuts the engine's."""
    pieces = token_pieces(engine.tokenizer, greedy.tokens)
    stop, _ = straddling_stop(pieces, len(pieces) // 2)
    units = stop.encode("utf-16-be")
    escaped = "".join(f"\\u{int.from_bytes(units[i:i + 2], 'big'):04x}" for i in range(0, len(units), 2))
    # the fixture engine's dtype: the CLI's default on a GPU is bfloat16, whose greedy text differs
    code, stdout, stderr = run_main(capsys, "--checkpoint-path", str(checkpoint), "--prompt", PROMPT, "--dtype",
                                    "float32", "--max-new-tokens", "48", "--stop", escaped, "--json")
    assert code == 0, stderr
    output = json.loads(stdout)
    assert output["finish_reason"] == "stop" and output["text"] == greedy.text[:greedy.text.find(stop)]


@pytest.mark.parametrize("value", ["0", "-5"])
def test_cli_max_seq_len_must_be_a_positive_integer(capsys, checkpoint, value):
    code, stdout, stderr = run_main(capsys, "--checkpoint-path", str(checkpoint), "--prompt", "Hi",
                                    "--max-new-tokens", "2", "--max-seq-len", value)
    assert code == 2 and stdout == ""  # 0 was ignored, -5 a traceback
    assert "argument --max-seq-len: must be a positive integer" in stderr.strip().splitlines()[-1]


def test_cli_checkpoint_directory_is_named_as_such(capsys, checkpoint):
    line = one_error_line(*run_main(capsys, "--checkpoint-path", str(checkpoint.parent), "--prompt", "Hi"))
    # It used to look for tokenizer.model in the directory's parent and report that missing.
    assert "is a directory" in line and str(checkpoint) in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_without_a_gpu_exits_with_a_one_line_error(checkpoint):
    code, stdout, stderr = finish(start_cli("--checkpoint-path", str(checkpoint), "--prompt", "Hello",
                                            "--device", "cuda"))
    assert code == 2 and stdout == "" and "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda") and "--device cpu" in lines[0]


def test_greedy_and_sampled_batches_share_one_traced_decode_step(checkpoint: Path) -> None:
    # A server compiles its decode step at start (each compile of the real model takes over a minute):
    # greedy and sampled requests must not need separate graphs, and larger batch sizes share one.
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    engine = Engine.from_checkpoint(checkpoint, dtype=torch.float32, max_batch_size=MAX_BATCH, max_seq_len=64)
    eager = [r.tokens for r in engine.generate([PROMPT, "def f"], [SamplingParams(6)] * 2)]
    torch._dynamo.reset()
    counter = CompileCounter()
    engine._decode = torch.compile(engine._step, backend=counter, fullgraph=True)
    for temperature in (0.0, 0.9):
        engine.generate([PROMPT], [SamplingParams(6, temperature, seed=1)])
    assert counter.frame_count == 1
    assert [r.tokens for r in engine.generate([PROMPT, "def f"], [SamplingParams(6)] * 2)] == eager
    engine.generate([PROMPT] * 3, [SamplingParams(4, 0.9, seed=2)] * 3)
    # Batch 1, then one graph with a dynamic batch size (as long as the experts take the same path:
    # on the CPU, 4 rows of this model switch from gathered to dense experts and compile once more).
    assert counter.frame_count == 2
    torch._dynamo.reset()


def test_attention_modules_read_the_models_current_rope_table() -> None:
    """The decode kernel reads the rotary table through each Attention module (rope_cache_attention takes
    the whole table): the modules must hold the model's table after setup_caches and after .to()."""
    from gpt_fast_mixtral.config import ModelArgs
    from gpt_fast_mixtral.model import Transformer

    args = ModelArgs(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=96,
                     num_experts=5, num_experts_per_tok=2)
    model = Transformer(args)
    assert all(layer.attention.rope_table is None for layer in model.layers)
    model.setup_caches(1, 32)
    assert model.rope.shape == (32, 8, 2)
    for convert in (lambda m: m.to(torch.float64), lambda m: m.float()):
        before = model.rope
        model = convert(model)
        assert model.rope is not before
        assert all(layer.attention.rope_table is model.rope for layer in model.layers)
