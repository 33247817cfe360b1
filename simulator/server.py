"""One simulation LLM served by vLLM's ``AsyncLLM`` inside an async Ray actor.

The server does one thing: chat-format a prompt, sample, and return the text and its token count. Routing, retries,
restarts, the cache and the counters live one level up, in ``simulator/pool.py``, which is why this file stays small.

The parts that do not need a running engine (engine arguments, chat formatting, sampling parameters) are plain
functions, so they are tested and reused without starting vLLM. ``SimulatorServer`` is a plain class; Ray turns it
into an actor with ``start_server``, which reads the actor's resources (CPUs, GPUs) from ``SimulatorConfig``.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from simulator.config import SimulatorConfig

# What a caller may override per request (the OpenAI-compatible front end forwards these from the request body).
# ``ignore_eos`` is for benchmarks, which need equal work per request.
SAMPLING_KEYS = ("temperature", "top_p", "max_tokens", "seed", "stop", "ignore_eos")

Messages = list[dict[str, Any]]


def simulator_messages(prompt: str | Messages) -> Messages:
    """The spec's request: an empty system message, then the simulator prompt as the user turn.

    A message list is passed through, so that the OpenAI-compatible server can forward any chat request.
    """
    if isinstance(prompt, str):
        return [{"role": "system", "content": ""}, {"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": flatten_content(m.get("content", ""))} for m in prompt]


def flatten_content(content: Any) -> str:
    """OpenAI message content is a string or a list of parts; the original client sends ``[{"type": "text", ...}]``."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type", "text") == "text":
                texts.append(str(part.get("text", "")))
            else:
                raise ValueError(f"unsupported message content part {part!r:.100}; only text parts are served")
        return "".join(texts)
    raise ValueError(f"message content must be a string or a list of text parts, got {type(content).__name__}")


