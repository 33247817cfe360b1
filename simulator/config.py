"""Configuration of the simulated search engine and of the engine that training searches with.

``SimulatorConfig`` describes the simulation LLM and its serving (how many vLLM servers, their resources, timeouts,
retries, cache). ``SearchConfig`` says which engine the policy searches with during training and carries each engine's
options. Both are plain dataclasses so that Hydra can validate YAML files in ``conf/simulator/`` and ``conf/search/``
against them, and so that they pickle cheaply into Ray actors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SIMULATOR_MODES = ("sft", "prompt")
SEARCH_ENGINES = ("simulated", "bm25", "dense", "http", "serpapi", "openai")


@dataclass
class SimulatorConfig:
    """The simulation LLM (spec section 2) and the pool of vLLM servers that runs it.

    Attributes:
        model: a shipped asset name (``smollm2-135m-instruct``, ``tiny-llama``), a local HF folder, or a hub id.
        mode: ``sft`` for a fine-tuned simulator checkpoint, ``prompt`` for an off-the-shelf instruct model; picks the
            prompt template (``simulator/templates.py``).
        version: a label of the simulator weights, part of the cache key so that a new simulator never serves an old
            one's cached documents. Empty means ``"{model}:{mode}"``.
        temperature, top_p, max_tokens: sampling. The original samples at 0.8 with 600 new tokens (500 at paper time).
        num_servers: vLLM servers (Ray actors) in the pool; the original ran sglang with data parallel 2. Under
            ``launch.train`` the cluster group (``cluster.simulator_servers``, ``simulator_gpus``,
            ``simulator_tensor_parallel``) sets this, ``gpus_per_server`` and ``tensor_parallel_size``.
        cpus_per_server, gpus_per_server: Ray resources of each server actor (0 GPUs on CPU machines).
        placement_resource: a custom Ray resource that marks the nodes meant for simulation (``ray start
            --resources='{"simulator": 1}'``); each server then asks for a sliver of it, so it starts on one of those
            nodes. Empty: anywhere. A preference, not a promise: a server restarted when no live node offers the
            resource any more (the node was lost) starts wherever the cluster has room, and the pool logs it.
        tensor_parallel_size: vLLM tensor parallelism inside one server (GPU only).
        max_model_len: vLLM context limit; the prompt-mode prompt is ~500 tokens plus ``max_tokens`` new ones.
        dtype, enforce_eager, gpu_memory_utilization: vLLM engine options (0.3 and eager suit the CPU build).
        enable_prefix_caching: reuse the KV cache of shared prompt prefixes. Every request starts with the same
            template (about 500 tokens in prompt mode) and the weights never change, so it is always safe; vLLM's
            CPU build leaves it off unless asked.
        kvcache_gb: ``VLLM_CPU_KVCACHE_SPACE`` for CPU servers (whole GiB); ignored when the server has a GPU.
        cpu_threads_bind: the cores a CPU server's OpenMP threads are bound to. ``spread`` gives server i its own
            slice of the machine's cores, so N servers on one machine do not fight over one core; a list (``0-3``,
            ``0,2``) binds every server to it; ``auto`` and ``nobind`` leave the threads unbound, one per CPU of the
            server's actor.
        cpu_threads: with ``spread``, the cores each server takes from the end of its slice; 0: the whole slice. The
            CPU default is 1: on 2 cores the server computes on the last one and leaves the first to the policy
            engine's one thread. Measured in ``make train``: a median of 4.1–4.8 s per simulated search against
            9.0–9.5 s with both cores, where the server's threads and the engine's contended.
        seed: the engine's sampling seed, so a run's simulator outputs are reproducible for a fixed request order.
        request_timeout_s: limit of one generation attempt on one server. A hung server costs at most this much.
        max_attempts: attempts per call, each on a different live server when there is one; after the last failure
            the call returns "No information available" and counts a failure (the original retried forever).
        health_timeout_s: limit of one health check; a server that misses it is restarted.
        health_check_interval_s: period of the pool's background health checks (0 turns them off).
        startup_timeout_s: limit for a (re)started server to load its model and answer a health check.
        cache_size: entries of the pool's LRU cache keyed by (query, useful, question, answer, version); 0 = off.
            Off by default: at temperature 0.8 a cache changes the data distribution (repeated queries get
            identical documents).
        latency_window: how many recent call latencies the p50/p95 statistics are computed over.
    """

    model: str = "smollm2-135m-instruct"
    mode: str = "prompt"
    version: str = ""
    temperature: float = 0.8
    top_p: float = 1.0
    max_tokens: int = 600
    num_servers: int = 1
    cpus_per_server: float = 1.0
    gpus_per_server: float = 0.0
    placement_resource: str = ""
    tensor_parallel_size: int = 1
    max_model_len: int = 2048
    dtype: str = "bfloat16"
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.3
    enable_prefix_caching: bool = True
    kvcache_gb: int = 1
    cpu_threads_bind: str = "spread"
    cpu_threads: int = 0
    seed: int = 0
    request_timeout_s: float = 120.0
    max_attempts: int = 3
    health_timeout_s: float = 30.0
    health_check_interval_s: float = 30.0
    startup_timeout_s: float = 600.0
    cache_size: int = 0
    latency_window: int = 10_000

    def __post_init__(self) -> None:
        if self.mode not in SIMULATOR_MODES:
            raise ValueError(f"simulator.mode: unknown mode {self.mode!r}; choose one of {list(SIMULATOR_MODES)}")
        if self.num_servers < 1:
            raise ValueError(f"simulator.num_servers must be at least 1, got {self.num_servers}")
        if self.max_attempts < 1:
            raise ValueError(f"simulator.max_attempts must be at least 1, got {self.max_attempts}")
        if self.request_timeout_s <= 0 or self.health_timeout_s <= 0 or self.startup_timeout_s <= 0:
            raise ValueError("simulator: request_timeout_s, health_timeout_s and startup_timeout_s must be > 0")

    @property
    def cache_version(self) -> str:
        return self.version or f"{self.model}:{self.mode}"


@dataclass
class SearchConfig:
    """Which engine the policy searches with during training, and each engine's options.

    The paper trains against the simulator (``simulated``) and evaluates against real engines; any engine can train.

    Attributes:
        engine: ``simulated`` (our vLLM pool), ``openai`` (an external OpenAI-compatible simulator server, as the
            original used sglang), or a real engine: ``bm25``, ``dense``, ``http`` (a ``/retrieve`` server),
            ``serpapi``.
        top_k: documents per search (the paper: 5).
        timeout_s: limit of one search as the rollout sees it. For ``simulated`` it bounds the call to the pool actor,
            so it should exceed the pool's ``max_attempts * request_timeout_s``.
        retries: extra attempts after the first for the remote engines (``openai``, ``http``, ``serpapi``).
        corpus_file, index_dir: the jsonl corpus (and optional index folder) of ``bm25`` and ``dense``. Empty means
            the data config's corpus.
        url: the ``/retrieve`` endpoint of ``http``.
        request_shape: ``zerosearch`` or ``search-r1`` request body for ``http``.
        api_key_env: the environment variable holding the SerpAPI key.
        openai_urls: base URLs of OpenAI-compatible simulator servers for ``openai``; one is picked at random per
            call. ``http://host:port/v1``; a bare ``host`` or ``host:port`` gets ``http://``, port 6001 and ``/v1``.
        openai_model: the ``model`` field of requests; the original sent ``''``.
    """

    engine: str = "simulated"
    top_k: int = 5
    timeout_s: float = 400.0
    retries: int = 2
    corpus_file: str = ""
    index_dir: str = ""
    url: str = "http://127.0.0.1:6002/retrieve"
    request_shape: str = "zerosearch"
    api_key_env: str = "SERPAPI_API_KEY"
    openai_urls: list[str] = field(default_factory=lambda: ["http://127.0.0.1:6001/v1"])
    openai_model: str = ""

    def __post_init__(self) -> None:
        if self.engine not in SEARCH_ENGINES:
            raise ValueError(f"search.engine: unknown engine {self.engine!r}; choose one of {list(SEARCH_ENGINES)}")
        if self.timeout_s <= 0 or self.retries < 0:
            raise ValueError("search: timeout_s must be > 0 and retries >= 0")
