"""The policy warm-up, the cold start of training (``python -m launch.warmup`` runs it alone, with training's config).

A small policy is fine-tuned on demonstrations of the search protocol before RL, so that RL starts from a model that
searches and answers (``train.warmup=auto`` does this inside ``launch.train``):

    1. the scripted expert (``actors/expert.py``) writes one demonstration per training question, searching real BM25
       over the data config's corpus; the grounded ones (documents contain the gold answer) are kept;
    2. each becomes a ``LearnerSample`` whose loss mask is the rollout's: 1 on the expert's tokens, 0 on
       ``<information>``;
    3. a DeepSpeed SFT learner (``learners/sft.py``) trains on them for ``warmup.steps`` optimizer steps;
    4. the result is exported as a Hugging Face folder, which RL starts from (policy and KL reference alike).

The exported folder is cached in the models folder, keyed by the model, the data files and every setting that shapes
the demonstrations or the training, so a second run with the same settings starts at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from launch.config import Config

WARMUP_RECIPE_VERSION = 2  # 2: varied thoughts (actors/expert.py)
SUMMARY_FILE = "warmup.json"


def count_parameters(model_path: str) -> int:
    """Parameters of an HF model folder, counted on the meta device (no weights are loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    return sum(p.numel() for p in model.parameters())


def should_warm_up(mode: str, model_path: str, max_params: float) -> bool:
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"train.warmup={mode!r}; expected auto, on or off")
    if mode == "auto":
        return count_parameters(model_path) < max_params
    return mode == "on"


def query_styles(n: int, name_share: float, keyword_share: float, seed: int) -> list[str]:
    """The query style of each of ``n`` demonstrations: the name for ``name_share`` of them, the name and keywords for
    ``keyword_share``, the question for the rest."""
    if min(name_share, keyword_share) < 0.0 or name_share + keyword_share > 1.0:
        raise ValueError(f"warmup.name_query_share={name_share} and warmup.keyword_query_share={keyword_share}; "
                         f"expected shares in [0, 1] whose sum is at most 1")
    draw = random.Random(seed)
    styles = []
    for _ in range(n):
        u = draw.random()
        styles.append("name" if u < name_share else "keywords" if u < name_share + keyword_share else "question")
    return styles


async def _write_all(examples, engine, tokenizer, episode_cfg, max_prompt_tokens: int, styles: list[str],
                     cite_evidence: bool, cite_query: bool):
    from actors.expert import write_demonstration

    return await asyncio.gather(*[
        write_demonstration(x.question, x.golden_answers, engine, tokenizer, episode_cfg, seed=i,
                            max_prompt_tokens=max_prompt_tokens, query_style=style, cite_evidence=cite_evidence,
                            cite_query=cite_query)
        for i, (x, style) in enumerate(zip(examples, styles))
    ])


def write_demonstrations(cfg: Config, policy_path: str, train_file: Path, corpus_file: Path) -> tuple[list, int]:
    """Grounded demonstrations for ``cfg.warmup.demonstrations`` training questions, and how many were written."""
    from transformers import AutoTokenizer

    from actors.dataset import load_qa
    from simulator.engines import BM25Search

    w = cfg.warmup
    examples = load_qa(train_file)
    random.Random(w.seed).shuffle(examples)
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    engine = BM25Search(corpus_file, top_k=cfg.search.top_k)  # the documents per search RL will see
    episode_cfg = cfg.rollout.episode
    kept, written = [], 0
    # Single-hop questions are nearly all grounded, two-hop ones rarely; write in chunks until enough are kept.
    for start in range(0, len(examples), 4 * w.demonstrations):
        chunk = examples[start:start + 4 * w.demonstrations]
        styles = query_styles(len(chunk), w.name_query_share, w.keyword_query_share, w.seed + start)
        demos = asyncio.run(_write_all(chunk, engine, tokenizer, episode_cfg, cfg.rollout.max_prompt_tokens, styles,
                                       w.cite_evidence, w.cite_query))
        written += len(demos)
        kept.extend(d for d in demos if d.grounded)
        if len(kept) >= w.demonstrations:
            break
    if not kept and not any("<information>" in d.response_text for d in demos):
        raise RuntimeError(f"the expert's search turn never completed: it does not fit rollout.episode."
                           f"max_tokens_per_turn={episode_cfg.max_tokens_per_turn}; raise it (the expert needs ~50)")
    if not kept:
        raise RuntimeError(f"the expert wrote {written} demonstrations on {train_file} and none was grounded: BM25 "
                           f"over {corpus_file} never retrieved a gold answer. Does the corpus match the questions?")
    return kept[:w.demonstrations], written


