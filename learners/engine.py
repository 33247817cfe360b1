"""What the policy and SFT learners share: the HF model inside a DeepSpeed engine, batching, exact gradient
accumulation, and writing weights out (published safetensors, DeepSpeed checkpoints, HF exports).

Exact accumulation over a variable number of micro-batches
----------------------------------------------------------
The loss of the step is a token mean over the whole global batch: Σ_{all ranks, all micro-batches} m_t L_t / N_global.
Each micro-batch backpropagates ``token_mean_loss(..., N_global)``, its share of that sum, and three things are done so
that DeepSpeed neither rescales nor reduces at the wrong time:

* ``engine.backward(loss, scale_wrt_gas=False)``: DeepSpeed would otherwise divide by its static
  ``gradient_accumulation_steps``, which says nothing about how many micro-batches this step has.
* ``engine.set_gradient_accumulation_boundary(i == last)`` before every backward, and one ``engine.step()`` at the end:
  the boundary is ours, not DeepSpeed's micro-step counter, so any number of micro-batches makes one optimizer step.
* DeepSpeed AVERAGES gradients over the data-parallel ranks, so the loss is multiplied by the world size to turn that
  average back into the sum above. ZeRO-2/3 communicate on every backward, so every rank must run the same number
  of micro-batches: ranks with fewer run extra micro-batches whose loss is multiplied by 0.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from learners import distributed as D
from learners.batch import LearnerSample
from learners.config import LearnerConfig
from learners.config import mini_batches as consecutive_mini_batches
from learners.forward import MicroBatch, aligned_plan, collate, compute_per_token, logprobs_of
from learners.micro_batching import MicroBatchPlan
from learners.weight_broadcast import weights_checksum

CHECKPOINT_TAG = "deepspeed"
WEIGHTS_PREFIX = "policy-v"


def device() -> torch.device:
    """The accelerator this process computes on (``cpu`` with DeepSpeed's CPU accelerator)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


# ----------------------------------------------------------------------------------------------------------------------
# Files written atomically
# ----------------------------------------------------------------------------------------------------------------------


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place; an existing one is moved aside first, so readers never see a half state."""
    final = Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def merge_metric_sums(into: dict[str, float], part: dict[str, float]) -> None:
    """Add ``part``'s metric sums into ``into``; keys ending in ``_max`` keep the maximum instead."""
    for key, value in part.items():
        value = float(value)
        if key not in into:
            into[key] = value
        elif key.endswith("_max"):
            into[key] = max(into[key], value)
        else:
            into[key] += value


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup then constant: (step + 1) / warmup for the first ``warmup`` steps, 1 afterwards.

    ``step + 1`` so the first optimizer step already moves the weights (verl's schedule starts at 0, wasting a step).
    """
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def zero_stage(cfg: LearnerConfig, world_size: int) -> int:
    """The ZeRO stage the engine runs: ``cfg.zero_stage``, except on one rank, where stages 1 and 2 have nothing to
    shard.

    There the sharded optimizer still copies every gradient into its flat buffers in the backward and every weight back
    out after the step. On one rank fp32 runs without ZeRO (stage 0), and bf16 runs stage 1, which DeepSpeed then
    serves with its unsharded ``BF16_Optimizer`` (fp32 master weights and gradient sums, see ``deepspeed_config``).
    On a 2-core CPU, one SmolLM2-135M update of 8 sequences took 10.2 s at stage 2 in fp32 (7.2 s of it backward, 0.83 s
    the optimizer step) against 7.4 s at stage 0 (4.8 s, 0.26 s). A ZeRO section in ``extra_deepspeed`` replaces the
    generated one whole (the 7B presets offload the optimizer that way, which needs ZeRO), so its stage is the one
    that runs."""
    own = cfg.extra_deepspeed.get("zero_optimization")
    if own is not None:
        return int(own.get("stage", 0))
    if world_size == 1 and cfg.zero_stage in (1, 2):
        return 1 if cfg.bf16 else 0
    return cfg.zero_stage


def clips_gradients(cfg: LearnerConfig, stage: int) -> bool:
    """Whether the core clips the gradients itself: fp32 without ZeRO, where DeepSpeed's optimizer is the bare torch
    one and ``get_global_grad_norm`` has no norm to give."""
    return stage == 0 and not cfg.bf16


def deepspeed_config(cfg: LearnerConfig, world_size: int = 1) -> dict:
    """The DeepSpeed config of a learner on ``world_size`` data-parallel ranks. Accumulation is driven by hand (see
    module docstring), so the static ``gradient_accumulation_steps`` stays 1 and the micro-batch size is nominal."""
    stage = zero_stage(cfg, world_size)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        # Without ZeRO or bf16 DeepSpeed clips but does not report the norm; the core clips there (clips_gradients).
        "gradient_clipping": 0.0 if clips_gradients(cfg, stage) else cfg.grad_clip,
        "bf16": {"enabled": cfg.bf16},
        "zero_optimization": {"stage": stage},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": cfg.lr, "betas": list(cfg.betas), "eps": cfg.adam_eps,
                       "weight_decay": cfg.weight_decay, "torch_adam": cfg.torch_adam},
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.bf16 and stage == 1 and world_size == 1:
        # With fp32 gradient accumulation DeepSpeed runs stage 1 as its BF16_Optimizer (fp32 master weights and
        # gradient sums, no sharding); bf16 sums would round each micro-batch's share away.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if cfg.zero_stage == 3:
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    for key, value in cfg.extra_deepspeed.items():
        config[key] = value
    return config


# ----------------------------------------------------------------------------------------------------------------------
# The shared core
# ----------------------------------------------------------------------------------------------------------------------


class DeepSpeedCore:
    """An HF causal LM in a DeepSpeed engine. Subclasses define the loss; this class does the plumbing.

    Joins a one-process group when none exists, so the core also runs outside Ray (scripts, tests). In a
    data-parallel group every method here is collective: call it on every rank.
    """

    # Whether the loss reads ``response_hidden``, whose forward can share a prompt among the rows of a micro-batch.
    shares_prompts = True

    def __init__(self, model_path: str | os.PathLike, cfg: LearnerConfig) -> None:
        import deepspeed
        from transformers import AutoTokenizer

        cfg.validate()
        self.cfg = cfg
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            D.init_single_process()
        torch.manual_seed(cfg.seed)
        self.device = device()
        self.model_path = str(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.pad_id = self.tokenizer.pad_token_id or 0
        model = self.build_model(self.model_path)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        # The shared-prompt forward needs the KV cache in training, which gradient checkpointing turns off.
        self.share_prompts = self.shares_prompts and cfg.share_prompts and not cfg.gradient_checkpointing
        # No DeepSpeed scheduler: it would step once per optimizer step, and an update may take several (mini-batches,
        # epochs). The rate is a function of the update count instead, set at the start of each update.
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(cfg, D.world_size()),
        )
        self.clips_gradients = clips_gradients(cfg, self.engine.zero_optimization_stage())
        self.last_grad_norm = float("nan")
        self.global_step = 0  # optimizer steps
        self.updates = 0  # train_step calls (RL steps); the learning-rate schedule counts these
        self.step_log: list[dict[str, float]] = []  # the last update's optimizer steps: loss, grad norm, tokens
        self.published_checksum: float | None = None  # weights_checksum of the last published weights (rank 0)
        self._set_lr()

    def build_model(self, model_path: str) -> torch.nn.Module:
        """The trained module. fp32 weights in: DeepSpeed keeps them as the master copy and casts the module to bf16
        when bf16 is on."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)

    # -- forward passes -------------------------------------------------------------------------------------------

    def logprobs(self, samples: Sequence[LearnerSample]) -> list[list[float]]:
        """Per response token logprobs under the current weights, no gradient (old / behaviour logprobs)."""
        return self._per_token(samples, logprobs_of)

    def _per_token(self, samples: Sequence[LearnerSample], per_token: Callable[[Callable, MicroBatch], Tensor]
                   ) -> list[list[float]]:
        """``compute_per_token`` on this engine's current weights, in eval mode."""
        self.engine.eval()
        try:
            # Only ZeRO-3 gathers weights collectively in the forward; other stages can run unaligned forwards.
            align = D.world_size() > 1 and self.cfg.zero_stage == 3
            return compute_per_token(self.engine, samples, self.cfg.logprob_micro_batch_tokens, self.device,
                                     self.pad_id, align_ranks=align, per_token=per_token,
                                     share_prompts=self.share_prompts)
        finally:
            self.engine.train()

    def _accumulate(self, samples: Sequence[LearnerSample], loss_fn: Callable[[MicroBatch, float], tuple[Tensor, dict]]
                    ) -> tuple[dict[str, float], float, MicroBatchPlan, float]:
        """Backward every micro-batch with an exact global token mean, then ONE optimizer step.

        ``loss_fn(mb, n_global)`` returns the micro-batch's share of the token-mean loss and a dict of metric SUMS
        over its masked tokens (keys ending in ``_max`` are maxima instead). Returns those all-reduced over ranks
        (sum, or max), the global masked-token count, the plan, and the token-mean loss of the whole (global) batch.
        """
        if not samples:
            raise ValueError("train_step needs at least one sample on every data-parallel rank")
        for s in samples:
            s.validate()
        plan, count = aligned_plan(samples, self.cfg.micro_batch_tokens, self.share_prompts)
        local_tokens = sum(sum(s.loss_mask) if s.loss_mask else s.response_len for s in samples)
        n_global = D.all_reduce_sum(local_tokens)
        if n_global <= 0:
            raise ValueError("the batch has no token with loss_mask == 1 on any rank: nothing to learn from")
        scale = float(D.world_size())  # DeepSpeed averages over ranks; the token mean wants their sum
        sums: dict[str, float] = {"_loss": 0.0}
        self.engine.train()
        for i in range(count):
            real = i < len(plan.batches)
            k = i if real else 0
            mb = collate([samples[j] for j in plan.batches[k]], self.device, self.pad_id, shared_prompt=plan.shared[k])
            self.engine.set_gradient_accumulation_boundary(i == count - 1)
            loss, stats = loss_fn(mb, n_global)
            if not real:
                loss = loss * 0.0  # keeps this rank's collectives in step with busier ranks
            self.engine.backward(loss * scale, scale_wrt_gas=False)
            if real:
                sums["_loss"] += float(loss.detach())
                merge_metric_sums(sums, stats)
        if self.clips_gradients:  # gradients are all-reduced by now: this norm is the global one
            self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(
                self.engine.module.parameters(), self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")))
        self.engine.step()
        self.global_step += 1
        if D.world_size() > 1:
            for op, keys in ((torch.distributed.ReduceOp.SUM, [k for k in sorted(sums) if not k.endswith("_max")]),
                             (torch.distributed.ReduceOp.MAX, [k for k in sorted(sums) if k.endswith("_max")])):
                reduced = torch.tensor([sums[k] for k in keys] or [0.0], dtype=torch.float64)
                D.all_reduce_(reduced, op)
                sums.update(zip(keys, reduced.tolist()))
        loss = sums.pop("_loss")
        return sums, n_global, plan, loss

    def _set_lr(self) -> float:
        """Linear warm-up over updates, then constant: every optimizer step of one update shares the rate."""
        lr = self.cfg.lr * warmup_factor(self.updates, self.cfg.resolved_warmup_steps())
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _update(self, samples: Sequence[LearnerSample], loss_fn: Callable[[MicroBatch, float], tuple[Tensor, dict]],
                mini_batches: Sequence[Sequence[int]] | None = None, epochs: int = 1
                ) -> tuple[dict[str, float], float, MicroBatchPlan]:
        """One update: ``epochs`` passes over ``mini_batches`` (index lists into ``samples``; by default consecutive
        runs of ``cfg.mini_batch_size``), one optimizer step per mini-batch, each a token mean over its mini-batch.

        In a data-parallel group every rank passes the same number of mini-batches, each holding its share of the
        global mini-batch (``LearnerGroup`` shards them). Returns the last pass's metric sums and masked-token count
        over all its mini-batches, and the plan of its last mini-batch; ``step_log`` gets one entry per optimizer step.
        """
        if mini_batches is None:
            mini_batches = consecutive_mini_batches(len(samples), self.cfg.mini_batch_size)
        lr = self._set_lr()
        self.step_log = []
        for epoch in range(epochs):
            sums: dict[str, float] = {}
            tokens = 0.0
            for idx in mini_batches:
                part, n, plan, loss = self._accumulate([samples[i] for i in idx], loss_fn)
                merge_metric_sums(sums, part)
                tokens += n
                self.step_log.append({"epoch": epoch, "loss": loss, "grad_norm": self.grad_norm(), "lr": lr,
                                      "tokens": n, "micro_batches": float(len(plan.batches))})
        self.updates += 1
        return sums, tokens, plan

    def update_metrics(self, prefix: str, plan: MicroBatchPlan) -> dict[str, float]:
        """What the last update's optimizer steps report: its rate, the mean grad norm, tokens and micro-batches of
        its last pass, and how many optimizer steps it took."""
        last = [s for s in self.step_log if s["epoch"] == self.step_log[-1]["epoch"]]
        return {
            f"{prefix}/grad_norm": sum(s["grad_norm"] for s in last) / len(last),
            f"{prefix}/lr": self.step_log[0]["lr"],
            f"{prefix}/padding_share": plan.padding_share,
            f"{prefix}/num_tokens": sum(s["tokens"] for s in last),
            f"{prefix}/micro_batches": sum(s["micro_batches"] for s in last),
            f"{prefix}/optimizer_steps": float(len(self.step_log)),
        }

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def grad_norm(self) -> float:
        norm = self.last_grad_norm if self.clips_gradients else self.engine.get_global_grad_norm()
        if norm is None:
            return float("nan")
        return float(norm.item() if isinstance(norm, Tensor) else norm)

    # -- weights out ------------------------------------------------------------------------------------------------

    def full_state_dict(self) -> dict[str, Tensor] | None:
        """Every parameter by its HF name, on the CPU, in the training dtype; None on ranks other than 0.

        Under ZeRO-3 each parameter is gathered in turn (collective: call on every rank). Tied weights appear once,
        under the name ``named_parameters`` gives them, as in the checkpoints ``save_pretrained`` writes.
        """
        import deepspeed

        is_zero3 = self.cfg.zero_stage == 3
        out: dict[str, Tensor] = {}
        for name, param in self.engine.module.named_parameters():
            if is_zero3:
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    if D.rank() == 0:
                        out[name] = param.detach().cpu().clone()
            elif D.rank() == 0:
                out[name] = param.detach().cpu().clone()
        return out if D.rank() == 0 else None

    def publish_weights(self, directory: str | os.PathLike, version: int) -> str:
        """Write the full weights to ``<directory>/policy-v<version>.safetensors`` atomically; return the path.

        The rollout side loads it into vLLM; tmp + ``os.replace`` means a reader never opens a half-written file.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        path = directory / f"{WEIGHTS_PREFIX}{version:08d}.safetensors"
        state = self.full_state_dict()
        if D.rank() == 0:
            self.published_checksum = weights_checksum(state.values())
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
            os.close(fd)
            try:
                save_file({k: v.contiguous() for k, v in state.items()}, tmp,
                          metadata={"version": str(version), "format": "pt"})
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        D.barrier()
        return str(path)

    def open_weight_group(self, master_address: str, master_port: int, world_size: int, backend: str,
                          timeout_s: float, bucket_bytes: int, wire_dtype: str | None) -> None:
        """Join the broadcast weight sync (``learners/weight_broadcast.py``): rank 0 sends, the others only gather."""
        from learners.weight_broadcast import WeightBroadcaster

        dtype = getattr(torch, wire_dtype) if wire_dtype else None
        if D.rank() == 0:
            self.broadcaster = WeightBroadcaster.connect(master_address, master_port, world_size, backend=backend,
                                                         timeout_s=timeout_s, bucket_bytes=bucket_bytes,
                                                         wire_dtype=dtype)
        else:
            self.broadcaster = WeightBroadcaster(None, bucket_bytes=bucket_bytes, wire_dtype=dtype)

    def weight_manifest(self) -> dict:
        return self.broadcaster.manifest(self.engine.module.named_parameters())

    def broadcast_weights(self, manifest: dict) -> dict[str, float]:
        """Send the current weights to every engine of the group; every learner rank calls this together."""
        return self.broadcaster.broadcast(self.engine.module.named_parameters(), manifest)

    def export_hf(self, directory: str | os.PathLike) -> str:
        """``save_pretrained`` + tokenizer into ``directory`` (atomic): loads in transformers and vLLM."""
        directory = Path(directory)
        state = self.full_state_dict()
        if D.rank() == 0:
            directory.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
            try:
                module = self.engine.module
                module.config.dtype = next(iter(state.values())).dtype
                module.config.use_cache = True
                module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
                replace_dir(tmp, directory)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        D.barrier()
        return str(directory)

    # -- checkpoints --------------------------------------------------------------------------------------------------

    def save_checkpoint(self, directory: str | os.PathLike) -> str:
        """DeepSpeed state (weights, optimizer, scheduler, step) into ``directory``, via a temp folder and a rename.

        Every rank writes its shards into the same temp folder, so it lives beside ``directory`` on shared storage.
        """
        directory = Path(directory)
        tmp = directory.with_name(f".{directory.name}.tmp")
        if D.rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        D.barrier()
        client_state = {"global_step": self.global_step, "updates": self.updates, "torch_rng": torch.get_rng_state()}
        self.engine.save_checkpoint(str(tmp), tag=CHECKPOINT_TAG, client_state=client_state)
        D.barrier()
        if D.rank() == 0:
            replace_dir(tmp, directory)
        D.barrier()
        return str(directory)

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        """Restore what ``save_checkpoint`` wrote: training continues as if it had never stopped."""
        load_path, client_state = self.engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG,
                                                              load_optimizer_states=True,
                                                              load_lr_scheduler_states=False)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint (tag {CHECKPOINT_TAG!r}) under {directory}")
        client_state = client_state or {}
        self.global_step = int(client_state.get("global_step", 0))
        self.updates = int(client_state.get("updates", self.global_step))
        self._set_lr()
        if "torch_rng" in client_state:
            torch.set_rng_state(client_state["torch_rng"])
