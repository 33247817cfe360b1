"""``RolloutActor``: one vLLM policy engine in a Ray actor, running many search episodes concurrently.

Each episode is one asyncio task over the shared ``AsyncLLM`` engine, so vLLM batches all active turns of all episodes
together while searches are in flight. Trajectories stream out per group: as soon as all samples of one prompt are
done, the group is yielded, so the driver can start on it without waiting for the slowest episode of the batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import signal
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from actors.episode import EpisodeConfig, Generation, run_episode
from actors.protocol import STOP_STRINGS, baseline_prompt_token_ids, parse_action, prompt_token_ids
from actors.trajectory import Trajectory


@dataclass
class RolloutConfig:
    """Sampling and engine settings of the policy rollout.

    Attributes:
        temperature, top_p, top_k: training sampling (paper: 1.0, 0.95, -1); evaluation uses greedy decoding.
        max_prompt_tokens: prompts are left-truncated to this many tokens.
        generate_timeout_s: one generation call; past it that episode ends with finish reason ``error`` and trains
            nothing (loss mask 0), and the others go on (``actors/episode.py``).
        guided_first_turn_regex: if set, the first generation is constrained to this regex (structured outputs).
            For tests with random models, which never write ``</search>`` by chance. vLLM then reports the logprobs of
            the constrained distribution, not the model's.
        enable_prefix_caching: vLLM's prefix cache on the policy engines: the G samples of a group share their
            prompt, and every later turn re-reads the whole history. Safe across weight syncs because every load
            resets the cache (``load_weights``, ``receive_weights``).
        prompt: ``agent``, the paper's prompt: the policy searches as it decides, over several turns; or ``rag``, the
            RAG baseline's prompt with the documents of one search for the question, answered in one turn (single-turn
            RL, the setting of TRL and of ``bench/peer_trl.py``; ``episode.max_turns`` does not apply).
        open_search_share: an exploration lever, off by default (0): the share of sampled training episodes whose
            turns after an ``<information>`` are opened for a search (``EpisodeConfig.open_search``). The tag is the
            environment's (loss mask 0); the thought before it and the query after it are the policy's samples. A
            group whose opened episodes find what the others did not teaches, through the others' advantages, the
            choice to search again. Greedy episodes (validation, evaluation) are never opened.
        open_search_trains_tag: also train the tag of the opened episodes as the policy's tokens
            (``EpisodeConfig.train_opened_tag``): the choice to search again is then taught by the opened episodes'
            own advantages, not only through the others'. Off by default; only with ``open_search_share > 0``.
        open_search_share_end: the share at the run's last step, reached linearly from ``open_search_share`` at
            step 1 (``open_search_share_at``); None keeps the share constant. Annealed to 0, the late steps' episodes
            all search as the policy itself chooses, so their advantages teach *when* to search again, where the
            opened ones taught *how*.
        episode: per-episode limits (turns, token budgets, reward metric).
    """

    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = -1
    max_prompt_tokens: int = 1024
    generate_timeout_s: float = 300.0
    guided_first_turn_regex: str | None = None
    enable_prefix_caching: bool = True
    prompt: str = "agent"
    open_search_share: float = 0.0
    open_search_trains_tag: bool = False
    open_search_share_end: float | None = None
    episode: EpisodeConfig = field(default_factory=EpisodeConfig)

    def __post_init__(self) -> None:
        if not 0.0 <= self.open_search_share <= 1.0:
            raise ValueError(f"rollout.open_search_share={self.open_search_share}: expected a share between 0 and 1")
        end = self.open_search_share_end
        if end is not None and not 0.0 <= end <= 1.0:
            raise ValueError(f"rollout.open_search_share_end={end}: expected a share between 0 and 1, or null for "
                             f"a constant rollout.open_search_share")
        if self.open_search_trains_tag and not max(self.open_search_share, end or 0.0):
            raise ValueError("rollout.open_search_trains_tag=true with rollout.open_search_share=0: no episode is "
                             "opened, so there is no tag to train; set a share above 0")


@dataclass
class EpisodeRequest:
    """One episode to run: a prompt of a group, with what the reward and the simulator need."""

    group_id: str
    question: str
    golden_answers: tuple[str, ...]
    data_source: str
    seed: int
    open_search_share: float | None = None  # this step's share (``open_search_share_at``); None: the rollout's own


def open_search_share_at(cfg: RolloutConfig, step: int, total_steps: int) -> float:
    """The share of episodes opened for a search at ``step`` (1-based) of ``total_steps``: ``open_search_share`` at
    the first step, moving linearly to ``open_search_share_end`` at the last."""
    if cfg.open_search_share_end is None or total_steps <= 1:
        return cfg.open_search_share
    progress = min(max(step - 1, 0) / (total_steps - 1), 1.0)
    return cfg.open_search_share + progress * (cfg.open_search_share_end - cfg.open_search_share)


def opens_search(share: float, seed: int, temperature: float | None) -> bool:
    """Whether the episode of ``seed`` is one of the ``share`` opened for a search (``open_search_share``): a fixed
    draw per seed, so a rerun opens the same episodes; never for greedy decoding."""
    if share <= 0 or temperature == 0.0:
        return False
    return random.Random(f"open-search-{seed}").random() < share


def single_process_engine_core() -> None:
    """Run a one-device vLLM engine as one process beside this one, not two.

    vLLM's CPU build otherwise forces its multiprocess executor: the engine-core process spawns a worker process, and
    each re-imports vLLM. Measured on 2 cores: start-up 20 s against 37 s (tiny-llama), and 79 against 46 tokens/s
    for SmolLM2-135M (the separate worker was bound to one core, with the other reserved for the engine core). With
    more than one device vLLM still picks its multiprocess executor; on a GPU this is vLLM's own default. The one
    process computes with ``OMP_NUM_THREADS`` threads (``cluster.rollout_cpu_threads``, in the engine's environment).
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


class RolloutCore:
    """The pure core of a rollout actor: vLLM engine, tokenizer, search engine, and the episode loop."""

    def __init__(self, model: str, engine_kwargs: dict[str, Any], search_engine: Any, cfg: RolloutConfig) -> None:
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        single_process_engine_core()
        args = AsyncEngineArgs(model=model, worker_extension_cls="actors.weight_transfer.WeightTransferExtension",
                               **engine_kwargs)
        self.llm = AsyncLLM.from_engine_args(args)
        self.search_engine = search_engine
        self.max_model_len = engine_kwargs.get("max_model_len", 4096)
        self.policy_version = 0
        self.weights_checksum: float | None = None  # of the last version loaded (None: the start-up checkpoint)
        # Fault injection (``faults.corrupt_weight_load_at``): (version, mode) of one load to spoil. ``skip``: ignore
        # it, as an engine stuck on old weights would; ``scale``: load it, then scale one tensor.
        self.weight_fault: tuple[int, str] | None = None

    def prompt_ids(self, question: str) -> list[int]:
        return prompt_token_ids(question, self.tokenizer, self.cfg.max_prompt_tokens)

    async def generate(self, context_ids: list[int], max_tokens: int, guided_regex: str | None = None,
                       temperature: float | None = None, stop: tuple[str, ...] | None = None) -> Generation:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        max_tokens = min(max_tokens, self.max_model_len - len(context_ids))
        if max_tokens <= 0:
            return Generation([], [], "length")
        extra: dict[str, Any] = {}
        if guided_regex:
            from vllm.sampling_params import StructuredOutputsParams

            extra["structured_outputs"] = StructuredOutputsParams(regex=guided_regex)
        params = SamplingParams(
            temperature=self.cfg.temperature if temperature is None else temperature,
            top_p=self.cfg.top_p if (temperature is None or temperature > 0) else 1.0,
            top_k=self.cfg.top_k,
            max_tokens=max_tokens,
            stop=list(stop or STOP_STRINGS),
            include_stop_str_in_output=True,
            logprobs=0,
            output_kind=RequestOutputKind.FINAL_ONLY,  # one result per turn: no per-token outputs to build and await
            **extra,
        )
        final = None
        async for output in self.llm.generate(TokensPrompt(prompt_token_ids=context_ids), params,
                                              request_id=uuid.uuid4().hex):
            final = output
        completion = final.outputs[0]
        ids = list(completion.token_ids)
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, ids)]
        return Generation(ids, logprobs, "length" if completion.finish_reason == "length" else "stop")

    async def run(self, request: EpisodeRequest, noise_prob: float, temperature: float | None = None,
                  search_engine: Any = None) -> Trajectory:
        """One episode; ``search_engine`` replaces the training engine (validation against a real one)."""
        search_engine = search_engine or self.search_engine
        episode_cfg = self.cfg.episode
        if self.cfg.prompt == "rag":
            prompt_ids = await self.rag_prompt_ids(request, search_engine, noise_prob)
            episode_cfg = dataclasses.replace(episode_cfg, max_turns=0)
        else:
            prompt_ids = self.prompt_ids(request.question)
        share = self.cfg.open_search_share if request.open_search_share is None else request.open_search_share
        if opens_search(share, request.seed, temperature):
            episode_cfg = dataclasses.replace(episode_cfg, open_search=True,
                                              train_opened_tag=self.cfg.open_search_trains_tag)
        turn = {"n": 0}

        async def generate(context: list[int], budget: int, stop: tuple[str, ...] | None = None) -> Generation:
            regex = self.cfg.guided_first_turn_regex if turn["n"] == 0 else None
            turn["n"] += 1
            return await asyncio.wait_for(self.generate(context, budget, regex, temperature, stop),
                                          timeout=self.cfg.generate_timeout_s)

        version = self.policy_version
        result = await run_episode(prompt_ids, request.question, request.golden_answers, generate, search_engine,
                                   self.tokenizer, episode_cfg, noise_prob, request.seed)
        trajectory = Trajectory(
            uid=uuid.uuid4().hex, group_id=request.group_id, prompt_ids=prompt_ids,
            response_ids=result.response_ids, loss_mask=result.loss_mask, rollout_logprobs=result.logprobs,
            reward=result.reward, golden_answers=request.golden_answers, data_source=request.data_source,
            policy_version=version, noise_prob=noise_prob, stats=result.stats, response_text=result.response_text,
        )
        trajectory.check()
        return trajectory

    async def answer_once(self, request: EpisodeRequest, retrieve: bool, top_k: int) -> dict[str, Any]:
        """The Direct (``retrieve=False``) or RAG baseline: one greedy generation, after one search for the question
        itself when ``retrieve``. Returns the fields of an evaluation record."""
        from actors.reward import extract_answer

        if retrieve:
            prompt = await self.rag_prompt_ids(request, self.search_engine, top_k=top_k)
        else:
            prompt = baseline_prompt_token_ids(request.question, self.tokenizer, None, self.cfg.max_prompt_tokens)
        generation = await asyncio.wait_for(self.generate(prompt, self.cfg.episode.max_tokens_per_turn,
                                                          temperature=0.0), timeout=self.cfg.generate_timeout_s)
        text = self.tokenizer.decode(generation.token_ids, skip_special_tokens=True)
        return {"prediction": extract_answer(text), "response": text, "searches": int(retrieve),
                "generated_tokens": len(generation.token_ids), "turns": 1,
                "invalid_actions": int(parse_action(text).kind != "answer")}

    async def rag_prompt_ids(self, request: EpisodeRequest, search_engine: Any, noise_prob: float = 0.0,
                             top_k: int = 0) -> list[int]:
        """The RAG prompt: the documents of one search for the question itself, then the question."""
        from simulator.base import SearchContext

        ctx = SearchContext(question=request.question, golden_answers=request.golden_answers, noise_prob=noise_prob,
                            seed=request.seed, top_k=top_k)
        documents = (await search_engine.search(request.question, ctx)).text
        return baseline_prompt_token_ids(request.question, self.tokenizer, documents, self.cfg.max_prompt_tokens)

    async def load_weights(self, path: str, version: int, timeout_s: float) -> float:
        started = time.perf_counter()
        if self._fault(version) == "skip":
            return 0.0
        loaded = await asyncio.wait_for(self.llm.collective_rpc("load_policy_weights", args=(path,)),
                                        timeout=timeout_s)
        await self._after_load(version, loaded)
        return time.perf_counter() - started

    def _fault(self, version: int) -> str | None:
        if self.weight_fault is not None and self.weight_fault[0] == version:
            return self.weight_fault[1]
        return None

    async def _after_load(self, version: int, per_worker: list[dict[str, float]]) -> None:
        self._loaded(version, per_worker)
        if self._fault(version) == "scale":
            await self.llm.collective_rpc("corrupt_policy_weights", args=(2.0,))
        await self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights

    def _loaded(self, version: int, per_worker: list[dict[str, float]]) -> None:
        """Record what every worker loaded; tensor-parallel workers each load the whole published state."""
        sums = {round(w["checksum"], 6) for w in per_worker}
        if len(sums) != 1:
            raise RuntimeError(f"the workers of this engine loaded different weights for version {version}: {sums}")
        self.policy_version = version
        self.weights_checksum = per_worker[0]["checksum"]

    def weights_state(self) -> dict[str, Any]:
        """The version this engine serves and the checksum of the weights it loaded for it."""
        return {"version": self.policy_version, "checksum": self.weights_checksum}

    async def init_weight_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                backend: str, timeout_s: float) -> list[int]:
        """Every worker of this engine joins learner rank 0's broadcast group (``actors/weight_transfer.py``)."""
        return await asyncio.wait_for(
            self.llm.collective_rpc("init_weight_group",
                                    args=(master_address, master_port, rank_offset, world_size, timeout_s, backend)),
            timeout=timeout_s + 30)

    async def check_weights(self, manifest: dict, timeout_s: float) -> None:
        await asyncio.wait_for(self.llm.collective_rpc("check_policy_weights", args=(manifest,)), timeout=timeout_s)

    async def receive_weights(self, manifest: dict, bucket_bytes: int, version: int, timeout_s: float) -> float:
        """Receive one broadcast version in place, while the learners send it."""
        started = time.perf_counter()
        received = await asyncio.wait_for(
            self.llm.collective_rpc("receive_policy_weights", args=(manifest, bucket_bytes)), timeout=timeout_s)
        if self._fault(version) == "skip":  # received, then dropped: the broadcast group stays in step
            return time.perf_counter() - started
        await self._after_load(version, received)
        return time.perf_counter() - started

    async def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        """Logprob of each token after the first, under the engine's current weights: the weight-sync canary."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        final = None
        async for output in self.llm.generate(TokensPrompt(prompt_token_ids=token_ids), params,
                                              request_id=uuid.uuid4().hex):
            final = output
        return [step[token].logprob for step, token in zip(final.prompt_logprobs[1:], token_ids[1:])]


    async def raw_generate(self, prompts: list[list[int]], max_tokens: int | list[int]) -> dict[str, float]:
        """One batch of plain single-turn generations of exactly ``max_tokens`` each (one count for all, or one per
        prompt): the engine's raw throughput.

        The yardstick for multi-turn rollouts on the same engine and the same sampling: no stop strings, no search,
        no re-prefill of observations, every request submitted at once.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        counts = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)

        async def one(ids: list[int], count: int) -> int:
            # The training's sampling, top-p included: on CPU its sort of the vocabulary is a large part of a step.
            params = SamplingParams(max_tokens=count, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                                    top_k=self.cfg.top_k, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
            final = None
            async for output in self.llm.generate(TokensPrompt(prompt_token_ids=ids), params,
                                                  request_id=uuid.uuid4().hex):
                final = output
            return len(final.outputs[0].token_ids)

        started = time.perf_counter()
        tokens = sum(await asyncio.gather(*[one(ids, count) for ids, count in zip(prompts, counts)]))
        seconds = time.perf_counter() - started
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9)}


