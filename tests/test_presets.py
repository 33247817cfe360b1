"""The paper presets (conf/experiment, conf/algorithm, the GPU simulator options) compose into the paper's values.

Composition only (``python -m launch.train --cfg job``): no Ray, no model. docs/presets.md lists the values and where
they come from; the numbers asserted here are the spec's (sections 2, 4 and 7).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO_ROOT

# experiment -> the policy it trains (hub ids, as in the paper's main tables)
POLICIES = {
    "zerosearch": "Qwen/Qwen2.5-3B",
    "qwen2.5_3b_base": "Qwen/Qwen2.5-3B",
    "qwen2.5_3b_instruct": "Qwen/Qwen2.5-3B-Instruct",
    "qwen2.5_7b_base": "Qwen/Qwen2.5-7B",
    "qwen2.5_7b_instruct": "Qwen/Qwen2.5-7B-Instruct",
    "llama3.2_3b_base": "meta-llama/Llama-3.2-3B",
    "llama3.2_3b_instruct": "meta-llama/Llama-3.2-3B-Instruct",
}
# simulator option -> (mode, model): the released fine-tuned simulators, or Qwen2.5-Instruct prompted
SIMULATORS = {
    "sft_3b": ("sft", "sunhaonlp/Simulation_LLM_google_3B_V2"),
    "sft_7b": ("sft", "sunhaonlp/Simulation_LLM_google_7B_V2"),
    "sft_14b": ("sft", "sunhaonlp/Simulation_LLM_google_14B_V2"),
    "prompt_3b": ("prompt", "Qwen/Qwen2.5-3B-Instruct"),
    "prompt_7b": ("prompt", "Qwen/Qwen2.5-7B-Instruct"),
    "prompt_14b": ("prompt", "Qwen/Qwen2.5-14B-Instruct"),
}


def compose(*overrides: str) -> dict:
    """The composed job config, interpolations resolved (the run folder is given so that Hydra's can resolve)."""
    result = subprocess.run([sys.executable, "-m", "launch.train", "--cfg", "job", "--resolve",
                             "logger.run_dir=unused", *overrides],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return yaml.safe_load(result.stdout)


def assert_paper_run(cfg: dict) -> None:
    """The settings every preset shares (spec sections 4 and 7)."""
    train, learner, episode = cfg["train"], cfg["learner"], cfg["rollout"]["episode"]
    assert (train["prompts_per_step"], train["group_size"], train["total_steps"]) == (64, 5, 203)
    assert (train["save_every"], train["warmup"]) == (50, "off")
    assert learner["lr"] == 1e-6 and learner["total_steps"] == 203
    assert learner["mini_batch_size"] == cfg["critic"]["mini_batch_size"] == 256  # 320 in two optimizer steps
    assert cfg["model"]["dtype"] == "bfloat16"
    assert (learner["kl_coef"], learner["kl_kind"]) == (0.001, "low_var_kl")
    assert learner["bf16"] and learner["reference_bf16"]
    assert (episode["max_turns"], episode["max_tokens_per_turn"], episode["reward_metric"]) == (2, 500, "f1")
    assert cfg["rollout"]["temperature"] == 1.0 and cfg["rollout"]["top_p"] == 0.95
    assert cfg["model"]["max_model_len"] == 4096 + 500
    assert cfg["curriculum"] == {**cfg["curriculum"], "name": "exp", "p_start": 0.0, "p_end": 0.5, "base": 4.0,
                                 "total_steps": 203}
    assert cfg["search"]["engine"] == "simulated" and cfg["search"]["top_k"] == 5
    assert cfg["simulator"]["temperature"] == 0.8 and "top_k_docs" not in cfg["simulator"]
    assert cfg["cluster"]["address"] == "auto" and cfg["cluster"]["weight_sync"] == "nccl"
    assert cfg["cluster"]["rollout_gpus"] >= 1 and cfg["cluster"]["learner_gpus"] > 0
    # The reference shares the learner's GPU, holding memory only while it computes.
    assert cfg["cluster"]["learner_gpus"] + cfg["cluster"]["reference_gpus"] == 1
    assert cfg["learner"]["offload_reference"]
    assert cfg["cluster"]["simulator_gpus"] >= 1  # the simulator on GPUs of its own
    assert cfg["data"]["dir"] == "data/zerosearch" and not cfg["data"]["generate_synthetic"]


def test_every_experiment_file_is_tested_and_documented():
    files = {p.stem for p in (REPO_ROOT / "conf" / "experiment").glob("*.yaml")}
    assert files == set(POLICIES)
    docs = (REPO_ROOT / "docs" / "presets.md").read_text()
    for name in [*POLICIES, *SIMULATORS, "grpo", "reinforce", "ppo"]:
        assert f"`{name}`" in docs, name


@pytest.mark.parametrize("experiment", sorted(POLICIES))
def test_experiment_composes_into_the_paper_run(experiment):
    cfg = compose(f"experiment={experiment}")
    assert_paper_run(cfg)
    assert cfg["model"]["name"] == POLICIES[experiment]
    # the defaults: GRPO against the 14B fine-tuned simulator, the authors' recommendation (spec section 2)
    assert (cfg["simulator"]["mode"], cfg["simulator"]["model"]) == SIMULATORS["sft_14b"]
    assert cfg["train"]["algorithm"] == "grpo" and cfg["train"]["kl_penalty"] == "loss"
    assert cfg["learner"]["warmup_ratio"] == 0.95
    offloads = "offload_optimizer" in cfg["learner"]["extra_deepspeed"].get("zero_optimization", {})
    assert offloads == ("7b" in experiment)  # 7B states do not fit one GPU; 3B ones do


@pytest.mark.parametrize("simulator", sorted(SIMULATORS))
def test_simulator_options(simulator):
    cfg = compose("experiment=qwen2.5_3b_instruct", f"simulator={simulator}")
    assert (cfg["simulator"]["mode"], cfg["simulator"]["model"]) == SIMULATORS[simulator]
    assert cfg["simulator"]["max_tokens"] == 500 and not cfg["simulator"]["enforce_eager"]
    assert cfg["model"]["name"] == "Qwen/Qwen2.5-3B-Instruct"  # the rest of the experiment is kept
    assert_paper_run(cfg)


def test_algorithms_set_what_differs_between_them():
    grpo, reinforce, ppo = (compose("experiment=zerosearch", f"algorithm={a}") for a in ("grpo", "reinforce", "ppo"))
    for cfg, name in ((grpo, "grpo"), (reinforce, "reinforce")):
        assert_paper_run(cfg)
        assert (cfg["train"]["algorithm"], cfg["train"]["kl_penalty"]) == (name, "loss")
        assert cfg["learner"]["warmup_ratio"] == 0.95
    assert_paper_run(ppo)
    assert (ppo["train"]["algorithm"], ppo["train"]["kl_penalty"]) == ("ppo", "reward")
    assert (ppo["train"]["gamma"], ppo["train"]["lam"]) == (1.0, 1.0)
    assert ppo["learner"]["warmup_ratio"] == 0.285
    critic = ppo["critic"]
    assert (critic["lr"], critic["warmup_ratio"], critic["value_clip"]) == (1e-5, 0.015, 0.5)
    assert critic["bf16"] and critic["total_steps"] == 203


def _gpus(cluster: dict, ppo: bool) -> float:
    total = (cluster["rollout_engines"] * cluster["rollout_gpus"] + cluster["learners"] * cluster["learner_gpus"]
             + cluster["reference_gpus"] + cluster["simulator_servers"] * cluster["simulator_gpus"])
    return total + (cluster["critics"] * cluster["critic_gpus"] if ppo else 0)


def test_cluster_layouts_fill_one_four_gpu_node():
    grpo = compose("experiment=zerosearch")["cluster"]
    ppo = compose("experiment=zerosearch", "algorithm=ppo", "cluster=gpu_4x_ppo")["cluster"]
    assert _gpus(grpo, ppo=False) == _gpus(ppo, ppo=True) == 4
    assert ppo["critic_gpus"] >= 1 and ppo["simulator_servers"] == 1


def test_command_line_choices_win_over_the_experiment():
    cfg = compose("experiment=llama3.2_3b_instruct", "model=qwen2.5_7b_base", "simulator=prompt_3b",
                  "algorithm=reinforce", "train.total_steps=10", "cluster=local_cpu")
    assert cfg["model"]["name"] == "Qwen/Qwen2.5-7B"
    assert (cfg["simulator"]["mode"], cfg["simulator"]["model"]) == SIMULATORS["prompt_3b"]
    assert cfg["train"]["algorithm"] == "reinforce"
    assert cfg["cluster"]["address"] is None
    # the learning-rate warm-up and the curriculum follow the run's length
    assert cfg["learner"]["total_steps"] == cfg["curriculum"]["total_steps"] == 10
    # a plain key wins over the algorithm group too, which keeps its other settings
    cfg = compose("experiment=zerosearch", "algorithm=ppo", "train.algorithm=rloo")
    assert cfg["train"]["algorithm"] == "rloo" and cfg["learner"]["warmup_ratio"] == 0.285


def test_the_default_job_stays_the_cpu_job():
    cfg = compose()
    assert cfg["model"]["name"] == "smollm2-135m-instruct" and cfg["cluster"]["address"] is None
    assert (cfg["train"]["total_steps"], cfg["train"]["prompts_per_step"], cfg["train"]["group_size"]) == (3, 2, 4)
    assert cfg["train"]["algorithm"] == "grpo" and cfg["train"]["warmup"] == "auto"
    assert not cfg["learner"]["bf16"] and cfg["rollout"]["episode"]["max_tokens_per_turn"] == 128
    assert cfg["model"]["dtype"] == "float32"  # the policy engine computes in the CPU learner's precision
    assert cfg["learner"]["mini_batch_size"] is None
    assert (cfg["simulator"]["model"], cfg["simulator"]["mode"]) == ("smollm2-135m-instruct", "prompt")


def test_train_total_steps_is_the_one_run_length():
    """No preset: ``train.total_steps=10`` alone sets the curriculum's m and both learning-rate warm-ups."""
    from simulator.curriculum import build_curriculum

    cfg = compose("train.total_steps=10")
    assert cfg["learner"]["total_steps"] == cfg["critic"]["total_steps"] == cfg["curriculum"]["total_steps"] == 10
    typed = _typed("train.total_steps=10")
    curriculum = build_curriculum(typed.curriculum)
    assert curriculum.noise_prob(10) == typed.curriculum.p_end == 0.5
    assert curriculum.noise_prob(9) < 0.5
    assert typed.learner.resolved_warmup_steps() == 0  # the CPU default: no learning-rate warm-up on a short run
    assert _typed("train.total_steps=10", "algorithm=grpo").learner.resolved_warmup_steps() == int(0.95 * 10) == 9
    assert typed.critic.resolved_warmup_steps() == int(0.015 * 10) == 0
    # A key set on purpose still decouples one of them.
    assert compose("train.total_steps=10", "curriculum.total_steps=40")["curriculum"]["total_steps"] == 40


def _typed(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from launch.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_object(hydra_compose("config", overrides=[*overrides, "logger.run_dir=unused"]))


def test_presets_build_the_typed_config():
    """Beyond YAML: the dataclasses accept every value (types, and each config's own checks)."""
    code = (
        "import sys\n"
        "from hydra import compose, initialize_config_dir\n"
        "from omegaconf import OmegaConf\n"
        "from launch.config import register_configs\n"
        "register_configs()\n"
        "with initialize_config_dir(config_dir=sys.argv[1], version_base='1.3'):\n"
        "    for line in sys.argv[2:]:\n"
        "        cfg = compose('config', overrides=line.split() + ['logger.run_dir=unused'])\n"
        "        typed = OmegaConf.to_object(cfg)\n"
        "        typed.learner.validate(); typed.critic.validate()\n"
        "        print(line, typed.train.algorithm, typed.simulator.mode, typed.learner.total_steps)\n"
    )
    runs = [f"experiment={e}" for e in POLICIES]
    runs += [f"experiment=zerosearch algorithm={a} simulator={s}" for a in ("grpo", "reinforce", "ppo")
             for s in SIMULATORS]
    result = subprocess.run([sys.executable, "-c", code, str(REPO_ROOT / "conf"), *runs], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(runs) and all(line.endswith(" 203") for line in lines)
