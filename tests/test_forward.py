"""The learner's forward (``learners/forward.py``): logits at model tokens only give what logits everywhere give.

In a search episode most response tokens are ``<information>`` (loss mask 0). The learner runs the LM head only at
the tokens the loss keeps; these tests hold that to the full computation (logits at every response position, then
masked): the same logprobs where the mask is 1, the same loss and entropy, the same gradient, with shared prompts and
without.
"""

from __future__ import annotations

import pytest
import torch

from learners.batch import LearnerSample
from learners.forward import (
    collate,
    logprobs_of,
    model_token_logprobs,
    on_model_tokens,
    response_logits,
    token_logprobs,
)
from learners.losses import entropy_from_logits


def _episode_batch(shared: bool) -> list[LearnerSample]:
    """Three search episodes: model turns (mask 1) around observation blocks (mask 0) of different lengths."""
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(100, 4000, (6,), generator=g).tolist()
    samples = []
    for k, (turn1, obs, turn2) in enumerate([(3, 5, 4), (2, 7, 2), (4, 3, 3)]):
        own_prompt = prompt if shared else prompt[k:] + prompt[:k]
        response = torch.randint(100, 4000, (turn1 + obs + turn2,), generator=g).tolist()
        samples.append(LearnerSample(own_prompt + response, len(own_prompt), [1] * turn1 + [0] * obs + [1] * turn2))
    return samples


@pytest.fixture(scope="module")
def model(tiny_llama_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32)


def _loss_and_grad(model, loss_fn) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("shared", [False, True])
def test_logits_at_model_tokens_give_the_full_computations_logprobs_loss_and_gradient(model, shared):
    mb = collate(_episode_batch(shared), torch.device("cpu"), shared_prompt=shared)
    assert mb.shared_prompt == shared
    mask = mb.loss_mask
    advantages = torch.linspace(-1.0, 1.0, mask.numel()).reshape(mask.shape)

    def full():
        logits = response_logits(model, mb)
        logp = token_logprobs(logits, mb.targets)
        per_token = -advantages * logp - 0.01 * entropy_from_logits(logits)
        return (per_token * mask).sum() / mask.sum()

    def model_tokens():
        logp, logits = model_token_logprobs(model, mb)
        per_token = -advantages * logp - 0.01 * on_model_tokens(entropy_from_logits(logits), mask)
        return (per_token * mask).sum() / mask.sum()

    loss_full, grad_full = _loss_and_grad(model, full)
    loss_kept, grad_kept = _loss_and_grad(model, model_tokens)
    assert loss_kept == pytest.approx(loss_full, rel=1e-6)
    assert grad_kept.keys() == grad_full.keys()
    for name in grad_full:
        torch.testing.assert_close(grad_kept[name], grad_full[name], rtol=1e-5, atol=1e-7, msg=name)

    with torch.no_grad():
        everywhere = token_logprobs(response_logits(model, mb), mb.targets)
        kept = logprobs_of(model, mb)
    torch.testing.assert_close(kept[mask], everywhere[mask], rtol=1e-6, atol=1e-6)
    assert (kept[~mask] == 0).all()  # observation tokens get no logits at all
    assert mask.sum() < mb.valid.sum()  # the batch does hold masked-out tokens


def test_on_model_tokens_places_values_row_by_row_and_passes_gradients_back():
    mask = torch.tensor([[True, False, True], [False, True, False]])
    values = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    placed = on_model_tokens(values, mask)
    assert placed.tolist() == [[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]]
    (placed * torch.tensor([[1.0, 9.0, 2.0], [9.0, 3.0, 9.0]])).sum().backward()
    assert values.grad.tolist() == [1.0, 2.0, 3.0]