def chat_prompt_ids(tokenizer: Any, prompt: str | Messages) -> list[int]:
    """Token ids of the chat-formatted prompt, ending with the assistant header.

    Formatting and tokenizing are done here rather than inside vLLM so that the prompt length is known exactly and
    no special tokens are added twice (the template already writes them). A tokenizer without a chat template gets
    the raw text of the last message, as the spec's chat-template rule says.
    """
    messages = simulator_messages(prompt)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = messages[-1]["content"]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sampling_kwargs(cfg: SimulatorConfig, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``SamplingParams`` keyword arguments: the config's defaults, with the request's overrides on top."""
    kwargs: dict[str, Any] = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens}
    for key, value in (overrides or {}).items():
        if key not in SAMPLING_KEYS:
            raise ValueError(f"unsupported sampling option {key!r}; supported: {list(SAMPLING_KEYS)}")
        if value is not None:
            kwargs[key] = value
    return kwargs


def engine_kwargs(cfg: SimulatorConfig, model_path: str) -> dict[str, Any]:
    """``AsyncEngineArgs`` keyword arguments for one server."""
    return {
        "model": model_path,
        "dtype": cfg.dtype,
        "max_model_len": cfg.max_model_len,
        "enforce_eager": cfg.enforce_eager,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "seed": cfg.seed,
        "enable_prefix_caching": cfg.enable_prefix_caching,
        "disable_log_stats": True,
    }


def cpu_threads_bind(cfg: SimulatorConfig, index: int, cores: list[int] | None = None) -> str:
    """The cores of server ``index`` (``0,1``): with ``spread``, an even slice of the usable cores, or the last
    ``cpu_threads`` of it."""
    if cfg.cpu_threads_bind != "spread":
        return cfg.cpu_threads_bind
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    per_server = max(1, len(cores) // cfg.num_servers)
    start = (index * per_server) % len(cores)
    mine = cores[start : start + per_server]
    return ",".join(str(c) for c in (mine[-cfg.cpu_threads:] if cfg.cpu_threads > 0 else mine))


def cpu_engine_env(cfg: SimulatorConfig, index: int, cores: list[int] | None = None) -> dict[str, str]:
    """Environment of a CPU server's engine, read by vLLM and OpenMP when the engine process starts.

    The engine runs as one process, not vLLM's CPU default of an engine-core process that spawns a worker: that
    start-up re-imports vLLM twice (measured on 2 cores: 20 s against 37 s), and vLLM's binding then leaves one core
    to the idle engine core (79 against 46 tokens/s for SmolLM2-135M). The OpenMP threads of that one process are
    bound here to the server's cores, as vLLM's own binding does for its worker. ``auto`` and ``nobind`` leave
    OpenMP to its defaults (Ray's ``OMP_NUM_THREADS``, the actor's CPUs).
    """
    env = {"VLLM_CPU_KVCACHE_SPACE": str(max(1, int(cfg.kvcache_gb))), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    bind = cpu_threads_bind(cfg, index, cores)
    if bind in ("auto", "nobind"):
        return env
    core_ids = [str(c) for part in bind.split(",") for c in _core_range(part)]
    return env | {"OMP_NUM_THREADS": str(len(core_ids)), "OMP_PLACES": "{" + ",".join(core_ids) + "}",
                  "OMP_PROC_BIND": "true"}


def _core_range(part: str) -> range:
    """``"3"`` or ``"2-4"`` of a core list, as a range of core ids."""
    first, _, last = part.strip().partition("-")
    try:
        return range(int(first), int(last or first) + 1)
    except ValueError:
        raise ValueError(f"simulator.cpu_threads_bind: {part!r} is not a core id or range; expected a list like "
                         f"'0-3' or '0,2', or 'spread', 'auto', 'nobind'") from None


class SimulatorServer:
    """The body of one simulator server actor: a vLLM ``AsyncLLM`` engine and its tokenizer.

    Async methods let one actor take many requests at once; vLLM batches them (continuous batching), which is where
    the throughput comes from.
    """

    def __init__(self, cfg: SimulatorConfig, index: int = 0) -> None:
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        if cfg.gpus_per_server <= 0:
            os.environ.update(cpu_engine_env(cfg, index))
        self.cfg = cfg
        self.index = index
        self.model_path = cfg.model  # resolved by the caller (launch.assets.resolve_simulator)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(cfg, self.model_path)))
        self.started_at = time.time()
        self.requests = 0

    async def generate(self, prompt: str | Messages, sampling: dict[str, Any] | None = None) -> dict[str, Any]:
        """Sample one reply. Returns ``text``, ``num_tokens`` (generated), ``prompt_tokens`` and ``finish_reason``.

        A prompt longer than the context leaves no room to generate; it is rejected here with a clear error rather
        than deep inside vLLM.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = chat_prompt_ids(self.tokenizer, prompt)
        kwargs = sampling_kwargs(self.cfg, sampling)
        room = self.cfg.max_model_len - len(ids)
        if room < 1:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit max_model_len={self.cfg.max_model_len}")
        kwargs["max_tokens"] = min(kwargs["max_tokens"], room)
        self.requests += 1
        final = None
        async for output in self.engine.generate(
            TokensPrompt(prompt_token_ids=ids), SamplingParams(**kwargs), request_id=uuid.uuid4().hex
        ):
            final = output
        completion = final.outputs[0]
        return {
            "text": completion.text,
            "num_tokens": len(completion.token_ids),
            "prompt_tokens": len(ids),
            "finish_reason": completion.finish_reason or "stop",
        }

    async def health(self) -> dict[str, Any]:
        """Raises when the engine is dead (vLLM's own check), so a health call that fails or times out means restart."""
        await self.engine.check_health()
        import ray

        return {"index": self.index, "model": self.cfg.model, "requests": self.requests, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "uptime_s": time.time() - self.started_at}

    def shutdown(self) -> None:
        self.engine.shutdown()


PLACEMENT_SLIVER = 0.001  # of ``placement_resource`` per server: any number of servers fit on a node that offers 1


def start_server(cfg: SimulatorConfig, index: int = 0, server_cls: type = SimulatorServer, pinned: bool = True):
    """Create one server actor with the resources the config asks for. Returns the actor handle at once.

    ``server_cls`` is the actor body; tests pass stand-ins here (a server that never answers) to test the pool above.
    ``pinned``: ask for ``cfg.placement_resource`` (when set), so that the server starts on a simulation node.
    """
    import ray

    actor_cls = ray.remote(server_cls)
    resources = {cfg.placement_resource: PLACEMENT_SLIVER} if pinned and cfg.placement_resource else None
    return actor_cls.options(
        num_cpus=cfg.cpus_per_server,
        num_gpus=cfg.gpus_per_server * max(1, cfg.tensor_parallel_size),
        resources=resources,
        max_concurrency=1000,
        max_restarts=0,  # the pool restarts servers itself, and counts it
    ).remote(cfg, index)


def live_nodes_offering(resource: str) -> list[str]:
    """The ids of the live nodes of the cluster that offer ``resource``."""
    import ray

    return [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(resource, 0) > 0]
