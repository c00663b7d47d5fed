"""The sampling functions: filtering keeps the right tokens, and draws follow the filtered distribution."""

from __future__ import annotations

import torch

from recyclegpt.decoding.sampling import SamplingParams, logits_to_probs, sample

LOGITS = torch.tensor([[0.6, 0.3, 0.1]]).log()  # probabilities 0.6, 0.3, 0.1 at temperature 1


def test_greedy_is_one_hot_argmax():
    probs = logits_to_probs(LOGITS, SamplingParams())
    assert probs.tolist() == [[1.0, 0.0, 0.0]]
    assert sample(LOGITS, SamplingParams()).tolist() == [0]


def test_top_k_and_top_p_keep_the_right_tokens():
    p = logits_to_probs(LOGITS, SamplingParams(temperature=1.0, top_k=2))
    torch.testing.assert_close(p, torch.tensor([[2 / 3, 1 / 3, 0.0]]))
    # nucleus: the smallest set whose mass reaches top_p
    assert (logits_to_probs(LOGITS, SamplingParams(temperature=1.0, top_p=0.5)) > 0).tolist() == [[True, False, False]]
    assert (logits_to_probs(LOGITS, SamplingParams(temperature=1.0, top_p=0.8)) > 0).tolist() == [[True, True, False]]
    assert (logits_to_probs(LOGITS, SamplingParams(temperature=1.0, top_p=1.0)) > 0).all()


def test_temperature_sharpens_and_flattens():
    cold = logits_to_probs(LOGITS, SamplingParams(temperature=0.5))
    hot = logits_to_probs(LOGITS, SamplingParams(temperature=2.0))
    assert cold[0, 0] > 0.6 > hot[0, 0]
    torch.testing.assert_close(cold.sum(-1), torch.ones(1))


def test_draws_follow_the_distribution_and_repeat_with_a_seed():
    params = SamplingParams(temperature=1.0, seed=7)
    n = 20_000
    draws = sample(LOGITS.expand(n, 3), params, params.generator("cpu"))
    freq = torch.bincount(draws, minlength=3).float() / n
    # three standard errors of a binomial proportion at n = 20000 are below 0.011
    torch.testing.assert_close(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.011, rtol=0)
    again = sample(LOGITS.expand(n, 3), params, params.generator("cpu"))
    assert torch.equal(draws, again)
