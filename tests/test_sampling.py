"""sample() and uniform_noise(): the right distribution, the right support, and draws that depend only on
(seed, step, token id) -- never on the rest of the batch."""

import math

import pytest
import torch

from gpt_fast_mixtral.sampling import SamplingTensors, sample, uniform_noise

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
DRAWS = 20_000
# The standard error of a frequency is at most sqrt(0.25 / DRAWS) = 0.0035; this is more than 4 of them.
FREQUENCY_TOLERANCE = 0.015


def settings(rows: int, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
             seeds: torch.Tensor | None = None, vocab_size: int = 5) -> SamplingTensors:
    return SamplingTensors(
        temperature=torch.full((rows,), temperature),
        top_k=torch.full((rows,), top_k or vocab_size, dtype=torch.int64),
        top_p=torch.full((rows,), top_p),
        seed=torch.arange(rows, dtype=torch.int64) if seeds is None else seeds,
    )


def draw(logits: torch.Tensor, rows: int = DRAWS, steps: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """One draw per row from the same logits, every row with its own seed (0, 1, 2, ...)."""
    steps = torch.zeros(rows, dtype=torch.int64) if steps is None else steps
    return sample(logits.expand(rows, -1), settings(rows, vocab_size=logits.shape[-1], **kwargs), steps)


def frequencies(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab_size).float() / len(tokens)


# ---------------------------------------------------------------------------------------------------
# The distribution.


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_frequencies_across_seeds_match_softmax_of_logits_over_temperature(temperature):
    observed = frequencies(draw(LOGITS, temperature=temperature), 5)
    expected = torch.softmax(LOGITS / temperature, dim=-1)
    assert (observed - expected).abs().max() < FREQUENCY_TOLERANCE, (observed, expected)


def test_frequencies_across_steps_of_one_seed_match_softmax():
    steps = torch.arange(DRAWS)
    observed = frequencies(draw(LOGITS, steps=steps, seeds=torch.full((DRAWS,), 1234)), 5)
    assert (observed - torch.softmax(LOGITS, dim=-1)).abs().max() < FREQUENCY_TOLERANCE


def test_top_k_keeps_only_the_k_best_tokens_and_renormalises():
    logits = torch.tensor([0.5, 2.0, -1.0, 1.0, 0.0])  # the two best are tokens 1 and 3
    observed = frequencies(draw(logits, top_k=2), 5)
    kept = torch.tensor([1, 3])
    expected = torch.zeros(5)
    expected[kept] = torch.softmax(logits[kept], dim=-1)
    assert set(observed.nonzero().flatten().tolist()) == {1, 3}
    assert (observed - expected).abs().max() < FREQUENCY_TOLERANCE


# Probabilities 1/2, 1/4, 1/8, 1/16, 1/16 (exact in float32), scattered over the ids so that the kept set
# is found by sorting, not by position: token 3 is the most likely, then 0, then 4, then 1 and 2.
DYADIC_LOGITS = torch.tensor([3.0, 1.0, 1.0, 4.0, 2.0]) * math.log(2.0)


@pytest.mark.parametrize(("top_p", "kept"), [
    (0.3, {3}),  # the most likely token always stays, even when it alone exceeds top_p
    (0.5, {3}),  # exactly reached by the first token
    (0.5001, {3, 0}),
    (0.75, {3, 0}),  # the boundary: 1/2 + 1/4 reaches 0.75, so token 4 is not needed
    (0.7501, {3, 0, 4}),
    (0.875, {3, 0, 4}),
    (0.9375, {3, 0, 4, "one of 1 and 2"}),  # they tie: the prefix takes one of them
    (0.9376, {3, 0, 4, 1, 2}),
    (1.0, {3, 0, 4, 1, 2}),
])
def test_top_p_keeps_the_smallest_prefix_whose_mass_reaches_p(top_p, kept):
    probs = torch.softmax(DYADIC_LOGITS, dim=-1)
    assert probs.tolist() == [0.25, 0.0625, 0.0625, 0.5, 0.125]  # the premise: exact masses
    observed = set(draw(DYADIC_LOGITS, rows=4000, top_p=top_p).tolist())
    if "one of 1 and 2" in kept:
        assert observed in ({3, 0, 4, 1}, {3, 0, 4, 2})
    else:
        assert observed == kept


def test_top_p_renormalises_over_the_kept_tokens():
    observed = frequencies(draw(DYADIC_LOGITS, top_p=0.8), 5)
    expected = torch.tensor([0.25, 0.0, 0.0, 0.5, 0.125]) / 0.875
    assert (observed - expected).abs().max() < FREQUENCY_TOLERANCE


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    # top_k=2 leaves 2/3 and 1/3; top_p=0.6 is reached by the first alone (of the unfiltered 1/2, 1/4, ...
    # it would take two).
    assert set(draw(DYADIC_LOGITS, rows=4000, top_p=0.6).tolist()) == {3, 0}
    assert set(draw(DYADIC_LOGITS, rows=4000, top_k=2).tolist()) == {3, 0}
    assert set(draw(DYADIC_LOGITS, rows=4000, top_k=2, top_p=0.6).tolist()) == {3}


def test_top_p_applies_after_temperature():
    # At temperature 2 the masses are flatter (0.34, 0.24, 0.17, 0.12, 0.12), so 0.75 needs three tokens.
    assert set(draw(DYADIC_LOGITS, rows=4000, top_p=0.75, temperature=2.0).tolist()) == {3, 0, 4}


def test_temperature_zero_is_argmax_whatever_the_seed_and_filters():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(256, 1000, generator=generator)
    seeds = torch.randint(0, 2**62, (256,), generator=generator)
    for top_k, top_p in [(None, 1.0), (5, 0.5)]:
        tokens = sample(logits, settings(256, temperature=0.0, top_k=top_k, top_p=top_p, seeds=seeds,
                                         vocab_size=1000), torch.arange(256))
        assert torch.equal(tokens, logits.argmax(dim=-1))


def test_top_k_one_is_argmax_for_every_seed_and_token():
    """A filtered-out token must never be drawn, however large its noise; this sweeps 16M (seed, token)
    pairs, enough to contain the largest noise value the hash produces."""
    vocab, rows = 4096, 512
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(1))
    for first_seed in range(0, 4096, rows):
        seeds = torch.arange(first_seed, first_seed + rows)
        tokens = sample(logits, settings(rows, top_k=1, seeds=seeds, vocab_size=vocab),
                        torch.zeros(rows, dtype=torch.int64))
        assert torch.equal(tokens, logits.argmax(dim=-1)), f"seeds {first_seed}..{first_seed + rows - 1}"


