"""The SFT learner on real DeepSpeed (CPU) with tiny-llama, in a fresh subprocess (see test_learner_policy)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.test_learner_policy import run_scenario


def _demonstrations() -> list:
    """Two fixed 'protocol demonstrations' with an observation block (mask 0) in the middle, repeated."""
    from learners.batch import LearnerSample

    demo_a = LearnerSample(input_ids=[11, 12, 13] + list(range(200, 212)), prompt_len=3,
                           loss_mask=[1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1])
    demo_b = LearnerSample(input_ids=[21, 22] + list(range(300, 307)), prompt_len=2,
                           loss_mask=[1, 1, 1, 0, 0, 1, 1])
    return [demo_a, demo_b, demo_a, demo_b]


def scenario_sft(out_dir: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from launch.assets import model_path
    from learners.config import LearnerConfig
    from learners.forward import collate, response_logits, token_logprobs
    from learners.sft import SFTCore

    cfg = LearnerConfig(lr=2e-2, warmup_steps=2, micro_batch_tokens=24, bf16=True)
    trainer = SFTCore(model_path("tiny-llama"), cfg)
    data = _demonstrations()
    history = [trainer.train_step(data) for _ in range(10)]
    exported = trainer.export_hf(Path(out_dir) / "sft_hf")
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    # The exported model has learned the demonstrations: its masked NLL is far below the first step's.
    mb = collate(data[:2], torch.device("cpu"))
    with torch.no_grad():
        nll = -token_logprobs(response_logits(model, mb), mb.targets)
    masked_nll = float(nll[mb.loss_mask].mean())
    observed_nll = float(nll[~mb.loss_mask & mb.valid].mean())
    return {"losses": [h["sft/loss"] for h in history], "lrs": [h["sft/lr"] for h in history],
            "num_tokens": history[0]["sft/num_tokens"], "micro_batches_padding": history[0]["sft/padding_share"],
            "exported_masked_nll": masked_nll, "exported_observation_nll": observed_nll}


@pytest.mark.slow
def test_sft_lowers_the_loss_on_masked_tokens_only(tmp_path, tiny_llama_path):
    result = run_scenario("tests.test_learner_sft", "sft", tmp_path)
    losses = result["losses"]
    assert all(v == v for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    assert result["lrs"][:3] == pytest.approx([1e-2, 2e-2, 2e-2])  # linear warmup over 2 steps, then constant
    assert result["num_tokens"] == 2 * (8 + 5)
    # Observation tokens were never trained on: the model learned the demonstrations, not the documents.
    assert result["exported_masked_nll"] < 0.5 * losses[0]
    assert result["exported_observation_nll"] > 2 * result["exported_masked_nll"]


SCENARIOS = {"sft": scenario_sft}

if __name__ == "__main__":
    print("RESULT " + json.dumps(SCENARIOS[sys.argv[1]](sys.argv[2])), flush=True)
