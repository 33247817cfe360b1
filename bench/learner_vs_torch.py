"""One policy update through the DeepSpeed learner actors against a plain PyTorch AdamW loop, measured in one run.

    python bench/learner_vs_torch.py [--model smollm2-135m-instruct] [--groups 2] [--group-size 4]
                                     [--prompt-tokens 250] [--response-tokens 64] [--observation-tokens 0]
                                     [--rounds 2] [--bf16]

The batch is ``groups × group-size`` sequences; the samples of a group share their prompt, as GRPO's do.
``--observation-tokens N`` makes each response a search episode's: half the model's tokens, an ``<information>``
block of N tokens under loss mask 0, then the other half (a SmolLM2 episode against BM25 measured 91 generated and 186
observation tokens). Both sides
compute the reference logprobs (a frozen copy of the model, no gradient) and then one update of the token-mean PPO
loss on the same batch, in fp32 (or, with ``--bf16``, in bfloat16) with the learner's CPU threads:

- ours: ``ReferenceActor`` and a one-rank ``LearnerGroup`` of ``PolicyActor`` (Ray actors, DeepSpeed on the CPU
  accelerator, unsharded on one rank), with the CPU config's micro-batch budgets;
- plain: an HF model with ``torch.optim.AdamW``, one forward and backward over the whole batch, logits kept only for
  the response positions (``logits_to_keep``), the same loss terms (ratio, KL, entropy), masked as ours are. In bf16
  it is PyTorch's own mixed-precision recipe: fp32 weights and optimizer under ``torch.autocast``, and a bf16 copy of
  the model for the reference, as ours keeps one (``learner.reference_bf16``).

Each side runs ``--rounds`` timed updates after a warm-up one; the best counts. ``ratio`` is ours over plain in
tokens/s (the batch's tokens, prompts included, per second of reference pass plus update); ``goal`` is 1.5, which
only doing less work than the plain loop (the prompt once per group) can reach. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GOAL = 1.5


def make_batch(groups: int, group_size: int, prompt_tokens: int, response_tokens: int, vocab: int,
               observation_tokens: int = 0):
    from learners.batch import LearnerSample

    rng = random.Random(0)
    first = response_tokens // 2
    loss_mask = [1] * first + [0] * observation_tokens + [1] * (response_tokens - first)
    samples = []
    for _ in range(groups):
        prompt = [rng.randrange(100, vocab) for _ in range(prompt_tokens)]
        for _ in range(group_size):
            response = [rng.randrange(100, vocab) for _ in range(len(loss_mask))]
            advantage = rng.choice([-1.0, 1.0])
            samples.append(LearnerSample(prompt + response, prompt_tokens, list(loss_mask),
                                         advantages=[advantage] * len(loss_mask)))
    return samples


def best_of(rounds: int, update) -> float:
    """Seconds of the fastest of ``rounds`` timed calls, after one untimed warm-up call."""
    update()
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        update()
        best = min(best, time.perf_counter() - started)
    return best


def ours(model: str, samples, rounds: int, threads: int, bf16: bool) -> float:
    import ray

    from learners.config import LearnerConfig
    from learners.group import LearnerGroup
    from learners.policy import PolicyActor
    from learners.reference import ReferenceActor

    cfg = LearnerConfig(bf16=bf16, lr=1e-6, warmup_steps=0, micro_batch_tokens=2048,
                        logprob_micro_batch_tokens=4096, cpu_threads=threads)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        learners = LearnerGroup(PolicyActor, 1, model, cfg, num_cpus=1, timeout_s=1800)
        reference = ray.remote(ReferenceActor).options(num_cpus=0.5).remote(model, bf16=bf16, micro_batch_tokens=4096,
                                                                  cpu_threads=threads)

        def update() -> None:
            for sample, logprobs in zip(samples, ray.get(reference.logprobs.remote(samples), timeout=1800)):
                sample.ref_logprobs = logprobs
            learners.train_step(samples)

        return best_of(rounds, update)
    finally:
        ray.shutdown()


def plain(model_path: str, samples, rounds: int, threads: int, bf16: bool) -> float:
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM

    from learners.algorithms import kl_estimate
    from learners.losses import combine_policy_loss, entropy_from_logits, policy_gradient_loss

    torch.set_num_threads(threads)
    policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    frozen = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if bf16 else torch.float32)
    frozen = frozen.eval().requires_grad_(False)
    precision = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, betas=(0.9, 0.999), weight_decay=0.01)
    ids = torch.tensor([s.input_ids for s in samples])
    prompt, response = samples[0].prompt_len, samples[0].response_len
    targets = ids[:, prompt:]
    advantages = torch.tensor([s.advantages for s in samples])
    mask = torch.tensor([s.loss_mask for s in samples], dtype=torch.bool)

    def response_logprobs(model) -> tuple:
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=response + 1).logits[:, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1), logits

    def update() -> None:
        with torch.no_grad():
            ref, _ = response_logprobs(frozen)
        with precision():
            logp, logits = response_logprobs(policy)
        pg, _ = policy_gradient_loss(logp, logp.detach(), advantages, 0.2, None, None, loss_mask=mask)
        loss = (combine_policy_loss(pg, kl_estimate(logp, ref, "low_var_kl"), entropy_from_logits(logits),
                                    0.001, 0.001) * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()

    return best_of(rounds, update)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=250)
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--observation-tokens", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="both sides in bfloat16 (fp32 master weights)")
    args = parser.parse_args()

    from transformers import AutoConfig

    from launch.assets import resolve_model

    model = resolve_model(args.model)
    threads = os.cpu_count() or 1
    samples = make_batch(args.groups, args.group_size, args.prompt_tokens, args.response_tokens,
                         AutoConfig.from_pretrained(model).vocab_size, args.observation_tokens)
    tokens = sum(len(s.input_ids) for s in samples)
    ours_s = ours(model, samples, args.rounds, threads, args.bf16)
    plain_s = plain(model, samples, args.rounds, threads, args.bf16)
    print(json.dumps({
        "ratio": round(plain_s / ours_s, 3),
        "goal": GOAL,
        "ours_tokens_per_s": round(tokens / ours_s, 1),
        "plain_tokens_per_s": round(tokens / plain_s, 1),
        "ours_s": round(ours_s, 2),
        "plain_s": round(plain_s, 2),
        "sequences": len(samples),
        "group_size": args.group_size,
        "tokens": tokens,
        "observation_tokens": args.observation_tokens,
        "prompt_share": round(args.prompt_tokens / (tokens / len(samples)), 3),
        "threads": threads,
        "precision": "bf16" if args.bf16 else "fp32",
    }, indent=2))


if __name__ == "__main__":
    main()