# ---------------------------------------------------------------------------------------------------
# Determinism and independence from the batch.


def mixed_batch() -> tuple[torch.Tensor, SamplingTensors, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    rows, vocab = 6, 300
    logits = torch.randn(rows, vocab, generator=generator) * 2
    settings_ = SamplingTensors(
        temperature=torch.tensor([0.8, 1.0, 0.0, 1.5, 0.7, 1.0]),
        top_k=torch.tensor([vocab, 20, vocab, 50, vocab, 3]),
        top_p=torch.tensor([1.0, 0.9, 1.0, 0.95, 0.5, 1.0]),
        seed=torch.tensor([5, 5, 7, 2**40 + 3, 0, 123456789]),
    )
    return logits, settings_, torch.tensor([0, 3, 1, 17, 2, 9])


def select(settings_: SamplingTensors, index: torch.Tensor) -> SamplingTensors:
    return SamplingTensors(settings_.temperature[index], settings_.top_k[index], settings_.top_p[index],
                           settings_.seed[index])


def test_same_seed_and_step_give_the_same_token():
    logits, settings_, steps = mixed_batch()
    assert torch.equal(sample(logits, settings_, steps), sample(logits, settings_, steps))


def test_a_rows_draw_does_not_depend_on_the_other_rows():
    logits, settings_, steps = mixed_batch()
    together = sample(logits, settings_, steps)
    for row in range(len(steps)):
        index = torch.tensor([row])
        alone = sample(logits[index], select(settings_, index), steps[index])
        assert alone.item() == together[row].item(), f"row {row}"
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled = sample(logits[order], select(settings_, order), steps[order])
    assert torch.equal(shuffled, together[order])


def test_different_steps_and_seeds_give_different_draws():
    flat = torch.zeros(1000)
    by_step = draw(flat, rows=200, steps=torch.arange(200), seeds=torch.full((200,), 9), top_k=None)
    by_seed = draw(flat, rows=200)
    assert len(set(by_step.tolist())) > 150
    assert len(set(by_seed.tolist())) > 150


# ---------------------------------------------------------------------------------------------------
# The noise itself.


def test_uniform_noise_lies_strictly_between_zero_and_one():
    """Swept over 16M (seed, token) pairs: a value of exactly 1.0 would make that token's Gumbel noise +inf."""
    vocab, rows = 4096, 512
    for first_seed in range(0, 4096, rows):
        noise = uniform_noise(torch.arange(first_seed, first_seed + rows), torch.zeros(rows, dtype=torch.int64),
                              vocab)
        assert noise.dtype == torch.float32 and noise.shape == (rows, vocab)
        assert noise.min() > 0.0 and noise.max() < 1.0, f"seeds {first_seed}..{first_seed + rows - 1}"


def test_uniform_noise_looks_uniform():
    noise = uniform_noise(torch.full((10_000,), 42), torch.arange(10_000), 64).double()
    assert abs(noise.mean().item() - 0.5) < 0.002  # standard error 0.00036
    assert abs(noise.var().item() - 1 / 12) < 0.001
    deciles = torch.histc(noise, bins=10, min=0.0, max=1.0) / noise.numel()
    assert (deciles - 0.1).abs().max() < 0.003  # standard error 0.00038
    # Neighbouring tokens and neighbouring steps are uncorrelated.
    centred = noise - 0.5
    assert abs((centred[:, 1:] * centred[:, :-1]).mean().item()) < 0.001
    assert abs((centred[1:] * centred[:-1]).mean().item()) < 0.001


def test_uniform_noise_never_repeats_a_row_across_steps_or_seeds():
    steps = torch.arange(20_000)
    by_step = uniform_noise(torch.full((20_000,), 7), steps, 8)
    by_seed = uniform_noise(torch.arange(20_000), torch.zeros(20_000, dtype=torch.int64), 8)
    assert len({tuple(row) for row in by_step.tolist()}) == 20_000
    assert len({tuple(row) for row in by_seed.tolist()}) == 20_000


def test_uniform_noise_uses_the_high_bits_of_the_seed():
    seeds = torch.tensor([3, 3 + 2**32, 3 + 2**40, 3 + 2**61])
    noise = uniform_noise(seeds, torch.zeros(4, dtype=torch.int64), 16)
    assert len({tuple(row) for row in noise.tolist()}) == 4


def test_uniform_noise_is_a_pure_function_of_seed_step_and_token():
    seeds, steps = torch.tensor([11, 12, 13]), torch.tensor([0, 5, 5])
    noise = uniform_noise(seeds, steps, 100)
    assert torch.equal(noise, uniform_noise(seeds, steps, 100))
    assert torch.equal(uniform_noise(seeds[1:2], steps[1:2], 100)[0], noise[1])
    assert torch.equal(uniform_noise(seeds, steps, 40), noise[:, :40])  # a token's number ignores vocab size
