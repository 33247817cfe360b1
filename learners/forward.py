"""The learner's forward pass: samples → right-padded micro-batches → logits at model tokens → token logprobs.

Shared by every learner role (policy update, reference and old-logprob passes, critic values, SFT). A micro-batch plan
either packs samples by length or puts the samples of one prompt together, so that the prompt is computed once
(``shared_prompt_hidden``); ``compute_per_token`` runs a no-gradient pass over any plan, in input order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from learners import distributed as D
from learners.batch import LearnerSample
from learners.micro_batching import SharedPromptPlan, pack_by_token_budget, pack_prompt_groups


@dataclass
class MicroBatch:
    """Right-padded tensors of a few samples, with per-response-token tensors of shape ``[B, R]``.

    ``positions[b, t]`` is the logit position that predicts response token ``t`` of row ``b`` (``prompt_len + t − 1``);
    ``valid`` is 1 on real response tokens, ``loss_mask`` is the sample's mask and 0 on padding.
    """

    input_ids: Tensor
    attention_mask: Tensor
    positions: Tensor
    targets: Tensor
    valid: Tensor
    loss_mask: Tensor
    advantages: Tensor
    old_logprobs: Tensor
    has_old: Tensor  # [B, 1] bool: the sample carries old_logprobs
    ref_logprobs: Tensor
    has_ref: Tensor  # [B, 1] bool
    rollout_logprobs: Tensor
    has_rollout: Tensor  # [B, 1] bool: old_logprobs were recomputed and the engine's are kept apart (TIS)
    returns: Tensor  # PPO critic targets
    old_values: Tensor  # the critic's values when GAE ran
    response_lens: list[int]
    shared_prompt: bool = False  # every row has the same prompt, computed once (``shared_prompt_hidden``)


def pad_rows(rows: Sequence[Sequence[float]], width: int, dtype: torch.dtype = torch.float32,
             dev: torch.device | str = "cpu") -> Tensor:
    """Ragged per-token rows as one ``[len(rows), width]`` tensor, zero-padded on the right."""
    out = torch.zeros(len(rows), width, dtype=dtype)
    for i, row in enumerate(rows):
        if len(row):
            out[i, : len(row)] = torch.tensor(list(row), dtype=dtype)
    return out.to(dev)


def collate(samples: Sequence[LearnerSample], dev: torch.device, pad_id: int = 0,
            shared_prompt: bool = False) -> MicroBatch:
    """Stack samples, right-padded: pads sit after every real token, so causal attention never sees them.
    ``shared_prompt``: the samples have one prompt (a plan's shared micro-batch), which the forward computes once."""
    for s in samples:
        if s.prompt_len < 1:
            raise ValueError("a sample needs at least one prompt token (the first response token is predicted from it)")
    if shared_prompt and len({tuple(s.input_ids[:s.prompt_len]) for s in samples}) != 1:
        raise ValueError("a shared-prompt micro-batch needs samples with one and the same prompt")
    width = max(len(s.input_ids) for s in samples)
    resp = [s.response_len for s in samples]
    r_width = max(resp)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attention = torch.zeros(len(samples), width, dtype=torch.long)
    positions = torch.zeros(len(samples), r_width, dtype=torch.long)
    for i, s in enumerate(samples):
        input_ids[i, : len(s.input_ids)] = torch.tensor(s.input_ids, dtype=torch.long)
        attention[i, : len(s.input_ids)] = 1
        positions[i, : resp[i]] = torch.arange(s.prompt_len - 1, s.prompt_len - 1 + resp[i])
    targets = torch.zeros(len(samples), r_width, dtype=torch.long)
    for i, s in enumerate(samples):
        targets[i, : resp[i]] = input_ids[i, s.prompt_len: s.prompt_len + resp[i]]
    valid = pad_rows([[1] * n for n in resp], r_width, torch.bool, dev)
    loss_mask = pad_rows([s.loss_mask or [1] * s.response_len for s in samples], r_width, torch.bool, dev) & valid
    return MicroBatch(
        input_ids=input_ids.to(dev),
        attention_mask=attention.to(dev),
        positions=positions.to(dev),
        targets=targets.to(dev),
        valid=valid,
        loss_mask=loss_mask,
        advantages=pad_rows([s.advantages for s in samples], r_width, torch.float32, dev),
        old_logprobs=pad_rows([s.old_logprobs for s in samples], r_width, torch.float32, dev),
        has_old=torch.tensor([[bool(s.old_logprobs)] for s in samples], device=dev),
        ref_logprobs=pad_rows([s.ref_logprobs for s in samples], r_width, torch.float32, dev),
        has_ref=torch.tensor([[bool(s.ref_logprobs)] for s in samples], device=dev),
        rollout_logprobs=pad_rows([s.rollout_logprobs for s in samples], r_width, torch.float32, dev),
        has_rollout=torch.tensor([[bool(s.rollout_logprobs)] for s in samples], device=dev),
        returns=pad_rows([s.returns for s in samples], r_width, torch.float32, dev),
        old_values=pad_rows([s.old_values for s in samples], r_width, torch.float32, dev),
        response_lens=resp,
        shared_prompt=shared_prompt and len(samples) > 1,
    )


def final_hidden(model: Callable, **inputs) -> Tensor:
    """The model's last hidden states (after its final norm), ``[B, T, H]``, with no logits computed but one position's.

    Through the model's own forward (a DeepSpeed engine's too), so that every hook of the engine runs as it does for
    logits; ``hidden_states[-1]`` of a Hugging Face causal LM is the normed state its LM head reads. The other layers'
    states are held until the forward returns, which a no-gradient pass would otherwise free early: far less than the
    ``[B, R, V]`` logits it no longer makes.
    """
    return model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]


