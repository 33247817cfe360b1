"""Learner hyperparameters: one documented dataclass shared by the policy, reference and SFT learners.

Defaults are the paper's (spec section 7): AdamW lr 1e-6, betas (0.9, 0.999), weight decay 0.01, linear warmup then a
constant rate, stepped once per RL step, grad clip 1.0, PPO clip 0.2, entropy 0.001, KL loss 0.001 with ``low_var_kl``.
The paper's presets also split each RL step's 320 trajectories into mini-batches of 256 (``mini_batch_size``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The names train.algorithm takes (learners/algorithms.py holds the estimators). Here, free of torch, so that a
# misspelled name is refused before anything heavy is imported.
ALGORITHMS = ("grpo", "dr_grpo", "rloo", "reinforce", "reinforce_pp", "reinforce_pp_baseline", "ppo")
# Estimators that see per-token rewards, so a KL penalty can be folded into the reward.
TOKEN_REWARD_ALGORITHMS = ("reinforce_pp", "ppo")
# Estimators whose advantages are all 0 when every group's rewards are equal (a group baseline, no critic): a step
# with no informative group gives them nothing to learn from.
GROUP_BASELINE_ALGORITHMS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")


@dataclass
class LearnerConfig:
    """How a learner builds its DeepSpeed engine and computes its loss.

    Attributes:
        zero_stage: DeepSpeed ZeRO stage 0-3. 2 shards optimizer state and gradients across data-parallel ranks; 3 also
            shards the weights (publishing and exporting then gather them on rank 0). One rank runs 1 and 2 unsharded
            (``engine.zero_stage``): there is nothing to shard.
        bf16: train in bfloat16 with fp32 master weights kept by DeepSpeed. Off gives plain fp32 (exact tests).
        gradient_checkpointing: recompute activations in the backward pass; trades compute for memory.
        lr: peak learning rate (the paper's actor: 1e-6).
        betas: AdamW's (β1, β2).
        adam_eps: AdamW's ε.
        weight_decay: AdamW's decoupled weight decay (0.01 in the paper), applied to every parameter as verl does.
        torch_adam: use torch's AdamW inside DeepSpeed instead of its fused kernel (needed on CPU; avoids a JIT build).
        warmup_steps: updates (``train_step`` calls: RL steps) of linear warmup, after which the rate stays constant.
            When None it is derived as ``int(warmup_ratio * total_steps)``; the paper's 0.95 * 203 gives 192. The rate
            is the same for every mini-batch and epoch of one update, as verl steps its scheduler once per RL step.
        warmup_ratio: share of ``total_steps`` spent warming up, used only when ``warmup_steps`` is None.
        total_steps: RL steps of the run, for ``warmup_ratio`` (the paper: 203). The training config interpolates it
            from ``train.total_steps``; set it only to decouple the schedule from the run's length on purpose.
        grad_clip: clip the global gradient norm to this value (0 disables clipping).
        micro_batch_tokens: token budget of one micro-batch, padding included (rows × longest row). Samples are sorted
            by length and packed greedily; a sample longer than the budget gets a micro-batch of its own.
        share_prompts: the samples of one prompt (a GRPO group) share the prompt's forward in the update, the
            reference and the old-logprob passes: the prompt is computed once and every response attends to its key
            and value cache, through which the gradients of all of them flow. A micro-batch then costs
            ``prompt + rows × longest response`` tokens of the budget. Off with ``gradient_checkpointing``.
        clip_eps: PPO ratio clip ε (lower side, and upper side unless ``clip_eps_high`` is set).
        clip_eps_high: DAPO's clip-higher upper ε; None means symmetric.
        dual_clip: dual-clip constant c > 1 bounding the loss of negative-advantage tokens; None disables it.
        kl_coef: weight of the KL-to-reference loss, ADDED to the loss (the original subtracted it, spec section 7).
            0 turns the KL loss off (PPO puts its KL in the reward instead).
        kl_kind: KL estimator of the loss: ``k1``, ``k2``, ``k3``/``low_var_kl`` (see ``algorithms.kl_estimate``).
        entropy_coef: weight of the entropy bonus (subtracted from the loss).
        ppo_epochs: passes over the batch per RL step.
        mini_batch_size: trajectories per optimizer step (global, over all data-parallel ranks), like verl's
            ``ppo_mini_batch_size``; each pass over the batch takes ``ceil(batch / mini_batch_size)`` optimizer steps,
            each a token mean over its own mini-batch. None: the whole batch is one mini-batch. The paper: 256 of
            320, two optimizer steps per RL step.
        tis_cap: truncated importance sampling against the engine's sampling distribution: each token's loss is
            weighted by min(π_old / π_rollout, C), where π_old is the learner's (recomputed) and π_rollout the
            engine's. None: no weight (see ``docs/training.md`` for where the PPO ratio's old logprobs come from).
        value_clip: the critic's value clip c (critic only): a value may move at most c from the one GAE used.
        offload_reference: keep the frozen reference model on the CPU between calls (GPU runs); no effect on CPU.
        reference_bf16: run the reference model in bfloat16 (else fp32).
        logprob_micro_batch_tokens: token budget of a micro-batch in ``logprobs`` (no gradient: can be larger).
        seed: seed of torch's RNG in each learner.
        cpu_threads: torch threads of a CPU learner; 0 shares the machine's cores among the learner ranks (Ray would
            otherwise leave one thread per actor). Ignored on GPU.
        extra_deepspeed: keys merged last into the generated DeepSpeed config (e.g. offload settings), for what the
            fields above do not cover.
    """

    zero_stage: int = 2
    bf16: bool = True
    gradient_checkpointing: bool = False
    lr: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    weight_decay: float = 0.01
    torch_adam: bool = True
    warmup_steps: int | None = None
    warmup_ratio: float = 0.95
    total_steps: int = 203
    grad_clip: float = 1.0
    micro_batch_tokens: int = 8192
    share_prompts: bool = True
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    dual_clip: float | None = None
    kl_coef: float = 0.001
    kl_kind: str = "low_var_kl"
    entropy_coef: float = 0.001
    ppo_epochs: int = 1
    mini_batch_size: int | None = None
    tis_cap: float | None = None
    value_clip: float = 0.5
    offload_reference: bool = False
    reference_bf16: bool = True
    logprob_micro_batch_tokens: int = 16384
    seed: int = 0
    cpu_threads: int = 0
    extra_deepspeed: dict = field(default_factory=dict)

    def resolved_warmup_steps(self) -> int:
        """Warmup length in optimizer steps: ``warmup_steps`` if given, else ``int(warmup_ratio * total_steps)``."""
        if self.warmup_steps is not None:
            return max(0, int(self.warmup_steps))
        return max(0, int(self.warmup_ratio * self.total_steps))

    def optimizer_steps(self, batch_size: int) -> int:
        """Optimizer steps one update of ``batch_size`` trajectories takes: mini-batches times epochs."""
        return len(mini_batches(batch_size, self.mini_batch_size)) * self.ppo_epochs

    def validate(self) -> None:
        """Fail at start, naming the key, rather than deep inside DeepSpeed."""
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"learner.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.lr <= 0:
            raise ValueError(f"learner.lr must be positive, got {self.lr}")
        if self.micro_batch_tokens <= 0 or self.logprob_micro_batch_tokens <= 0:
            raise ValueError("learner.micro_batch_tokens and learner.logprob_micro_batch_tokens must be positive")
        if self.kl_coef < 0:
            raise ValueError(f"learner.kl_coef must be >= 0 (the KL is added to the loss), got {self.kl_coef}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"learner.dual_clip must be > 1 or null, got {self.dual_clip}")
        if self.ppo_epochs < 1:
            raise ValueError(f"learner.ppo_epochs must be >= 1, got {self.ppo_epochs}")
        if self.mini_batch_size is not None and self.mini_batch_size < 1:
            raise ValueError(f"learner.mini_batch_size must be >= 1 or null, got {self.mini_batch_size}")
        if self.kl_kind not in ("k1", "k2", "k3", "low_var_kl"):
            raise ValueError(f"learner.kl_kind must be one of k1, k2, k3, low_var_kl; got {self.kl_kind!r}")


def mini_batches(batch_size: int, mini_batch_size: int | None) -> list[range]:
    """Consecutive index ranges of at most ``mini_batch_size`` (None: one range over the batch). A remainder forms a
    mini-batch of its own, as in verl (the paper's 320 in 256s: 256 and 64)."""
    size = batch_size if not mini_batch_size else mini_batch_size
    return [range(start, min(start + size, batch_size)) for start in range(0, batch_size, max(size, 1))]
