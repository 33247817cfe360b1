"""Our training loop against TRL's ``GRPOTrainer`` on TRL's own ground: single-turn GRPO, one run each, samples/s.

The task is the one TRL is built for. Each prompt is the RAG prompt with the top BM25 documents for the question
(``rollout.prompt=rag``), the policy answers in one turn, and the reward is the paper's F1 against the gold answers.
Both sides get the same policy (SmolLM2-135M-Instruct after this project's warm-up, so that the rewards vary), the
same questions in the same order, group size, new tokens, sampling, learning rate, KL coefficient and steps, on this
machine's CPU in fp32. TRL generates with ``transformers`` ``generate``, its default backend and the one a CPU user
gets: its vLLM modes were not tried (TRL 1.16 supports vLLM 0.22-0.31 and warns about this stack's 0.32). TRL's
completions run to ``max_completion_length`` unless the model writes EOS; ours stop at ``</answer>``, as the
protocol's stop strings say. ``trl_clipped_ratio`` reports how many of TRL's completions hit the limit.

Each side's step time is the mean over its steps after the first (both compile and warm caches on the first), so
start-up is left out of the ratio and reported beside it. Quality parity: the mean training reward of the last
steps of each run, so that speed is not bought by doing less. TRL comes from the ``peer`` extra
(``pip install -e '.[peer]'``; ``make bench`` installs it).

    python bench/peer_trl.py [--steps 6] [--prompts 2] [--group 4] [--max-new-tokens 64] [--lr 2e-5]

Prints one JSON object; ``ratio`` is TRL's seconds per step over ours, at the same samples per step.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GOAL = 2.0


def warmed_policy(data_dir: Path, timeout_s: float) -> str:
    """The warm-up policy both loops start from (cached by the warm-up, so a rerun reuses it)."""
    out = subprocess.run([sys.executable, "-m", "launch.warmup", f"data.dir={data_dir}", "logger.wandb.mode=disabled",
                          f"hydra.run.dir={data_dir.parent / 'warmup'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    found = re.search(r"warmed-up policy: (\S+)", out.stdout)
    if out.returncode != 0 or not found:
        raise RuntimeError(f"warm-up failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return found.group(1)


def ours(policy: str, data_dir: Path, args, timeout_s: float) -> dict:
    """``launch.train`` with the RAG prompt, against real BM25; its per-step timings and rewards."""
    run_dir = data_dir.parent / "ours"
    overrides = [f"model.name={policy}", "train.warmup=off", "search=bm25", "rollout.prompt=rag",
                 f"data.dir={data_dir}", "data.shuffle=false", f"train.total_steps={args.steps}",
                 f"train.prompts_per_step={args.prompts}", f"train.group_size={args.group}",
                 f"rollout.episode.max_tokens_per_turn={args.max_new_tokens}", f"learner.lr={args.lr}",
                 f"learner.kl_coef={args.kl}", "train.val_every=0", "train.export_hf=false",
                 "logger.wandb.mode=disabled", f"hydra.run.dir={run_dir}"]
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "launch.train", *overrides], cwd=REPO, capture_output=True, text=True,
                         timeout=timeout_s)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"our loop failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"step_s": [r["timing_s/step"] for r in rows], "reward": [r["critic/score/mean"] for r in rows],
            "gen_s": [r["timing_s/gen"] for r in rows], "train_s": [r["timing_s/train"] for r in rows],
            "tokens_per_sample": round(statistics.fmean(r["response_length/generated_mean"] for r in rows), 1),
            "wall_s": wall}


def rag_prompts(data_dir: Path, policy: str, count: int) -> tuple[list[str], list[list[str]]]:
    """The first ``count`` training questions as RAG prompt strings (chat template applied) and their answers: the
    prompts our loop builds (``RolloutCore.rag_prompt_ids``), in the order it samples them."""
    from transformers import AutoTokenizer

    from actors.dataset import load_qa
    from actors.protocol import baseline_prompt
    from simulator.engines import BM25Search

    tokenizer = AutoTokenizer.from_pretrained(policy)
    search = BM25Search(str(data_dir / "corpus.jsonl"))
    examples = load_qa(str(data_dir / "train.parquet"))[:count]
    prompts = []
    for e in examples:
        prompts.append(baseline_prompt(e.question, tokenizer, asyncio.run(search.search(e.question)).text))
    return prompts, [list(e.golden_answers) for e in examples]


def trl(policy: str, data_dir: Path, args) -> dict:
    """TRL's ``GRPOTrainer`` on the same prompts, with step times from a callback."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from actors.reward import score_response

    torch.set_num_threads(os.cpu_count() or 1)
    prompts, golds = rag_prompts(data_dir, policy, args.steps * args.prompts)
    dataset = Dataset.from_dict({"prompt": prompts, "golden_answers": golds})

    def f1_reward(completions, golden_answers, **_) -> list[float]:
        return [score_response(c, g, "f1") for c, g in zip(completions, golden_answers)]

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.rewards: list[float] = []
            self.clipped: list[float] = []

        def on_step_begin(self, *_, **__) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__) -> None:
            self.times.append(time.perf_counter() - self.started)

        def on_log(self, _args, _state, _control, logs=None, **__) -> None:
            if logs and "reward" in logs:
                self.rewards.append(float(logs["reward"]))
                self.clipped.append(float(logs.get("completions/clipped_ratio", float("nan"))))

    with tempfile.TemporaryDirectory() as out_dir:
        config = GRPOConfig(
            output_dir=out_dir, use_cpu=True, bf16=False, report_to="none", logging_steps=1, save_strategy="no",
            max_steps=args.steps, per_device_train_batch_size=args.prompts * args.group, num_generations=args.group,
            gradient_accumulation_steps=1, max_completion_length=args.max_new_tokens, learning_rate=args.lr,
            lr_scheduler_type="constant", warmup_steps=0, beta=args.kl, temperature=1.0, top_p=0.95, epsilon=0.2,
            shuffle_dataset=False, seed=0, dataloader_num_workers=0)
        times = StepTimes()
        started = time.perf_counter()
        trainer = GRPOTrainer(model=policy, reward_funcs=f1_reward, args=config, train_dataset=dataset,
                              callbacks=[times])
        with contextlib.redirect_stdout(sys.stderr):  # TRL prints its logs; stdout is this script's one JSON object
            trainer.train()
        wall = time.perf_counter() - started
    return {"step_s": times.times, "reward": times.rewards, "clipped": times.clipped, "wall_s": wall}


