"""A vLLM worker extension that loads new policy weights in place (the CPU weight-sync path).

vLLM's CPU backend prepacks linear weights at start-up, so ``model.load_weights`` after start-up writes into empty
parameters. ``model_runner.reload_weights`` reprocesses the weights as at start-up, which is what we need. The learner
publishes one safetensors file per policy version; each worker streams it in from there (shared memory on Linux).

One gap in vLLM 0.32's in-place reload on CPU: an embedding layer also keeps a prepacked GEMM copy of its weight for a
tied ``lm_head``, and the reload refreshes the weight but not that copy. A reloaded engine then scores tokens with the
old output projection (measured: 0.04 nats/token off a fresh engine on tiny-llama). We rebuild the copy after each
reload; the weight-sync test compares a reloaded engine with the learner to keep this honest.
"""

from __future__ import annotations

from learners.weight_wire import weights_checksum


class WeightLoaderExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); methods run inside each worker process."""

    def load_policy_weights(self, path: str) -> dict[str, float]:
        """Reload from ``path``; returns the tensors loaded and the Σ|x| checksum of what was read (the driver compares
        it with the learner's, ``learners/weight_wire.weights_checksum``)."""
        from safetensors import safe_open
        from vllm.config import set_current_vllm_config

        loaded = {"tensors": 0, "checksum": 0.0}

        def tensors():
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    loaded["tensors"] += 1
                    loaded["checksum"] += weights_checksum([tensor])
                    yield name, tensor

        with set_current_vllm_config(self.vllm_config):
            self.model_runner.reload_weights(weights_iterator=tensors())
            self._repack_embedding_gemms()
        return loaded

    def corrupt_policy_weights(self, factor: float) -> str:
        """Fault injection: scale the token embedding in place after a load whose checksum was already taken, as a
        broken in-place reload would. Only the canary can see it. Returns the module's name."""
        import torch
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        for name, module in self.model_runner.get_model().named_modules():
            if isinstance(module, VocabParallelEmbedding):
                with torch.no_grad():
                    module.weight.mul_(factor)
                self._repack_embedding_gemms()
                return name
        raise RuntimeError("this model has no token embedding to corrupt")

    def _repack_embedding_gemms(self) -> int:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        repacked = 0
        for module in self.model_runner.get_model().modules():
            if isinstance(module, VocabParallelEmbedding) and hasattr(module, "cpu_linear"):
                dispatch_cpu_unquantized_gemm(module, remove_weight=False)
                repacked += 1
        return repacked
