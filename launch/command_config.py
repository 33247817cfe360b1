"""The settings of the commands other than training, one group each in the one ``Config`` schema (``launch/config.py``).

Every command reads the training groups for what they name (``model``, ``data``, ``search``, ``simulator``,
``rollout``, ``cluster``), so an override means the same thing in every command; what only one command reads is its
group here: ``simulation`` (simulation tuning), ``comparison`` (``launch.experiment``), ``eval`` (``launch.evaluate``)
and ``infer`` (``launch.infer``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

EVAL_METHODS = ("direct", "rag", "agent")


@dataclass
class EvalConfig:
    """An evaluation (``python -m launch.evaluate``). The policy is ``model.name`` (an asset name, HF folder, hub id,
    or a training run folder: its newest ``checkpoints/step_*/hf``), searching ``search`` with training's episode
    limits (``rollout.episode``), greedily, on ``cluster.rollout_engines`` engines. The results go to the run folder,
    ``logger.run_dir``, as training's do.

    Attributes:
        benchmarks: names to evaluate (``nq`` … ``bamboogle``, ``synthetic``); empty: every benchmark found in
            ``data.dir`` (a missing one is reported and skipped). The synthetic world's test split is the benchmark
            ``synthetic``; the world is generated when ``data.dir`` does not exist yet (``data.generate_synthetic``).
        methods: any of ``direct`` (no search), ``rag`` (one search for the question, in the prompt), ``agent`` (the
            paper's prompt: the policy searches as it decides).
        limit: questions per benchmark, the first ones in file order (the paper: 500).
        timeout_s: bound on each method's whole pass over one benchmark.
        in_flight: agent episodes each engine runs at once; the others wait their turn. Each generation call has
            ``rollout.generate_timeout_s``, and a call that waits in the engine's queue behind hundreds of others
            times out. With all 380 questions of the synthetic test split in flight on one CPU engine, a policy that
            searches twice lost 255 of its episodes that way, which then scored as unanswered. 0: all at once.
    """

    benchmarks: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=lambda: list(EVAL_METHODS))
    limit: int = 500
    timeout_s: float = 3600.0
    in_flight: int = 64


@dataclass
class InferConfig:
    """An inference session (``python -m launch.infer``): the policy ``model.name`` answers questions with the
    search protocol against ``search``, greedily, and prints each trace.

    Attributes:
        input: a questions file for batch mode (one question per line, or jsonl with a ``question`` field); empty:
            interactive, from standard input.
        output: where batch mode writes its jsonl (default: ``input`` with ``.answers.jsonl``).
    """

    input: str = ""
    output: str = ""


@dataclass
class SimCollectConfig:
    """Collecting and labelling real search results for simulator tuning (``launch.collect_sim_data``, spec section 3).

    The policy is the run's ``model`` (warmed up first when ``train.warmup`` says so, exactly as training would), and
    it answers training questions with the search protocol against a real engine, ``search.top_k`` documents per
    search (and so per SFT target; the simulator is asked for five).

    Attributes:
        engine: the real engine: ``bm25``, ``dense``, ``http`` or ``serpapi``; its options (corpus, url, key) are the
            ``search`` group's.
        questions: training questions answered (the first ones of a seeded shuffle of the train split).
        samples_per_question: episodes per question; sampled at ``temperature``, several give a question both right
            and wrong trajectories (and often the same query twice, which is kept once per label).
        temperature: the policy's sampling temperature.
        label: ``v1``, the paper's: every search of an episode whose answer is correct (SubEM) gives useful documents,
            of a wrong one noisy documents; ``rule``, v2 with a rule: useful when a document contains a gold answer;
            ``llm``, v2 with an LLM judge served by a simulator pool (``judge_model``).
        judge_model: the LLM judge of ``label=llm``; empty: the run's ``simulator.model``.
        val_fraction: share of questions held out, chosen by a hash of the question (so all queries of a question
            fall on the same side, and the split does not depend on the order of collection).
        balance: downsample the larger class of each split, so useful and noisy examples are equal in number.
        relabel: label the searches of the collection already in ``{simulation.dir}/data`` again (another ``label``
            rule, split or balance) instead of collecting.
        engines: vLLM policy engines (Ray actors) the questions are spread over.
        timeout_s: limit of the whole collection, and of the judge's pass.
    """

    engine: str = "bm25"
    questions: int = 200
    samples_per_question: int = 1
    temperature: float = 1.0
    label: str = "v1"
    judge_model: str = ""
    val_fraction: float = 0.25
    balance: bool = True
    relabel: bool = False
    engines: int = 1
    timeout_s: float = 3600.0


@dataclass
class SimTuneConfig:
    """Supervised fine-tuning of the simulator on collected data (``launch.tune_simulator``).

    The model tuned is the run's ``simulator.model``. The paper's recipe (LLaMA-Factory) is lr 1e-6, batch size 2,
    1,000 steps on about 20k balanced examples for a 3-14B simulator; the CPU default tunes a 135M model on a few
    hundred examples, which takes a far larger learning rate and far fewer steps (``make simulator`` fits in about
    20 minutes on two cores).

    Attributes:
        steps: optimizer steps; each takes ``batch_size`` examples, cycling through the shuffled training split.
        batch_size: examples per optimizer step.
        lr: peak learning rate, reached after ``lr_warmup_steps``, then constant.
        lr_warmup_steps: optimizer steps of linear learning-rate warmup.
        micro_batch_tokens: token budget of one micro-batch, padding included.
        max_target_tokens: targets are cut to this many tokens (the end-of-turn token is kept).
        eval_every: held-out loss every this many steps (0: only at the end).
        eval_examples: held-out examples the loss is measured on.
        save_every: a checkpoint every this many steps (0: only the export at the end); ``resume`` continues from the
            newest.
        resume: continue from the newest checkpoint in the output folder when there is one.
        seed: the order of the examples.
    """

    steps: int = 40
    batch_size: int = 8
    lr: float = 5.0e-5
    lr_warmup_steps: int = 5
    micro_batch_tokens: int = 4096
    max_target_tokens: int = 320
    eval_every: int = 20
    eval_examples: int = 64
    save_every: int = 20
    resume: bool = True
    seed: int = 0


@dataclass
class SimReportConfig:
    """Measuring simulators against the real engine on held-out queries (``launch.simulator_report``).

    Attributes:
        queries: held-out queries measured (the first ones of the held-out split).
        tuned: the tuned simulator (an HF folder), run in ``sft`` mode; empty: ``{dir}/tuned/hf`` when it exists.
        max_tokens: new tokens per simulated search (the same for every simulator).
        temperature: the simulators' sampling temperature (the paper's 0.8).
        timeout_s: limit of each simulator's pass over the queries.
    """

    queries: int = 60
    tuned: str = ""
    max_tokens: int = 256
    temperature: float = 0.8
    timeout_s: float = 3600.0


@dataclass
class SimulationConfig:
    """Simulation tuning, end to end: ``collect_sim_data``, then ``tune_simulator``, then ``simulator_report``.

    Attributes:
        dir: the pipeline's folder: ``data/`` (records and the SFT dataset), ``tuned/`` (checkpoints and the HF
            export ``tuned/hf``, which plugs into training as ``simulator.model=.../tuned/hf simulator.mode=sft``),
            and ``report.md`` / ``report.json``.
    """

    dir: str = "runs/simulation"
    collect: SimCollectConfig = field(default_factory=SimCollectConfig)
    tune: SimTuneConfig = field(default_factory=SimTuneConfig)
    report: SimReportConfig = field(default_factory=SimReportConfig)


@dataclass
class ComparisonConfig:
    """The paper's comparison in miniature (``python -m launch.experiment``, ``conf/comparison.yaml``): the shipped
    model, the warm-up policy alone, and RL from that policy against BM25 and against the simulators, every policy
    evaluated the same way (agent method, real BM25, the test split, greedy).

    Attributes:
        dir: the experiment's folder: one sub-folder per arm (its training run and its evaluation), ``results.md``,
            ``results.json`` and the curves. An arm whose ``arm.json`` is there is done and skipped on a rerun; an
            interrupted RL arm resumes from its last checkpoint.
        arms: which arms to run, of ``base``, ``warmup``, ``rl_bm25``, ``rl_sim_prompt``, ``rl_sim_tuned``.
        tuned_simulator: the HF folder of a tuned simulator for ``rl_sim_tuned``; empty: ``simulation.dir``'s
            ``tuned/hf`` (what ``make simulator`` writes). The arm is skipped, and says so, when neither exists.
        eval_limit: test questions per evaluation, the first in file order; 0: the whole test split.
        baseline_methods: methods the two baselines are evaluated with (RL arms: agent only).
    """

    dir: str = "runs/experiment"
    arms: list[str] = field(default_factory=lambda: ["base", "warmup", "rl_bm25", "rl_sim_prompt", "rl_sim_tuned"])
    tuned_simulator: str = ""
    eval_limit: int = 0
    baseline_methods: list[str] = field(default_factory=lambda: ["direct", "rag", "agent"])
