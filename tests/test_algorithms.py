"""Hand-checked values for learners/algorithms.py and learners/losses.py.

Every expected number is worked out in the comment above it. The recurring response shape has an observation gap in
the middle:  mask [1, 1, 0, 0, 1, 0]  =  model, model, <information>, <information>, model, padding.
"""

from __future__ import annotations

import math

import pytest
import torch

from learners import algorithms as alg
from learners import losses

GAP_MASK = [1, 1, 0, 0, 1, 0]
DENSE_MASK = [1, 1, 1, 0, 0, 0]


def t(x, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype)


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, t(expected).to(actual.dtype), atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------------------------------


def test_masked_mean_sum_var_ignore_masked_values_even_nan():
    x = t([[1.0, 3.0, float("nan"), 5.0]])
    mask = t([[1, 1, 0, 1]])
    # sum = 1 + 3 + 5 = 9; mean = 9 / 3 = 3; unbiased var = ((−2)² + 0² + 2²) / (3 − 1) = 4; biased = 8 / 3
    close(alg.masked_sum(x, mask), 9.0)
    close(alg.masked_mean(x, mask), 3.0)
    close(alg.masked_var(x, mask), 4.0)
    close(alg.masked_var(x, mask, unbiased=False), 8.0 / 3.0)
    # per-row mean along dim=1
    x2 = t([[2.0, 4.0, 100.0], [1.0, 100.0, 100.0]])
    m2 = t([[1, 1, 0], [1, 0, 0]])
    close(alg.masked_mean(x2, m2, dim=1), [3.0, 1.0])
    # empty mask -> 0, not NaN
    close(alg.masked_mean(x2, torch.zeros_like(m2)), 0.0)


