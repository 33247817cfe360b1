"""Fine-tune the simulator on collected search results (spec section 3): ``python -m launch.tune_simulator``.

    python -m launch.tune_simulator                                      # SmolLM2 on {simulation.dir}/data
    python -m launch.tune_simulator simulator.model=Qwen/Qwen2.5-3B-Instruct cluster=gpu_4x \\
        simulation.tune.lr=1e-6 simulation.tune.batch_size=2 simulation.tune.steps=1000    # the paper's recipe

The model tuned is the run's ``simulator.model``. Each example of ``{simulation.dir}/data/sft_train.jsonl`` (written by
``launch.collect_sim_data``) is chat-formatted exactly as a simulator server formats its requests (``chat_prompt_ids``
of ``simulator/server.py``: an empty system message, the SFT-mode prompt as the user turn), followed by the real
documents and the template's end of turn. The loss is on those target tokens only. It runs on the DeepSpeed SFT
learner actors that warm up the policy (``learners/sft.py``), logs to W&B (offline by default) and
``{dir}/tuned/metrics.jsonl``, checkpoints every ``save_every`` steps (a rerun continues from the newest), and
exports ``{dir}/tuned/hf``, which trains a policy with

    python -m launch.train simulator.model={dir}/tuned/hf simulator.mode=sft
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from launch.config import Config, register_configs

register_configs()

STATE_FILE = "tune_state.json"
SUMMARY_FILE = "tuning.json"


def sft_sample(tokenizer: Any, prompt: str, completion: str, max_target_tokens: int):
    """One example as a ``LearnerSample``: the chat-formatted prompt, then the target, with a loss mask of ones over
    the target only.

    The target is the completion followed by what the chat template writes after an assistant message (SmolLM2's
    ``<|im_end|>\\n``), so the tuned simulator learns to stop; without a chat template, the EOS token. A long
    completion is cut, never its end of turn.
    """
    from learners.batch import LearnerSample
    from simulator.server import chat_prompt_ids, simulator_messages

    prompt_ids = chat_prompt_ids(tokenizer, prompt)
    if getattr(tokenizer, "chat_template", None):
        messages = simulator_messages(prompt)
        head = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}],
                                             tokenize=False)
        if not full.startswith(head) or completion not in full[len(head):]:
            raise ValueError(f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')}: its chat template does not "
                             f"write the assistant message after the generation prompt; cannot build a target")
        tail = full[len(head) + full[len(head):].index(completion) + len(completion):]
        end_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    else:
        end_ids = [tokenizer.eos_token_id]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    completion_ids = completion_ids[:max(1, max_target_tokens - len(end_ids))]
    target = completion_ids + end_ids
    return LearnerSample(input_ids=prompt_ids + target, prompt_len=len(prompt_ids), loss_mask=[1] * len(target))


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The examples of optimizer step ``step`` (from 1): epochs of seeded permutations, read in order. A function of
    the step alone, so a resumed run takes exactly the batches the stopped one would have taken."""
    if num_examples < 1:
        raise ValueError("no training examples")
    start = (step - 1) * batch_size
    out = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, num_examples)
        order = list(range(num_examples))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        out.append(order[offset])
    return out


def target_nll(logprobs: Sequence[Sequence[float]], samples: Sequence) -> float:
    """Mean negative log-likelihood per target token (what the training loss is, measured without an update)."""
    total = sum(-lp for row, s in zip(logprobs, samples) for lp, m in zip(row, s.loss_mask) if m)
    return total / max(1, sum(sum(s.loss_mask) for s in samples))


def tune_config(cfg: Config):
    t = cfg.simulation.tune
    return dataclasses.replace(cfg.learner, lr=t.lr, warmup_steps=t.lr_warmup_steps, total_steps=t.steps,
                               micro_batch_tokens=t.micro_batch_tokens, kl_coef=0.0, entropy_coef=0.0, ppo_epochs=1,
                               mini_batch_size=None)


