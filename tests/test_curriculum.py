"""Noise schedules: the paper's exponential values, the ablations' endpoints, the adaptive controller, resuming."""

import itertools
import math
from pathlib import Path

import pytest

from simulator.curriculum import (
    CURRICULA,
    AdaptiveCurriculum,
    CurriculumConfig,
    ExponentialCurriculum,
    build_curriculum,
)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "curriculum"


def schedule(name, **overrides):
    return build_curriculum(CurriculumConfig(name=name, **overrides))


# --- exponential (the paper's) --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "p_start, expected",
    [
        # The spec's table for m = 203, b = 4, p_end = 0.5 at steps 1, 50, 100, 150, 203.
        (0.0, [0.001, 0.068, 0.163, 0.298, 0.500]),
        (0.25, [0.251, 0.284, 0.332, 0.399, 0.500]),
    ],
)
def test_exponential_matches_spec_table(p_start, expected):
    curriculum = schedule("exp", p_start=p_start, p_end=0.5, base=4.0, total_steps=203)
    assert isinstance(curriculum, ExponentialCurriculum)
    values = [round(curriculum.noise_prob(step), 3) for step in (1, 50, 100, 150, 203)]
    assert values == expected


def test_exponential_formula_at_step_100():
    # 4 ** (100 / 203) = e ** (ln 4 * 100 / 203) = 1.97961..., so p = 0.97961 / 3 * 0.5 = 0.163269...
    assert schedule("exp").noise_prob(100) == pytest.approx(0.1632696, abs=1e-6)


def test_exponential_starts_at_p_start_and_holds_p_end():
    curriculum = schedule("exp", p_start=0.1, p_end=0.3)
    assert curriculum.noise_prob(0) == pytest.approx(0.1)
    assert curriculum.noise_prob(203) == 0.3
    assert curriculum.noise_prob(10_000) == 0.3


@pytest.mark.parametrize("name", ["exp", "linear", "cosine"])
def test_ramps_are_monotone(name):
    curriculum = schedule(name)
    values = [curriculum.noise_prob(step) for step in range(260)]
    assert all(later >= earlier for earlier, later in itertools.pairwise(values))
    assert values[0] == 0.0 and values[-1] == 0.5


def test_exponential_lags_linear():
    # The exponential ramp is convex: below the straight line everywhere in between.
    exp, linear = schedule("exp"), schedule("linear")
    assert all(exp.noise_prob(step) < linear.noise_prob(step) for step in range(1, 203))


# --- ablations ------------------------------------------------------------------------------------------------------


def test_linear_values():
    curriculum = schedule("linear", p_start=0.1, p_end=0.5, total_steps=200)
    assert curriculum.noise_prob(0) == pytest.approx(0.1)
    assert curriculum.noise_prob(50) == pytest.approx(0.2)
    assert curriculum.noise_prob(100) == pytest.approx(0.3)
    assert curriculum.noise_prob(200) == 0.5
    assert curriculum.noise_prob(300) == 0.5


def test_cosine_values():
    curriculum = schedule("cosine", p_start=0.0, p_end=0.4, total_steps=100)
    assert curriculum.noise_prob(0) == pytest.approx(0.0)
    # progress 1/4: (1 - cos(pi/4)) / 2 = 0.146447 of the way, so 0.058579.
    assert curriculum.noise_prob(25) == pytest.approx(0.4 * (1 - math.sqrt(0.5)) / 2)
    assert curriculum.noise_prob(50) == pytest.approx(0.2)
    assert curriculum.noise_prob(100) == 0.4


def test_constant_is_p_end_everywhere():
    curriculum = schedule("constant", p_start=0.0, p_end=0.3)
    assert [curriculum.noise_prob(step) for step in (0, 1, 100, 203, 500)] == [0.3] * 5


@pytest.mark.parametrize("name", ["exp", "linear", "cosine", "constant"])
def test_step_based_schedules_ignore_rewards(name):
    curriculum, untouched = schedule(name), schedule(name)
    for reward in (0.0, 1.0, 1.0, 0.0):
        curriculum.observe(reward)
    assert [curriculum.noise_prob(s) for s in range(0, 210, 7)] == [untouched.noise_prob(s) for s in range(0, 210, 7)]


# --- adaptive -------------------------------------------------------------------------------------------------------


def adaptive(**overrides):
    settings = {"p_init": 0.1, "target_reward": 0.5, "step_size": 0.1, "window": 2, "p_min": 0.0, "p_max": 0.3}
    settings.update(overrides)
    return schedule("adaptive", **settings)