def test_masked_whiten_ignores_masked_tokens():
    # masked tokens: 1, 3, 5 (the 100 is an observation): mean 3, unbiased var 4, std 2
    # whitened: (1−3)/2 = −1, (3−3)/2 = 0, (5−3)/2 = 1; the masked position comes back as 0
    x = t([[1.0, 3.0, 100.0, 5.0]])
    mask = t([[1, 1, 0, 1]])
    close(alg.masked_whiten(x, mask), [[-1.0, 0.0, 0.0, 1.0]], atol=1e-5)
    # shift_mean=False adds the mean 3 back: [2, 3, 0, 4]
    close(alg.masked_whiten(x, mask, shift_mean=False), [[2.0, 3.0, 0.0, 4.0]], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------------------------------


def test_place_sequence_reward_on_last_model_token_across_a_gap():
    # row 0: last model token is index 4 (after the gap), not index 5 (padding) nor 3 (observation)
    # row 1: last model token is index 2
    # row 2: response cut off inside an observation: [1, 1, 1, 0, 0, 0] with the zeros being <information>;
    #        the reward still goes to index 2
    mask = t([GAP_MASK, DENSE_MASK, DENSE_MASK])
    rewards = alg.place_sequence_reward(t([0.5, 1.0, -2.0]), mask)
    close(rewards, [[0, 0, 0, 0, 0.5, 0], [0, 0, 1.0, 0, 0, 0], [0, 0, -2.0, 0, 0, 0]])


def test_place_sequence_reward_row_without_model_tokens_gets_nothing():
    mask = t([[0, 0, 0], [1, 0, 0]])
    close(alg.place_sequence_reward(t([7.0, 3.0]), mask), [[0, 0, 0], [3.0, 0, 0]])


def test_kl_penalized_rewards_only_on_model_tokens():
    # logp − ref = log 2 = 0.693147 on model tokens; 5.0 on the observation tokens (must be ignored)
    # r' = r − 0.1 · log2 on mask==1: [−0.0693147, −0.0693147, 0, 0, 1 − 0.0693147, 0]
    mask = t([GAP_MASK])
    r = t([[0, 0, 0, 0, 1.0, 0]])
    ln2 = math.log(2.0)
    logp = t([[ln2, ln2, 5.0, 5.0, ln2, 5.0]])
    ref = torch.zeros_like(logp)
    out = alg.kl_penalized_rewards(r, logp, ref, mask, beta=0.1, kind="k1")
    close(out, [[-0.1 * ln2, -0.1 * ln2, 0, 0, 1 - 0.1 * ln2, 0]])


# ---------------------------------------------------------------------------------------------------------------------
# Sequence-level estimators
# ---------------------------------------------------------------------------------------------------------------------

# Group "a" = rows 0, 2, 3 (not contiguous, on purpose) with scores 1, 0, 0.5; group "b" = row 1 alone with 0.7.
SCORES = [1.0, 0.7, 0.0, 0.5]
GROUPS = ["a", "b", "a", "a"]


def test_reinforce_is_raw_score():
    close(alg.reinforce_advantages(t(SCORES)), SCORES)


def test_broadcast_to_tokens_zeros_non_model_tokens():
    adv = alg.broadcast_to_tokens(t([2.0, -1.0]), t([GAP_MASK, DENSE_MASK]))
    close(adv, [[2, 2, 0, 0, 2, 0], [-1, -1, -1, 0, 0, 0]])


def test_grpo_two_groups_with_singleton():
    # group a: mean (1 + 0 + 0.5)/3 = 0.5; unbiased std = sqrt((0.25 + 0.25 + 0)/2) = 0.5
    #   A = (1 − 0.5)/0.5 = 1, (0 − 0.5)/0.5 = −1, (0.5 − 0.5)/0.5 = 0   (eps 1e-6 shifts them by ~2e-6)
    # group b (singleton): mean 0, std 1 -> A = 0.7 / (1 + 1e-6)
    adv = alg.grpo_advantages(t(SCORES), GROUPS)
    close(adv, [1.0, 0.7, -1.0, 0.0], atol=1e-5)
    # same groups given as a tensor of integer ids
    close(alg.grpo_advantages(t(SCORES), torch.tensor([7, 3, 7, 7])), [1.0, 0.7, -1.0, 0.0], atol=1e-5)


def test_dr_grpo_centres_without_scaling():
    # group a minus its mean 0.5: 0.5, −0.5, 0; singleton b minus 0: 0.7
    expected = [0.5, 0.7, -0.5, 0.0]
    close(alg.dr_grpo_advantages(t(SCORES), GROUPS), expected)
    close(alg.grpo_advantages(t(SCORES), GROUPS, scale_by_std=False), expected)


def test_rloo_leave_one_out():
    # row 0: 1 − mean(0, 0.5) = 0.75;  row 2: 0 − mean(1, 0.5) = −0.75;  row 3: 0.5 − mean(1, 0) = 0
    # singleton b: 0
    close(alg.rloo_advantages(t(SCORES), GROUPS), [0.75, 0.0, -0.75, 0.0])


def test_group_ids_length_mismatch_raises():
    with pytest.raises(ValueError, match="group_ids"):
        alg.grpo_advantages(t(SCORES), ["a", "a"])


def test_reinforce_pp_baseline_group_mean_then_global_whitening():
    # groups 0 = rows 0, 1 (scores 1, 0; mean 0.5), 1 = rows 2, 3 (0, 0; mean 0). The means differ, so the
    # centring is not a constant shift that whitening would undo anyway.
    # centred: 0.5, −0.5, 0, 0; rows have 2, 2, 1, 1 model tokens
    # token values: 0.5, 0.5, −0.5, −0.5, 0, 0 -> mean 0, unbiased var = 4·0.25/5 = 0.2
    # whitened: ±0.5/sqrt(0.2) = ±1.118034, 0
    mask = t([[1, 1, 0], [1, 0, 1], [1, 0, 0], [0, 1, 0]])
    adv = alg.reinforce_pp_baseline_advantages(t([1.0, 0.0, 0.0, 0.0]), [0, 0, 1, 1], mask)
    a = 0.5 / math.sqrt(0.2)
    close(adv, [[a, a, 0], [-a, 0, -a], [0, 0, 0], [0, 0, 0]], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Token-level estimators
# ---------------------------------------------------------------------------------------------------------------------


def test_discounted_returns_skip_the_gap():
    # gamma = 0.5. row 0 (gap): G4 = 1; G1 = 0 + 0.5·G4 = 0.5 (one step, the gap is not counted); G0 = 0.25
    #   (if the two observation tokens counted as steps, G1 would be 0.5³ = 0.125)
    # row 1 (dense): G2 = 1, G1 = 0.5, G0 = 0.25
    # a reward of 9 placed on an observation token is ignored
    mask = t([GAP_MASK, DENSE_MASK])
    r = t([[0, 0, 9.0, 0, 1.0, 0], [0, 0, 1.0, 0, 0, 0]])
    close(alg.discounted_returns(r, mask, gamma=0.5), [[0.25, 0.5, 0, 0, 1.0, 0], [0.25, 0.5, 1.0, 0, 0, 0]])


def test_reinforce_pp_global_whitening_of_returns():
    # returns from the test above, on 6 model tokens: 0.25, 0.5, 1, 0.25, 0.5, 1
    # mean = 3.5/6 = 7/12; deviations −1/3, −1/12, 5/12 (each twice);
    # unbiased var = 2·(1/9 + 1/144 + 25/144)/5 = 2·(42/144)/5 = 7/60
    mask = t([GAP_MASK, DENSE_MASK])
    r = t([[0, 0, 0, 0, 1.0, 0], [0, 0, 1.0, 0, 0, 0]])
    adv = alg.reinforce_pp_advantages(r, mask, gamma=0.5)
    mean, std = 7 / 12, math.sqrt(7 / 60)
    g = [[0.25, 0.5, None, None, 1.0, None], [0.25, 0.5, 1.0, None, None, None]]
    expected = [[0.0 if v is None else (v - mean) / std for v in row] for row in g]
    close(adv, expected, atol=1e-5)


def test_gae_gamma1_lam1_is_return_minus_value_and_skips_gap_values():
    # gamma = lam = 1: A_t = (sum of future rewards) − V_t over model tokens. Values on the observation tokens are 9
    # and must not be used. Row 0 (gap): reward 1 at t=4.
    #   t4: δ = 1 + 0 − 0.5 = 0.5, A = 0.5
    #   t1: δ = 0 + V4 − V1 = 0.5 − 0.2 = 0.3, A = 0.3 + 0.5 = 0.8
    #   t0: δ = 0 + V1 − V0 = 0.2 − 0.1 = 0.1, A = 0.1 + 0.8 = 0.9
    #   returns = A + V = 1, 1, 1 on model tokens
    mask = t([GAP_MASK])
    r = t([[0, 0, 0, 0, 1.0, 0]])
    v = t([[0.1, 0.2, 9.0, 9.0, 0.5, 9.0]])
    adv, ret = alg.gae_advantages(r, v, mask, gamma=1.0, lam=1.0)
    close(adv, [[0.9, 0.8, 0, 0, 0.5, 0]])
    close(ret, [[1.0, 1.0, 0, 0, 1.0, 0]])


def test_gae_gamma_lam_below_one_by_hand():
    # gamma = lam = 0.5, so γλ = 0.25.
    # Row 0 (gap): r = [0.25, 0, ·, ·, 1, ·], V = [0.5, 0.25, 9, 9, 0.5, 9]
    #   t4: δ = 1 + 0.5·0 − 0.5 = 0.5;              A4 = 0.5
    #   t1: δ = 0 + 0.5·V4 − V1 = 0.25 − 0.25 = 0;  A1 = 0 + 0.25·0.5 = 0.125
    #   t0: δ = 0.25 + 0.5·V1 − V0 = 0.25 + 0.125 − 0.5 = −0.125;  A0 = −0.125 + 0.25·0.125 = −0.09375
    #   returns: 0.40625, 0.375, 1.0
    # Row 1 (dense): r = [0, 0, 2], V = [1, 1, 1]
    #   t2: δ = 2 − 1 = 1;                  A2 = 1
    #   t1: δ = 0.5·1 − 1 = −0.5;           A1 = −0.5 + 0.25·1 = −0.25
    #   t0: δ = −0.5;                        A0 = −0.5 + 0.25·(−0.25) = −0.5625
    #   returns: 0.4375, 0.75, 2.0
    mask = t([GAP_MASK, DENSE_MASK])
    r = t([[0.25, 0, 0, 0, 1.0, 0], [0, 0, 2.0, 0, 0, 0]])
    v = t([[0.5, 0.25, 9.0, 9.0, 0.5, 9.0], [1.0, 1.0, 1.0, 7.0, 7.0, 7.0]])
    adv, ret = alg.gae_advantages(r, v, mask, gamma=0.5, lam=0.5)
    close(adv, [[-0.09375, 0.125, 0, 0, 0.5, 0], [-0.5625, -0.25, 1.0, 0, 0, 0]])
    close(ret, [[0.40625, 0.375, 0, 0, 1.0, 0], [0.4375, 0.75, 2.0, 0, 0, 0]])


def test_gae_with_gap_equals_gae_on_the_compacted_sequence():
    # Dropping the observation columns must not change anything on model tokens.
    torch.manual_seed(0)
    mask = t([[1, 1, 0, 0, 1, 1, 0, 1]])
    keep = mask[0].bool()
    r, v = torch.randn(1, 8), torch.randn(1, 8)
    adv, ret = alg.gae_advantages(r, v, mask, gamma=0.9, lam=0.8)
    adv_c, ret_c = alg.gae_advantages(r[:, keep], v[:, keep], torch.ones(1, int(keep.sum())), gamma=0.9, lam=0.8)
    close(adv[:, keep], adv_c.tolist(), atol=1e-6)
    close(ret[:, keep], ret_c.tolist(), atol=1e-6)
    assert torch.all(adv[:, ~keep] == 0) and torch.all(ret[:, ~keep] == 0)


def test_whitened_gae_statistics_use_model_tokens_only():
    # advantages from the gamma=lam=1 test: 0.9, 0.8, 0.5 on model tokens -> mean 2.2/3, with huge values on
    # observation positions the statistics would be wrecked if they were included
    adv = t([[0.9, 0.8, 1e3, 1e3, 0.5, 1e3]])
    mask = t([GAP_MASK])
    white = alg.masked_whiten(adv, mask)
    vals = white[mask.bool()]
    close(vals.mean(), 0.0, atol=1e-5)
    close(vals.std(), 1.0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# KL
# ---------------------------------------------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    ln2 = math.log(2.0)
    # case 1: π = 0.5, π_ref = 0.25 -> d = logp − ref = ln 2
    #   k1 = ln2 = 0.693147; k2 = ½ ln²2 = 0.240227; k3 = e^{−ln2} + ln2 − 1 = 0.5 + 0.693147 − 1 = 0.193147
    # case 2: π = 0.25, π_ref = 0.5 -> d = −ln 2
    #   k1 = −0.693147; k2 = 0.240227; k3 = e^{ln2} − ln2 − 1 = 2 − 0.693147 − 1 = 0.306853
    # case 3: equal -> all 0
    logp = t([math.log(0.5), math.log(0.25), -1.0])
    ref = t([math.log(0.25), math.log(0.5), -1.0])
    close(alg.kl_estimate(logp, ref, "k1"), [ln2, -ln2, 0.0])
    close(alg.kl_estimate(logp, ref, "k2"), [0.5 * ln2**2, 0.5 * ln2**2, 0.0])
    close(alg.kl_estimate(logp, ref, "k3"), [0.5 + ln2 - 1, 2 - ln2 - 1, 0.0])
    close(alg.kl_estimate(logp, ref, "low_var_kl"), [0.5 + ln2 - 1, 2 - ln2 - 1, 0.0])


def test_low_var_kl_is_clamped_to_10():
    # ref − logp = 20: e^20 − 20 − 1 ≈ 4.85e8 -> clamped to 10
    close(alg.kl_estimate(t([-20.0]), t([0.0]), "k3"), [10.0])


def test_unknown_kl_kind_names_the_choices():
    with pytest.raises(ValueError, match="k1, k2, k3, low_var_kl"):
        alg.kl_estimate(t([0.0]), t([0.0]), "k4")


# ---------------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------------


def _pg(ratios, advs, **kw):
    logp = torch.log(t(ratios)).requires_grad_(True)
    loss, stats = losses.policy_gradient_loss(logp, torch.zeros_like(logp), t(advs), **kw)
    loss.sum().backward()
    return loss, logp.grad, stats


def test_ppo_clip_inside_and_outside_for_both_signs():
    # ε = 0.2, L = max(−ρA, −clip(ρ, 0.8, 1.2)A)
    #   ρ=1.1, A=+1: inside           -> −1.1, grad dL/dlogρ = −ρA = −1.1
    #   ρ=1.5, A=+1: above, clipped   -> −1.2, grad 0
    #   ρ=0.5, A=+1: below, unclipped -> −0.5 (pessimistic branch), grad −0.5
    #   ρ=0.5, A=−1: below, clipped   -> 0.8, grad 0
    #   ρ=1.5, A=−1: above, unclipped -> 1.5, grad 1.5
    #   ρ=0.9, A=−1: inside           -> 0.9, grad 0.9
    loss, grad, stats = _pg([1.1, 1.5, 0.5, 0.5, 1.5, 0.9], [1, 1, 1, -1, -1, -1])
    close(loss, [-1.1, -1.2, -0.5, 0.8, 1.5, 0.9], atol=1e-6)
    close(grad, [-1.1, 0.0, -0.5, 0.0, 1.5, 0.9], atol=1e-6)
    # clipped tokens: 2 of 6
    assert stats.clip_frac == pytest.approx(2 / 6)
    assert stats.dual_clip_frac == 0.0
    assert stats.ratio_max == pytest.approx(1.5)


def test_ppo_clip_higher():
    # ε_low = 0.2, ε_high = 0.28: ρ=1.25, A=+1 stays unclipped (−1.25); ρ=1.5 -> −1.28; ρ=0.7, A=−1 -> 0.8
    loss, _, _ = _pg([1.25, 1.5, 0.7], [1, 1, -1], clip_eps=0.2, clip_eps_high=0.28)
    close(loss, [-1.25, -1.28, 0.8], atol=1e-6)


def test_dual_clip():
    # c = 3. For A<0: L = min(max(−ρA, −clip(ρ)A), −cA)
    #   ρ=5, A=−1: max(5, 1.2) = 5, capped at 3 -> 3, grad 0
    #   ρ=2, A=−1: max(2, 1.2) = 2 < 3 -> 2, grad 2
    #   ρ=5, A=+1: dual clip does not apply -> −1.2
    loss, grad, stats = _pg([5.0, 2.0, 5.0], [-1, -1, 1], dual_clip=3.0)
    close(loss, [3.0, 2.0, -1.2], atol=1e-5)
    close(grad, [0.0, 2.0, 0.0], atol=1e-5)
    assert stats.dual_clip_frac == pytest.approx(1 / 3)
    assert stats.clip_frac == pytest.approx(1 / 3)  # the A=+1 token only
    with pytest.raises(ValueError, match="dual_clip"):
        _pg([1.0], [1], dual_clip=0.9)


def test_policy_loss_stats_respect_loss_mask():
    # 2 clipped tokens out of 3, but one clipped token is masked -> 1/2
    logp = torch.log(t([[1.5, 1.0, 1.5]]))
    _, stats = losses.policy_gradient_loss(logp, torch.zeros_like(logp), t([[1.0, 1.0, 1.0]]), loss_mask=t([[1, 1, 0]]))
    assert stats.clip_frac == pytest.approx(0.5)


def test_entropy_uniform_and_known_distribution():
    # uniform over V=7 -> log 7, also when every logit is shifted by a huge constant
    logits = torch.zeros(2, 3, 7)
    close(losses.entropy_from_logits(logits), torch.full((2, 3), math.log(7)).tolist(), atol=1e-5)
    close(losses.entropy_from_logits(logits + 1e4), torch.full((2, 3), math.log(7)).tolist(), atol=1e-3)
    # p = (0.5, 0.25, 0.25): H = 0.5 ln2 + 2 · 0.25 ln4 = 1.5 ln2 = 1.039721
    p = torch.log(t([[[0.5, 0.25, 0.25]]]))
    close(losses.entropy_from_logits(p), [[1.5 * math.log(2)]], atol=1e-6)


def test_value_loss_clipping():
    # old V = 0, R = 1, clip 0.5 -> the clipped value lies in [−0.5, 0.5]
    #   V=2:   unclipped (2−1)² = 1,    clipped (0.5−1)² = 0.25 -> ½·1    = 0.5
    #   V=0.8: unclipped 0.04,          clipped 0.25            -> ½·0.25 = 0.125
    #   V=0.3: inside, 0.49 both                                -> 0.245
    #   V=−1:  unclipped 4,             clipped (−0.5−1)² = 2.25 -> 2
    vals = t([2.0, 0.8, 0.3, -1.0])
    loss = losses.value_loss(vals, torch.zeros(4), torch.ones(4), clip=0.5)
    close(loss, [0.5, 0.125, 0.245, 2.0])


def test_truncated_importance_weights():
    # exp(old − rollout): rollout = log 0.5 -> 2, capped at 1.5; rollout = log 2 -> 0.5; equal -> 1
    old = torch.zeros(3, requires_grad=True)
    w = losses.truncated_importance_weights(old, torch.log(t([0.5, 2.0, 1.0])), cap=1.5)
    close(w, [1.5, 0.5, 1.0])
    assert not w.requires_grad


def test_combined_loss_adds_kl():
    # 1 + 0.1·2 − 0.01·3 = 1.17
    close(losses.combine_policy_loss(t([1.0]), t([2.0]), t([3.0]), kl_coef=0.1, entropy_coef=0.01), [1.17])
    # more KL -> more loss (the original's sign bug would make it less)
    low = losses.combine_policy_loss(t([1.0]), t([1.0]), t([0.0]), kl_coef=0.1, entropy_coef=0.0)
    high = losses.combine_policy_loss(t([1.0]), t([2.0]), t([0.0]), kl_coef=0.1, entropy_coef=0.0)
    assert high.item() > low.item()
    with pytest.raises(ValueError, match="kl_coef"):
        losses.combine_policy_loss(t([1.0]), t([1.0]), None, kl_coef=-0.1, entropy_coef=0.0)


def test_gradient_step_on_kl_term_moves_policy_towards_reference():
    # With pg = 0, one SGD step on the combined loss must shrink the k3 KL between logp and ref.
    logp = t([[-0.2, -2.0]]).requires_grad_(True)
    ref = t([[-1.0, -1.0]])
    kl = alg.kl_estimate(logp, ref, "k3")
    before = kl.sum().item()
    total = losses.combine_policy_loss(torch.zeros_like(kl), kl, None, kl_coef=1.0, entropy_coef=0.0)
    total.sum().backward()
    with torch.no_grad():
        stepped = logp - 0.1 * logp.grad
    assert alg.kl_estimate(stepped, ref, "k3").sum().item() < before


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------------------------

# Per-token values and masks of a 4-sequence batch (100s sit on masked positions):
#   row 0: 2, 4            -> sum 6,  2 tokens
#   row 1: 1               -> sum 1,  1 token
#   row 2: 3, 3, 3, 3      -> sum 12, 4 tokens
#   row 3: 5, ·, 1         -> sum 6,  2 tokens (observation gap in the middle)
# full-batch token mean = 25 / 9 = 2.777…; the mean of per-row means (3 + 1 + 3 + 3)/4 = 2.5 would be wrong.
AGG_X = [[2.0, 4.0, 100.0, 0.0], [1.0, 0.0, 0.0, 0.0], [3.0, 3.0, 3.0, 3.0], [5.0, 100.0, 1.0, 0.0]]
AGG_MASK = [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]]


def test_token_mean_loss_full_batch():
    w = torch.tensor(1.0, requires_grad=True)
    loss = losses.token_mean_loss(w * t(AGG_X), t(AGG_MASK), global_num_tokens=9)
    close(loss, 25 / 9)
    loss.backward()
    close(w.grad, 25 / 9)


def test_token_mean_loss_is_exact_across_micro_batches_and_ranks():
    x, mask = t(AGG_X), t(AGG_MASK)
    n_global = int(mask.sum().item())  # 9: what an all-reduce SUM of the rank counts would give
    # 2 ranks, each with 2 micro-batches of uneven token counts: rank 0 = rows {0}, {1}; rank 1 = rows {2}, {3}
    ranks = [[slice(0, 1), slice(1, 2)], [slice(2, 3), slice(3, 4)]]
    world_size = len(ranks)

    total_loss = 0.0
    rank_grads = []
    for micro_batches in ranks:
        w = torch.tensor(1.0, requires_grad=True)
        for sl in micro_batches:
            loss = losses.token_mean_loss(w * x[sl], mask[sl], n_global)
            total_loss += loss.item()
            loss.backward()  # gradient accumulation: .grad sums across micro-batches
        rank_grads.append(w.grad.clone())

    # rank 0: (6 + 1)/9, rank 1: (12 + 6)/9 -> sum 25/9
    assert total_loss == pytest.approx(25 / 9, abs=1e-6)
    close(rank_grads[0], 7 / 9)
    close(rank_grads[1], 18 / 9)
    # all-reduce SUM of gradients = full-batch gradient
    close(sum(rank_grads), 25 / 9)
    # a framework that averages gradients over ranks: scale each rank's loss by world_size first
    close(sum(g * world_size for g in rank_grads) / world_size, 25 / 9)
    # dividing each micro-batch by its own count instead gives (6/2 + 1/1 + 12/4 + 6/2)/4 = 2.5, not 25/9
    naive = sum(alg.masked_mean(x[sl], mask[sl]).item() for mbs in ranks for sl in mbs) / 4
    assert naive == pytest.approx(2.5) and abs(naive - 25 / 9) > 0.2


def test_token_mean_loss_rejects_non_positive_count():
    with pytest.raises(ValueError, match="global_num_tokens"):
        losses.token_mean_loss(t(AGG_X), t(AGG_MASK), 0)