def demonstration_samples(demos, tokenizer: Any = None, search_again_share: float = 0.0, seed: int = 0) -> list:
    """One SFT sample per demonstration, and for ``search_again_share / (1 - share)`` of them a sibling trained only
    on choosing ``<search>`` over ``<answer>`` after the observation (``WarmupConfig.search_again_share``)."""
    from actors.expert import search_again_ids
    from learners.batch import LearnerSample

    if not 0.0 <= search_again_share < 1.0:
        raise ValueError(f"warmup.search_again_share={search_again_share}; expected a share in [0, 1)")
    samples = [LearnerSample(input_ids=d.prompt_ids + d.response_ids, prompt_len=len(d.prompt_ids),
                             loss_mask=list(d.loss_mask)) for d in demos]
    siblings = round(len(demos) * search_again_share / (1.0 - search_again_share))
    for d in random.Random(seed).sample(demos, min(siblings, len(demos))):
        response = search_again_ids(d.response_ids, d.loss_mask, tokenizer)
        if response is not None:
            samples.append(LearnerSample(input_ids=d.prompt_ids + response, prompt_len=len(d.prompt_ids),
                                         loss_mask=[0] * (len(response) - 1) + [1]))
    return samples


def sft_config(cfg: Config):
    w = cfg.warmup
    return dataclasses.replace(cfg.learner, lr=w.lr, warmup_steps=w.lr_warmup_steps, total_steps=w.steps,
                               micro_batch_tokens=w.micro_batch_tokens, kl_coef=0.0, entropy_coef=0.0, ppo_epochs=1,
                               mini_batch_size=None)


# Data files up to this size are keyed by their content, so the same world written again (another clone, another
# folder) finds its warm-up; a larger corpus is keyed by size and modification time, which costs no read.
CONTENT_KEY_MAX_BYTES = 256 * 2**20


def file_stamp(path: Path) -> list:
    """What the cache key knows of one data file: its name and its content's sha256, or, past
    ``CONTENT_KEY_MAX_BYTES``, its size and modification time."""
    path = Path(path)
    size = path.stat().st_size
    if size > CONTENT_KEY_MAX_BYTES:
        return [path.name, size, path.stat().st_mtime_ns]
    with path.open("rb") as f:
        return [path.name, hashlib.file_digest(f, "sha256").hexdigest()]