def test_adaptive_rises_then_falls_on_scripted_rewards():
    curriculum = adaptive()
    assert isinstance(curriculum, AdaptiveCurriculum)
    trace = []
    # Window of 2; the recent means are 0.9, 0.9, 0.7, 0.5 (on target: no change), 0.2, 0.1, 0.1, 0.1.
    for reward in (0.9, 0.9, 0.5, 0.5, -0.1, 0.3, -0.1, 0.3):
        curriculum.observe(reward)
        trace.append(round(curriculum.noise_prob(step=len(trace) + 1), 6))
    assert trace == [0.2, 0.3, 0.3, 0.3, 0.2, 0.1, 0.0, 0.0]  # clamped at p_max 0.3, then at p_min 0.0


def test_adaptive_uses_the_window_mean_not_the_last_reward():
    curriculum = adaptive(window=3)
    for reward in (0.9, 0.9, 0.3):  # last reward below target, but the mean 0.7 is above
        curriculum.observe(reward)
    assert curriculum.noise_prob(3) == pytest.approx(0.3)


def test_adaptive_initial_value_is_clamped_p_init():
    assert adaptive().noise_prob(1) == pytest.approx(0.1)
    assert adaptive(p_init=0.4).noise_prob(1) == pytest.approx(0.3)


def test_adaptive_state_round_trip_gives_identical_future():
    # Four high rewards, then a low one that only the restored window keeps above target.
    rewards = [0.9, 0.9, 0.9, 0.9, 0.3, 0.1, 0.95, 0.4, 0.55, 0.3]
    settings = {"window": 3, "step_size": 0.05, "p_max": 1.0}
    original = adaptive(**settings)
    for reward in rewards[:4]:
        original.observe(reward)

    resumed = adaptive(**settings)
    resumed.load_state_dict(original.state_dict())

    def future(curriculum):
        values = []
        for step, reward in enumerate(rewards[4:], start=5):
            curriculum.observe(reward)
            values.append(round(curriculum.noise_prob(step), 6))
        return values

    # Window means from step 5 on: 0.7, 0.433, 0.45, 0.483, 0.633, 0.417 around target 0.5, starting from p = 0.3.
    expected = [0.35, 0.3, 0.25, 0.2, 0.25, 0.2]
    assert future(resumed) == expected
    assert future(original) == expected
    # Losing either part of the state changes the future.
    prob_only = adaptive(**settings)
    prob_only.prob = 0.3
    assert future(prob_only)[0] == 0.25
    assert future(adaptive(**settings))[0] == 0.05


def test_state_of_another_schedule_is_rejected():
    with pytest.raises(ValueError, match="'exp'"):
        adaptive().load_state_dict(schedule("exp").state_dict())


def test_stateless_round_trip():
    curriculum = schedule("exp")
    resumed = schedule("exp")
    resumed.load_state_dict(curriculum.state_dict())
    assert resumed.noise_prob(77) == curriculum.noise_prob(77)


# --- construction ---------------------------------------------------------------------------------------------------


def test_build_from_mapping():
    curriculum = build_curriculum({"name": "linear", "p_start": 0.2, "p_end": 0.4, "total_steps": 10})
    assert curriculum.noise_prob(5) == pytest.approx(0.3)


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="adaptive.*constant.*cosine.*exp.*linear"):
        build_curriculum(CurriculumConfig(name="sigmoid"))


@pytest.mark.parametrize(
    "overrides",
    [
        {"name": "exp", "base": 1.0},
        {"name": "exp", "p_end": 1.5},
        {"name": "linear", "total_steps": 0},
        {"name": "adaptive", "p_min": 0.4, "p_max": 0.2},
        {"name": "adaptive", "window": 0},
    ],
)
def test_invalid_settings_raise(overrides):
    with pytest.raises(ValueError):
        build_curriculum(CurriculumConfig(**overrides))


def test_negative_step_raises():
    with pytest.raises(ValueError):
        schedule("exp").noise_prob(-1)


def test_yaml_configs_build_their_schedule():
    yaml = pytest.importorskip("yaml")
    files = sorted(CONF_DIR.glob("*.yaml"))
    assert {path.stem for path in files} == set(CURRICULA)
    for path in files:
        settings = yaml.safe_load(path.read_text())
        assert settings["name"] == path.stem
        curriculum = build_curriculum(settings)
        assert curriculum.name == path.stem
    assert build_curriculum(yaml.safe_load((CONF_DIR / "exp.yaml").read_text())).noise_prob(150) == pytest.approx(
        0.2975499, abs=1e-6
    )