class RolloutActor:
    """Thin Ray shell over ``RolloutCore``. Created with ``ray.remote(RolloutActor).options(...)`` by the driver."""

    def __init__(self, model: str, engine_kwargs: dict[str, Any], search_factory: Any, cfg: RolloutConfig,
                 env: dict[str, str] | None = None, validation_search_factory: Any = None,
                 weight_fault: tuple[int, str] | None = None) -> None:
        os.environ.update(env or {})
        self.core = RolloutCore(model, engine_kwargs, search_factory(), cfg)
        self.core.weight_fault = weight_fault
        # A second, real engine for validation next to the simulator (``train.val_every``).
        self.validation_search = validation_search_factory() if validation_search_factory else None

    async def ready(self) -> bool:
        return True

    async def rollout(self, requests: list[EpisodeRequest], group_size: int, noise_prob: float,
                      temperature: float | None = None, validation_engine: bool = False, die_after_first: bool = False):
        """Run ``group_size`` episodes per request; yield each group's trajectories as soon as the group is done.
        ``validation_engine`` searches the real validation engine instead of the training one. ``die_after_first`` is
        fault injection: the process SIGKILLs itself once its first group is out, with the others still running."""
        if validation_engine and self.validation_search is None:
            raise ValueError("this rollout actor was started without a validation search engine")
        engine = self.validation_search if validation_engine else None

        async def run_group(request: EpisodeRequest) -> list[Trajectory]:
            episodes = [self.core.run(_with_seed(request, request.seed * 100 + k), noise_prob, temperature, engine)
                        for k in range(group_size)]
            return list(await asyncio.gather(*episodes))

        for finished in asyncio.as_completed([run_group(r) for r in requests]):
            yield await finished
            if die_after_first:
                os.kill(os.getpid(), signal.SIGKILL)

    async def answer(self, requests: list[EpisodeRequest], retrieve: bool, top_k: int) -> list[dict[str, Any]]:
        """The Direct or RAG baseline on every request, concurrently (vLLM batches them)."""
        return list(await asyncio.gather(*(self.core.answer_once(r, retrieve, top_k) for r in requests)))

    async def load_weights(self, path: str, version: int, timeout_s: float = 120.0) -> float:
        return await self.core.load_weights(path, version, timeout_s)

    async def prompt_logprobs(self, token_ids: list[int]) -> list[float]:
        return await self.core.prompt_logprobs(token_ids)

    async def raw_generate(self, prompts: list[list[int]], max_tokens: int | list[int]) -> dict[str, float]:
        return await self.core.raw_generate(prompts, max_tokens)

    async def init_weight_group(self, *args) -> list[int]:
        return await self.core.init_weight_group(*args)

    async def check_weights(self, manifest: dict, timeout_s: float) -> None:
        await self.core.check_weights(manifest, timeout_s)

    async def receive_weights(self, manifest: dict, bucket_bytes: int, version: int, timeout_s: float) -> float:
        return await self.core.receive_weights(manifest, bucket_bytes, version, timeout_s)

    async def weights_state(self) -> dict[str, Any]:
        return self.core.weights_state()


def _with_seed(request: EpisodeRequest, seed: int) -> EpisodeRequest:
    return dataclasses.replace(request, seed=seed)