def after_first(values: list[float]) -> float:
    return statistics.fmean(values[1:] if len(values) > 1 else values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--kl", type=float, default=0.001)
    parser.add_argument("--last", type=int, default=3, help="steps whose mean reward is compared")
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    args = parser.parse_args()
    try:
        import trl as _  # noqa: F401
    except ImportError:
        sys.exit("bench/peer_trl.py needs TRL: pip install -e '.[peer]' (make bench installs it)")

    from launch.config import DataConfig
    from launch.paths import ensure_data

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "world"
        ensure_data(DataConfig(dir=str(data_dir)))
        policy = warmed_policy(data_dir, args.timeout_s)
        mine = ours(policy, data_dir, args, args.timeout_s)
        peer = trl(policy, data_dir, args)

    samples = args.prompts * args.group
    ours_s, trl_s = after_first(mine["step_s"]), after_first(peer["step_s"])
    print(json.dumps({
        "bench": "peer_trl", "ratio": round(trl_s / ours_s, 3), "goal": GOAL,
        "ours_samples_per_s": round(samples / ours_s, 3), "trl_samples_per_s": round(samples / trl_s, 3),
        "ours_step_s": [round(t, 2) for t in mine["step_s"]], "trl_step_s": [round(t, 2) for t in peer["step_s"]],
        "ours_gen_s": [round(t, 2) for t in mine["gen_s"]], "ours_train_s": [round(t, 2) for t in mine["train_s"]],
        "ours_wall_s": round(mine["wall_s"], 1), "trl_wall_s": round(peer["wall_s"], 1),
        "ours_reward_last": round(statistics.fmean(mine["reward"][-args.last:]), 4),
        "trl_reward_last": round(statistics.fmean(peer["reward"][-args.last:]), 4) if peer["reward"] else None,
        "ours_reward": [round(r, 3) for r in mine["reward"]], "trl_reward": [round(r, 3) for r in peer["reward"]],
        "trl_clipped_ratio": round(statistics.fmean(peer["clipped"]), 3) if peer["clipped"] else None,
        "ours_tokens_per_sample": mine["tokens_per_sample"],
        "steps": args.steps, "samples_per_step": samples, "max_new_tokens": args.max_new_tokens, "lr": args.lr,
        "kl_coef": args.kl, "policy": "SmolLM2-135M-Instruct after the warm-up", "prompt": "RAG, top-5 BM25",
        "dtype": "float32", "device": "cpu",
    }))


if __name__ == "__main__":
    main()
