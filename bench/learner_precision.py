"""Training throughput of the policy model in fp32 against bf16 on this machine, measured in one run.

    python bench/learner_precision.py [--model smollm2-135m-instruct] [--rows 4] [--tokens 400] [--rounds 2]

One forward and backward pass of a language-model loss over ``rows x tokens`` random token ids, timed for each
precision after a warm-up pass; the best round counts. Prints one JSON object with tokens/s per precision and
``fp32_over_bf16``. CPUs without AMX run bf16 matrix products slower than fp32, which is why the CPU default trains in
fp32 (``learner.bf16=false`` in ``conf/config.yaml``); GPUs keep bf16.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def tokens_per_s(model_path: str, dtype, rows: int, tokens: int, rounds: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    ids = torch.randint(0, model.config.vocab_size, (rows, tokens), generator=torch.Generator().manual_seed(0))
    best = 0.0
    for round_ in range(rounds + 1):
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        if round_:  # the first pass is a warm-up
            best = max(best, rows * tokens / (time.perf_counter() - started))
    return best


def main() -> None:
    import torch

    from launch.assets import ensure

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    path = str(ensure(args.model))
    result = {"model": args.model, "rows": args.rows, "tokens": args.tokens, "threads": torch.get_num_threads()}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        result[f"{name}_tokens_per_s"] = round(tokens_per_s(path, dtype, args.rows, args.tokens, args.rounds), 1)
    result["fp32_over_bf16"] = round(result["fp32_tokens_per_s"] / result["bf16_tokens_per_s"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