def latest_checkpoint(folder: Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint: its state file is written last."""
    found = [(json.loads((p / STATE_FILE).read_text())["step"], p) for p in folder.glob("step_*")
             if (p / STATE_FILE).is_file()]
    return max(found) if found else None


def tune(cfg: Config, base_model: str, out: Path, run_name: str = "") -> dict[str, Any]:
    """Train, checkpoint and export; returns the summary written to ``{out}/hf/tuning.json``."""
    from transformers import AutoTokenizer

    from launch.driver.run_logger import RunLogger
    from learners.group import LearnerGroup
    from learners.sft import SFTActor
    from simulator.tuning_data import read_sft_examples

    t = cfg.simulation.tune
    data_dir = Path(cfg.simulation.dir) / "data"
    train_rows = read_sft_examples(data_dir / "sft_train.jsonl")
    val_file = data_dir / "sft_val.jsonl"
    val_rows = read_sft_examples(val_file)[:t.eval_examples] if val_file.is_file() else []
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    train = [sft_sample(tokenizer, r["prompt"], r["completion"], t.max_target_tokens) for r in train_rows]
    val = [sft_sample(tokenizer, r["prompt"], r["completion"], t.max_target_tokens) for r in val_rows]
    print(f"tune: {len(train)} training examples ({sum(sum(s.loss_mask) for s in train)} target tokens), "
          f"{len(val)} held out; {t.steps} steps of {t.batch_size} on {base_model}", flush=True)

    resume = latest_checkpoint(out / "checkpoints") if t.resume else None
    logger = RunLogger(out, cfg.logger.wandb, run_name or "tune-simulator",
                       {"tune": dataclasses.asdict(t), "base_model": base_model, "examples": len(train)},
                       resume=resume is not None)
    start_step = 0
    learners = LearnerGroup(SFTActor, cfg.cluster.learners, base_model, tune_config(cfg), num_cpus=1,
                            num_gpus=cfg.cluster.learner_gpus, timeout_s=cfg.cluster.actor_start_timeout_s)
    losses: list[float] = []
    val_losses: dict[int, float] = {}
    try:
        if resume is not None:
            start_step, folder = resume
            learners.load_checkpoint(str(folder / "learner"))
            state = json.loads((folder / STATE_FILE).read_text())
            losses, val_losses = state["losses"], {int(k): v for k, v in state["val_losses"].items()}
            logger.truncate_after(start_step)
            print(f"tune: resuming from {folder} (step {start_step})", flush=True)
        elif val:
            val_losses[0] = target_nll(learners.logprobs(val), val)
        started = time.perf_counter()
        for step in range(start_step + 1, t.steps + 1):
            batch = [train[i] for i in batch_indices(len(train), t.batch_size, step, t.seed)]
            metrics = learners.train_step(batch)
            losses.append(metrics["sft/loss"])
            if val and (step == t.steps or (t.eval_every and step % t.eval_every == 0)):
                val_losses[step] = metrics["sft/val_loss"] = target_nll(learners.logprobs(val), val)
            logger.log(step, metrics)
            print(f"tune step {step}/{t.steps}: loss {metrics['sft/loss']:.3f}"
                  + (f", held-out {metrics['sft/val_loss']:.3f}" if "sft/val_loss" in metrics else ""), flush=True)
            if t.save_every and step % t.save_every == 0 and step < t.steps:
                save_checkpoint(learners, out / "checkpoints", step, losses, val_losses)
        staging = out / f".hf.tmp{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        learners.export_hf(str(staging))
    finally:
        learners.shutdown()
        logger.finish()

    summary = {
        "base_model": base_model,
        "examples": len(train),
        "heldout_examples": len(val),
        "steps": t.steps,
        "loss_first": losses[0],
        "loss_last_10": statistics.fmean(losses[-10:]),
        "heldout_loss": {str(k): v for k, v in sorted(val_losses.items())},
        "seconds_this_session": round(time.perf_counter() - started, 1),
        "config": dataclasses.asdict(t),
    }
    (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    shutil.rmtree(out / "hf", ignore_errors=True)
    os.replace(staging, out / "hf")
    return summary


def save_checkpoint(learners, folder: Path, step: int, losses: list[float], val_losses: dict[int, float]) -> None:
    """The learners' DeepSpeed state, then the state file that marks the checkpoint complete."""
    target = folder / f"step_{step}"
    learners.save_checkpoint(str(target / "learner"))
    tmp = target / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps({"step": step, "losses": losses, "val_losses": val_losses}))
    os.replace(tmp, target / STATE_FILE)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(dict_cfg: DictConfig) -> None:
    import ray

    from launch.assets import resolve_model
    from launch.driver.cluster import init_ray
    from launch.paths import resolve

    cfg: Config = OmegaConf.to_object(dict_cfg)
    cfg.simulation.dir = str(resolve(cfg.simulation.dir))
    out = Path(cfg.simulation.dir) / "tuned"
    collected = Path(cfg.simulation.dir) / "data" / "sft_train.jsonl"
    if not collected.is_file():
        raise FileNotFoundError(f"{collected}: no collected simulator data; run `python -m launch.collect_sim_data` "
                                f"with the same simulation.dir first (`make simulator` runs both)")
    simulator_path = resolve_model(cfg.simulator.model)  # a missing model is named before Ray starts
    init_ray(cfg)
    try:
        summary = tune(cfg, simulator_path, out, cfg.logger.run_name)
    finally:
        ray.shutdown()
    heldout = summary["heldout_loss"]
    print(f"tuned simulator at {out / 'hf'}: loss {summary['loss_first']:.3f} -> {summary['loss_last_10']:.3f}"
          + (f", held-out {heldout[min(heldout, key=int)]:.3f} -> {heldout[max(heldout, key=int)]:.3f}" if heldout
             else "")
          + f"\ntrain a policy with it: python -m launch.train simulator.model={out / 'hf'} simulator.mode=sft",
          flush=True)


if __name__ == "__main__":
    main()