def response_hidden(model: Callable, mb: MicroBatch) -> Tensor:
    """The hidden states ``[B, R, H]`` at the positions that predict each response token, so that the LM head runs
    only where a token is predicted, never at a prompt position. Rows that share their prompt compute it once
    (``shared_prompt_hidden``).
    """
    if mb.shared_prompt:
        return shared_prompt_hidden(model, mb)
    hidden = final_hidden(model, input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False)
    index = mb.positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, index)


def shared_prompt_hidden(model: Callable, mb: MicroBatch) -> Tensor:
    """``response_hidden`` for rows that share their prompt: the prompt is computed once, and every row's response
    attends to that one key/value cache, repeated per row.

    The cache stays in the autograd graph, so the gradients of all the rows' responses flow back into the one prompt
    forward: the loss and its gradient are the unshared computation's, for ``p + B·R`` tokens of compute instead of
    ``B·(p + R)``. The first response token is predicted by the prompt's last position, the others by the response's
    own positions.
    """
    rows, width = mb.input_ids.shape
    prompt_len = int(mb.positions[0, 0]) + 1
    prompt = model(input_ids=mb.input_ids[:1, :prompt_len], use_cache=True, output_hidden_states=True,
                   logits_to_keep=1)
    cache = prompt.past_key_values
    cache.batch_repeat_interleave(rows)
    responses = mb.input_ids[:, prompt_len:]
    positions = torch.arange(prompt_len, width, device=responses.device).expand(rows, -1)
    rest = final_hidden(model, input_ids=responses, attention_mask=mb.attention_mask, position_ids=positions,
                        past_key_values=cache, use_cache=True)
    first = prompt.hidden_states[-1][:, -1:].expand(rows, 1, -1)
    return torch.cat([first, rest[:, :-1]], dim=1)


def lm_head(model: Callable) -> Callable:
    """The output projection of a Hugging Face model, or of the one a DeepSpeed engine wraps."""
    return getattr(model, "module", model).get_output_embeddings()


def response_logits(model: Callable, mb: MicroBatch) -> Tensor:
    """fp32 logits ``[B, R, V]`` at the positions that predict each response token."""
    return lm_head(model)(response_hidden(model, mb)).float()


def model_token_logits(model: Callable, mb: MicroBatch) -> Tensor:
    """fp32 logits ``[N, V]`` at the N response positions the loss keeps (``mb.loss_mask``), row by row.

    In a search episode most response tokens are ``<information>`` the loss masks out; over a 49k-152k vocabulary,
    the LM head, the softmax and their gradients at those positions would cost the learner much of its time and memory
    for nothing. ``on_model_tokens`` puts per-token values back in ``[B, R]`` form.
    """
    return lm_head(model)(response_hidden(model, mb)[mb.loss_mask]).float()