def cache_key(cfg: Config, policy_path: str, files: list[Path]) -> str:
    """Changes whenever the model, the data or any setting that shapes the demonstrations or the training does."""

    def model_stamp(path: Path) -> list:  # weights are large and written once: their size and time suffice
        entries = sorted(path.iterdir()) if path.is_dir() else [path]
        return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in entries if p.is_file()]

    learner = sft_config(cfg)
    recipe = {
        "version": WARMUP_RECIPE_VERSION,
        "model": [str(policy_path), model_stamp(Path(policy_path))],
        "data": [file_stamp(f) for f in files],
        "warmup": dataclasses.asdict(cfg.warmup),
        "top_k": cfg.search.top_k,
        "episode": dataclasses.asdict(cfg.rollout.episode),
        "max_prompt_tokens": cfg.rollout.max_prompt_tokens,
        "learner": {k: v for k, v in dataclasses.asdict(learner).items() if k != "extra_deepspeed"},
        "learners": cfg.cluster.learners,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def warmed_dir(policy_path: str, key: str) -> Path:
    from launch.assets import models_dir

    return models_dir() / "warmed" / f"{Path(policy_path).name}-{key}"


def warm_up(cfg: Config, policy_path: str, train_file: Path, corpus_file: Path,
            run_dir: Path) -> tuple[str, dict[str, Any]]:
    """The warmed-up policy's HF folder and a summary; ``(policy_path, {})`` when ``train.warmup`` skips it.

    The folder is in the models folder's cache when ``warmup.cache`` is on, else ``run_dir/warmed_policy``. Ray must
    be running: the SFT learner is a Ray actor, shut down before this returns.
    """
    if not should_warm_up(cfg.train.warmup, policy_path, cfg.warmup.max_params):
        return policy_path, {}
    if cfg.warmup.cache:
        out = warmed_dir(policy_path, cache_key(cfg, policy_path, [train_file, corpus_file]))
    else:
        out = Path(run_dir) / "warmed_policy"
    # A cached policy, or the one this run folder's earlier session built (a resumed run keeps its starting point).
    if (out / SUMMARY_FILE).is_file():
        summary = json.loads((out / SUMMARY_FILE).read_text())
        print(f"warm-up: reusing {out} (SFT loss {summary['sft_loss_first']:.3f} -> {summary['sft_loss_last']:.3f})",
              flush=True)
        return str(out), {**summary, "cached": True}

    from learners.group import LearnerGroup
    from learners.sft import SFTActor

    started = time.perf_counter()
    demos, written = write_demonstrations(cfg, policy_path, train_file, corpus_file)
    from transformers import AutoTokenizer

    samples = demonstration_samples(demos, AutoTokenizer.from_pretrained(policy_path), cfg.warmup.search_again_share,
                                   cfg.warmup.seed)
    t_demos = time.perf_counter() - started
    print(f"warm-up: {len(demos)} grounded demonstrations of {written} written ({t_demos:.1f}s); "
          f"fine-tuning for {cfg.warmup.steps} steps", flush=True)

    learners = LearnerGroup(SFTActor, cfg.cluster.learners, policy_path, sft_config(cfg), num_cpus=1,
                            num_gpus=cfg.cluster.learner_gpus, timeout_s=cfg.cluster.actor_start_timeout_s)
    losses = []
    try:
        order = list(range(len(samples)))
        rng = random.Random(cfg.warmup.seed)
        cursor = len(order)
        for step in range(1, cfg.warmup.steps + 1):
            batch = []
            while len(batch) < cfg.warmup.batch_size:
                if cursor == len(order):
                    rng.shuffle(order)
                    cursor = 0
                batch.append(samples[order[cursor]])
                cursor += 1
            metrics = learners.train_step(batch)
            losses.append(metrics["sft/loss"])
            print(f"warm-up step {step}/{cfg.warmup.steps}: loss {metrics['sft/loss']:.3f}", flush=True)
        staging = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        learners.export_hf(str(staging))
    finally:
        learners.shutdown()

    summary = {
        "base_model": str(policy_path),
        "demonstrations": len(demos),
        "written": written,
        "steps": cfg.warmup.steps,
        "sft_loss_first": losses[0],
        "sft_loss_last": losses[-1],
        "sft_losses": losses,
        "demonstration_tokens": sum(sum(s.loss_mask) for s in samples),
        "seconds": time.perf_counter() - started,
        "example": demos[0].response_text,
    }
    (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    if (out / SUMMARY_FILE).is_file():
        # Another process built the same policy meanwhile and may be reading it: keep that one.
        shutil.rmtree(staging, ignore_errors=True)
    else:
        shutil.rmtree(out, ignore_errors=True)  # a folder without its summary is an interrupted copy
        os.replace(staging, out)  # the summary file marks a complete folder; the rename makes it appear at once
    print(f"warm-up: done in {summary['seconds']:.0f}s, SFT loss {losses[0]:.3f} -> {losses[-1]:.3f}; policy at {out}",
          flush=True)
    return str(out), {**summary, "cached": False}
