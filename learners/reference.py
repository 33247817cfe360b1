"""The frozen reference policy: logprobs only, for the KL loss.

No optimizer, so no DeepSpeed: a plain HF model in eval mode. It can live on the CPU between calls
(``offload``) so that on a GPU it only holds memory while it computes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from learners.batch import LearnerSample
from learners.distributed import use_cpu_threads
from learners.forward import compute_logprobs


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class ReferenceCore:
    """Same ``logprobs(samples)`` contract as the policy learner.

    ``bf16=True`` matches a bf16 policy's numerics (the KL starts at 0); ``bf16=False`` computes in fp32.
    """

    def __init__(self, model_path: str | os.PathLike, bf16: bool = True, offload: bool = False,
                 micro_batch_tokens: int = 16384, device: str | torch.device | None = None,
                 share_prompts: bool = True) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device) if device is not None else _default_device()
        self.offload = offload and self.device.type != "cpu"
        self.micro_batch_tokens = micro_batch_tokens
        self.share_prompts = share_prompts
        dtype = torch.bfloat16 if bf16 else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype)
        self.model.config.use_cache = False
        self.model.eval().requires_grad_(False)
        self.model.to("cpu" if self.offload else self.device)
        self.pad_id = AutoTokenizer.from_pretrained(str(model_path)).pad_token_id or 0

    @torch.no_grad()
    def logprobs(self, samples: Sequence[LearnerSample]) -> list[list[float]]:
        if self.offload:
            self.model.to(self.device)
        try:
            return compute_logprobs(self.model, samples, self.micro_batch_tokens, self.device, self.pad_id,
                                    share_prompts=self.share_prompts)
        finally:
            if self.offload:
                self.model.to("cpu")
                torch.cuda.empty_cache()


class ReferenceActor:
    """Thin Ray actor over ``ReferenceCore``."""

    def __init__(self, model_path: str, bf16: bool = True, offload: bool = False,
                 micro_batch_tokens: int = 16384, cpu_threads: int = 0, share_prompts: bool = True) -> None:
        use_cpu_threads(cpu_threads)
        self.core = ReferenceCore(model_path, bf16=bf16, offload=offload, micro_batch_tokens=micro_batch_tokens,
                                   share_prompts=share_prompts)

    def logprobs(self, samples: Sequence[LearnerSample]) -> list[list[float]]:
        return self.core.logprobs(samples)

