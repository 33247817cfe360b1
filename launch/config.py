"""Typed configuration: every hyperparameter lives in a documented dataclass.

Hydra composes ``conf/config.yaml`` and its groups on top of the ``Config`` schema registered here, so a misspelled
key in a YAML file or on the command line fails at start, naming the key, before any actor starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from actors.rollout import RolloutConfig
from launch.command_config import ComparisonConfig, EvalConfig, InferConfig, SimulationConfig
from launch.driver.faults import FaultsConfig
from launch.driver.replay import ReplayConfig
from learners.config import LearnerConfig
from simulator.config import SearchConfig, SimulatorConfig
from simulator.curriculum import CurriculumConfig


@dataclass
class ModelConfig:
    """The policy model.

    Attributes:
        name: a shipped asset (``smollm2-135m-instruct``, ``tiny-llama``; see ``launch/assets.py``), a local HF
            folder, or a hub id on machines that reach the hub.
        dtype: weights and compute dtype for vLLM and the learner.
        max_model_len: vLLM's context limit; prompt plus every turn must fit (the paper: 4096 + 500).
    """

    name: str = "smollm2-135m-instruct"
    dtype: str = "bfloat16"
    max_model_len: int = 4096


@dataclass
class DataConfig:
    """Where questions come from.

    Attributes:
        dir: folder holding the files below; relative paths are taken from the repository root.
        train_file, val_file, test_file: QA files in any supported format (see ``actors/dataset.py``).
        corpus_file: the passage corpus the real engines search (jsonl, ``id`` and ``contents``).
        generate_synthetic: build the synthetic world into ``dir`` when its files are missing.
        synthetic_seed, synthetic_entities: the synthetic world's seed and size (number of people).
        shuffle: shuffle the training questions each epoch (seeded).
        stratify: spread each data source evenly over every epoch (``PromptSampler``), so that each step's
            questions mix the sources at their shares of the training set instead of as a shuffle happens to fall.
    """

    dir: str = "data/synthetic"
    train_file: str = "train.parquet"
    val_file: str = "val.parquet"
    test_file: str = "test.parquet"
    corpus_file: str = "corpus.jsonl"
    generate_synthetic: bool = True
    synthetic_seed: int = 0
    synthetic_entities: int = 400
    shuffle: bool = True
    stratify: bool = False


@dataclass
class WandbConfig:
    """Weights & Biases. Offline by default: runs are written locally and can be synced later with ``wandb sync``.

    Attributes:
        mode: ``offline``, ``online`` or ``disabled``.
        project, entity, group, tags: the usual W&B run metadata.
        sample_table_rows: trajectories per step written to the samples table.
    """

    mode: str = "offline"
    project: str = "zerosearch-ray"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    sample_table_rows: int = 4


@dataclass
class LoggerConfig:
    """Run outputs.

    Attributes:
        run_dir: where metrics.jsonl, plots and checkpoints go; defaults to Hydra's run folder.
        run_name: a name for the run (W&B and folder); generated when empty.
        wandb: see ``WandbConfig``.
    """

    run_dir: str = "${hydra:runtime.output_dir}"
    run_name: str = ""
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ClusterConfig:
    """Where actors run. The same fields place actors on a laptop CPU or on a GPU cluster.

    Attributes:
        address: ``None`` starts a local Ray instance; ``auto`` joins the cluster this job was submitted to.
        num_cpus: CPUs for a local Ray instance (None: all).
        rollout_engines: vLLM policy engines, one Ray actor each.
        rollout_tensor_parallel: GPUs per policy engine (tensor parallel); 0 GPUs on CPU.
        rollout_gpus: GPUs per policy engine actor (0 on CPU).
        rollout_cpu_threads: OpenMP threads of each CPU policy engine (``OMP_NUM_THREADS`` of its engine process);
            0: an even share of this machine's usable cores among the engines and whatever computes while they
            generate: the simulator servers when the search is simulated, the learners when rollouts run ahead of
            training (``train.max_staleness`` > 0). So against BM25, in the on-policy loop, in evaluation and in
            inference, the engines have the machine's cores to themselves.
        learners: data-parallel DeepSpeed learner actors.
        learner_gpus: GPUs per learner actor (0 on CPU).
        simulator_servers: vLLM simulator servers in the pool.
        simulator_gpus: GPUs per simulator server (0 on CPU).
        simulator_tensor_parallel: tensor-parallel size of each simulator server.
        vllm_cpu_kvcache_gb: KV-cache size per vLLM engine on the CPU build (VLLM_CPU_KVCACHE_SPACE).
        kv_block_size: tokens per KV-cache block of the policy engines, the prefix cache's unit: a later turn reuses
            the full blocks of the history it shares and recomputes the rest. ``None``: vLLM's default (128 on the
            CPU build, 16 on GPUs). The CPU kernels take multiples of 32.
        gpu_memory_utilization: vLLM's memory share; low on CPU, where the default 0.92 fails.
        actor_start_timeout_s: how long to wait for an actor to come up before failing the run.
        weight_sync: how new weights reach the engines after each update. ``file``: learner rank 0 writes a
            safetensors file and every engine reloads from it (one machine, CPU). ``nccl``: learner rank 0 broadcasts
            them straight from GPU memory to every engine worker (GPU clusters). ``gloo``: the same broadcast over
            gloo, for CPU engines.
        weight_sync_bucket_mb: bytes per broadcast collective, in MiB (``nccl``/``gloo``).
        reference_gpus: GPU share of the frozen reference model (0 on CPU). A fraction lets it share the learner's
            GPU (with ``learner.offload_reference`` it only holds GPU memory while it computes).
        critics: data-parallel DeepSpeed critic actors (``train.algorithm=ppo`` only).
        critic_gpus: GPUs per critic actor (0 on CPU).
    """

    address: str | None = None
    num_cpus: int | None = None
    rollout_engines: int = 1
    rollout_tensor_parallel: int = 1
    rollout_gpus: float = 0
    rollout_cpu_threads: int = 0
    learners: int = 1
    learner_gpus: float = 0
    simulator_servers: int = 1
    simulator_gpus: float = 0
    simulator_tensor_parallel: int = 1
    vllm_cpu_kvcache_gb: float = 1.0
    kv_block_size: int | None = None
    gpu_memory_utilization: float = 0.3
    actor_start_timeout_s: float = 600.0
    weight_sync: str = "file"
    weight_sync_bucket_mb: int = 256
    reference_gpus: float = 0
    critics: int = 1
    critic_gpus: float = 0


@dataclass
class TrainConfig:
    """The RL loop.

    Attributes:
        algorithm: advantage estimator: ``grpo`` (the default), ``dr_grpo``, ``rloo``, ``reinforce`` (raw reward, the
            paper's REINFORCE), ``reinforce_pp``, ``reinforce_pp_baseline`` or ``ppo`` (GAE with a critic, see
            ``Config.critic``).
        total_steps: RL steps (paper: 203). The curriculum and the learning-rate warmup read it too.
        prompts_per_step: distinct questions per step (paper: 64).
        group_size: episodes per question (paper: n_agent = 5); GRPO's group.
        max_staleness: policy versions a trajectory may lag; 0 is strictly on-policy. With K > 0 the rollouts of the
            next K steps run while the learners train, and the loss corrects the lag with an importance ratio against
            the rollout logprobs (truncated when ``learner.tis_cap`` is set).
        gamma: PPO's discount over model tokens (the paper: 1.0).
        lam: PPO's GAE λ (the paper: 1.0).
        kl_penalty: where the KL to the reference goes. ``loss``: a loss term weighted by ``learner.kl_coef`` (GRPO,
            REINFORCE). ``reward``: ``−learner.kl_coef · (log π_old − log π_ref)`` on every model token's reward
            (PPO in the paper). ``auto``: ``reward`` for ``ppo``, ``loss`` otherwise.
        dynamic_filter: drop groups whose rewards are all equal (no GRPO signal) and refill the batch with new
            prompts, up to ``dynamic_filter_rounds`` extra rollouts per step.
        dynamic_filter_rounds: extra rollout rounds a step may spend refilling; the step trains on what it has then.
        skip_update_without_signal: when no group of a step has rewards that differ (after any refill rounds), skip
            that step's learner passes. Under a group baseline every advantage is then 0 and the update would carry
            only the entropy bonus and the KL term, at the cost of a whole update. The step still counts (the
            curriculum, the sampler and the checkpoints advance) and logs ``train/update_skipped`` 1. Group-baseline
            estimators only (grpo, dr_grpo, rloo, reinforce_pp_baseline).
        val_every: every this many steps (0: never), answer the first ``val_samples`` validation questions greedily
            twice, searching the training engine (the simulator, useful documents only) and the real engine
            ``val_engine``, and log both side by side under ``val/<engine>/``: the gap between simulation and reality
            as training goes on.
        val_samples: validation questions per evaluation.
        val_engine: the real engine of validation (``bm25``, ``dense``, ``http``, ``serpapi``; see ``conf/search``).
        save_every: checkpoint every this many steps (and at the end); 0 only at the end.
        rollout_timeout_s: one step's rollout; a stalled engine fails the step instead of hanging the run.
        sync_timeout_s: one weight sync.
        canary_tolerance: largest mean |logprob gap| between engine and learner after a sync, in nats per token.
        canary_text: fixed text whose logprobs are compared after each sync.
        export_hf: write a Hugging Face export with the final checkpoint.
        throughput_probe: after the last step, time plain vLLM ``generate`` at that step's token volume on the same
            engines and report the multi-turn rollout's tokens/s as a ratio of it (``summary.json``).
        warmup: ``auto``, ``on`` or ``off``: fine-tune the policy on protocol demonstrations before RL (see
            ``WarmupConfig``).
    """

    algorithm: str = "grpo"
    total_steps: int = 4
    prompts_per_step: int = 4
    group_size: int = 4
    max_staleness: int = 0
    gamma: float = 1.0
    lam: float = 1.0
    kl_penalty: str = "auto"
    dynamic_filter: bool = False
    dynamic_filter_rounds: int = 2
    skip_update_without_signal: bool = False
    val_every: int = 0
    val_samples: int = 32
    val_engine: str = "bm25"
    save_every: int = 0
    rollout_timeout_s: float = 1800.0
    sync_timeout_s: float = 300.0
    canary_tolerance: float = 0.1
    canary_text: str = "Answer the given question. <search> capital of France </search> <answer> Paris </answer>"
    export_hf: bool = True
    throughput_probe: bool = True
    warmup: str = "auto"


@dataclass
class WarmupConfig:
    """The cold start of small policies: supervised fine-tuning on scripted protocol demonstrations
    (``launch/driver/warmup.py``).
    Their searches are BM25 over the data config's corpus, ``search.top_k`` documents each, as RL will see them.

    ``train.warmup`` decides whether it runs: ``auto`` warms up policies with fewer than ``max_params`` parameters
    (a 135M model never writes ``<search>`` from the prompt alone; the paper's 3B+ models skip it), ``on`` always,
    ``off`` never.

    Attributes:
        demonstrations: grounded demonstrations to train on (the retrieved documents contain the gold answer).
        steps: optimizer steps; each takes ``batch_size`` demonstrations, cycling through them.
        batch_size: demonstrations per optimizer step.
        lr: peak learning rate (reached after ``lr_warmup_steps``, then constant).
        lr_warmup_steps: optimizer steps of linear learning-rate warmup.
        micro_batch_tokens: token budget of one micro-batch, padding included.
        max_params: ``auto`` warms up policies below this many parameters.
        cache: reuse a warmed-up policy built earlier from the same model, corpus, data and settings; it is stored in
            the models folder (``ZEROSEARCH_RAY_MODELS``) under ``warmed/``.
        seed: order of the training questions the demonstrations are written for.
        search_again_share: the probability the cold start leaves on searching again after ``<information>``. Every
            demonstration answers after its one search, so training on them alone teaches "never search twice" with
            certainty (measured: not one second search in 192 two-hop episodes at temperature 1), and RL never
            samples the second search it should reward. For a share ``s``, ``s / (1 - s)`` of the demonstrations get
            a sibling trained on one token only: the one that opens ``<search>`` where the demonstration opened
            ``<answer>``. What to search for is never shown; the queries stay RL's to find. Off by default: at 0.25
            the greedy warm-up policy lost 4.4 SubEM points and RL still made no second search (docs/results.md).
        name_query_share: share of the demonstrations whose query is the name the question is about ("Tavo Merin")
            instead of the whole question. Still one search on the question; what it shows is that a query can be a
            name, so that a second query may name what the first results mentioned.
        keyword_query_share: share of the demonstrations whose query is that name followed by the question's other
            content words ("Tavo Merin city born"). BM25 then ranks the asked-for fact first (95% of single-hop
            training questions on world seed 0, against 73% for the whole question and 53% for the bare name), and
            the query still opens with a name. ``name_query_share + keyword_query_share`` is at most 1.
        cite_evidence: the answering thought quotes the retrieved sentence that holds the answer ("I read that Tavo
            Merin works for Dravik Group.") instead of a stock phrase. It teaches reading the information, and it puts
            the names the first results mention into the policy's own words, where a second query can pick them up.
        cite_query: with ``cite_evidence``, the quote first names the query whose results it read ("Searching Tavo
            Merin, I read that …"). Still one search; after a second search the name just searched is the one to
            read about, so the quote can follow the last block instead of the first.
    """

    demonstrations: int = 128
    steps: int = 16
    batch_size: int = 8
    lr: float = 2.0e-4
    lr_warmup_steps: int = 1
    micro_batch_tokens: int = 4096
    max_params: float = 1.0e9
    cache: bool = True
    seed: int = 0
    search_again_share: float = 0.0
    name_query_share: float = 0.0
    keyword_query_share: float = 0.0
    cite_evidence: bool = False
    cite_query: bool = False


@dataclass
class Config:
    """The whole run. Groups are chosen on the command line (``model=tiny_llama``), fields set with ``key=value``.

    Attributes:
        critic: the PPO critic's learner settings (``conf/critic/``; lr 1e-5, warmup ratio 0.015 and value clip 0.5 in
            the paper). Unused by the other algorithms.
        simulation: simulation tuning (``launch.collect_sim_data``, ``tune_simulator``, ``simulator_report``).
        comparison: the comparison of ``launch.experiment`` (unused by training).
        eval: the evaluation's own settings (``launch.evaluate``; unused by training).
        infer: the inference session's own settings (``launch.infer``; unused by training).
        faults: faults injected on purpose (off by default).
        replay: replay of rare successes, an exploration aid for sparse rewards (off by default).
        seed: seeds prompts order, rollouts and the learners.
        resume: ``off``; ``auto`` continues from the newest checkpoint in the run folder when there is one (else
            starts fresh); or the path of a run folder to continue in. Restores the learners' DeepSpeed states, the
            curriculum, the data position and the RNG; ``metrics.jsonl`` continues without a gap or a repeat.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    critic: LearnerConfig = field(default_factory=LearnerConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    comparison: ComparisonConfig = field(default_factory=ComparisonConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    seed: int = 0
    resume: str = "off"


def register_configs() -> None:
    """Make the schema known to Hydra; ``conf/config.yaml`` lists ``config_schema`` first in its defaults."""
    store = ConfigStore.instance()
    store.store(name="config_schema", node=Config)