def on_model_tokens(values: Tensor, mask: Tensor) -> Tensor:
    """``[N]`` values of the masked-in tokens as ``[B, R]``, 0 where ``mask`` is 0; gradients flow to ``values``."""
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log π(target) per position: ``[B, R]`` from ``[B, R, V]`` logits, or ``[N]`` from ``[N, V]``."""
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def model_token_logprobs(model: Callable, mb: MicroBatch) -> tuple[Tensor, Tensor]:
    """log π(token | prefix) ``[B, R]`` on the tokens the loss keeps (0 elsewhere), and those tokens' logits
    ``[N, V]`` (for the entropy)."""
    logits = model_token_logits(model, mb)
    return on_model_tokens(token_logprobs(logits, mb.targets[mb.loss_mask]), mb.loss_mask), logits


def plan_micro_batches(samples: Sequence[LearnerSample], token_budget: int,
                       share_prompts: bool = False) -> SharedPromptPlan:
    """Micro-batches under ``token_budget``: the samples of one prompt together, sharing its forward, when
    ``share_prompts`` (``pack_prompt_groups``); else packed by length alone (no micro-batch shared)."""
    if share_prompts:
        return pack_prompt_groups([tuple(s.input_ids[:s.prompt_len]) for s in samples],
                                  [s.prompt_len for s in samples], [s.response_len for s in samples], token_budget)
    plan = pack_by_token_budget([len(s.input_ids) for s in samples], token_budget)
    return SharedPromptPlan(plan.batches, plan.real_tokens, plan.padded_tokens, shared=[False] * len(plan.batches))


def aligned_plan(samples: Sequence[LearnerSample], token_budget: int, share_prompts: bool = False
                 ) -> tuple[SharedPromptPlan, int]:
    """The local packing plan and how many micro-batches EVERY rank must run (the max over ranks)."""
    plan = plan_micro_batches(samples, token_budget, share_prompts)
    return plan, int(D.all_reduce_max(len(plan.batches)))


def logprobs_of(model: Callable, mb: MicroBatch) -> Tensor:
    """log π(token | prefix) of the response tokens the loss keeps, ``[B, R]``; 0 on the ones it masks out
    (``<information>``), whose logprobs no loss, KL or advantage reads."""
    return model_token_logprobs(model, mb)[0]


@torch.no_grad()
def compute_per_token(model: Callable, samples: Sequence[LearnerSample], token_budget: int, dev: torch.device,
                      pad_id: int = 0, align_ranks: bool = False,
                      per_token: Callable[[Callable, MicroBatch], Tensor] = logprobs_of,
                      share_prompts: bool = False) -> list[list[float]]:
    """``per_token(model, micro_batch)`` for each response token of each sample, in input order, without gradient:
    logprobs by default, the critic's values with ``learners.critic.response_values``.

    ``align_ranks``: run as many forwards as the busiest rank (ZeRO-3 gathers weights collectively on every forward).
    ``share_prompts``: the samples of one prompt share its forward (``plan_micro_batches``).
    """
    if not samples:
        if align_ranks:
            raise ValueError("every data-parallel rank needs at least one sample")
        return []
    if align_ranks:
        plan, count = aligned_plan(samples, token_budget, share_prompts)
    else:  # no collective: safe to call from one rank alone (e.g. a reference model living in a learner process)
        plan = plan_micro_batches(samples, token_budget, share_prompts)
        count = len(plan.batches)
    out: list[list[float]] = [[] for _ in samples]
    for i in range(count):
        real = i < len(plan.batches)
        k = i if real else 0
        mb = collate([samples[j] for j in plan.batches[k]], dev, pad_id, shared_prompt=plan.shared[k])
        values = per_token(model, mb).cpu()
        if real:
            for row, j in enumerate(plan.batches[k]):
                out[j] = values[row, : mb.response_lens[row]].tolist()
    return out


def compute_logprobs(model: Callable, samples: Sequence[LearnerSample], token_budget: int, dev: torch.device,
                     pad_id: int = 0, align_ranks: bool = False, share_prompts: bool = False) -> list[list[float]]:
    """Per response token log π(token | prefix) of each sample, in input order (see ``compute_per_token``)."""
    return compute_per_token(model, samples, token_budget, dev, pad_id, align_ranks, share_prompts=share_prompts)
