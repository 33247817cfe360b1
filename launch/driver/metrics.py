"""What a step reports: its metrics row (the field's names, DESIGN section 7), the sample rows for W&B, and the
progress line, which warns when no group has had a learning signal for a while."""

from __future__ import annotations

import statistics
import sys
from typing import Any

from actors.trajectory import Trajectory


def step_metrics(batch, train_metrics, sync_metrics, t_score, t_train, t_step, t_wait, t_idle,
                  cluster) -> dict[str, float]:
    trajectories = batch.rolled_trajectories  # replayed episodes (``replay``) are trained on, not rolled this step
    metrics = rollout_metrics(trajectories)
    # The policy's score is over every group rolled; with dynamic filtering the groups trained on are a biased subset.
    metrics["critic/score/kept_mean"] = metrics["critic/score/mean"]
    metrics["critic/score/mean"] = batch.score_mean
    metrics.update({k: float(v) for k, v in train_metrics.items()})
    metrics.update(sync_metrics)
    generated = sum(t.stats.generated_tokens for t in trajectories)
    # The learners' weights before this step's update are version step − 1: that is the on-policy version.
    staleness = [batch.step - 1 - t.policy_version for t in batch.trajectories]
    metrics.update({
        "search/noise_prob": batch.noise_prob,
        "async/staleness_mean": statistics.fmean(staleness),
        "async/staleness_max": float(max(staleness)),
        "async/policy_version_min": float(min(t.policy_version for t in batch.trajectories)),
        "data/groups_rolled": float(batch.groups_rolled),
        "data/signal_share": batch.signal_share,
        "data/filter_pass_rate": batch.pass_rate,
        "data/rollout_rounds": float(batch.rounds),
        "timing_s/gen": batch.gen_s,
        "timing_s/wait_rollout": t_wait,
        "timing_s/wait_idle": t_idle,
        "timing_s/sim_per_episode": statistics.fmean(t.stats.search_s for t in trajectories),
        # Reference logprobs, recomputed old logprobs, critic values and advantages: the learners' passes before the
        # update.
        "timing_s/score": t_score,
        "timing_s/train": t_train,
        "timing_s/step": t_step,
        "timing_s/other": max(0.0, t_step - t_wait - t_score - t_train - t_idle - sync_metrics["timing_s/sync"]),
        "perf/tokens_per_s": generated / max(batch.gen_s, 1e-9),
        # 1.0 when rollout and training overlap perfectly (async); about 1 + faster/slower when they alternate.
        "perf/step_vs_slowest": t_step / max(batch.gen_s, t_train, 1e-9),
    })
    for key, value in cluster.pool_stats().items():
        if isinstance(value, (int, float)):
            metrics[f"simulator/{key}"] = float(value)
    metrics.update(batch.replay_metrics)
    metrics.update(cluster.fault_metrics(batch))
    return metrics


def sample_rows(trajectories, n: int) -> list[dict[str, Any]]:
    return [{"group": t.group_id, "reward": t.reward, "searches": t.stats.searches, "finish": t.stats.finish_reason,
             "answers": " | ".join(t.golden_answers), "response": t.response_text[:2000]}
            for t in trajectories[:n]]


class Progress:
    """A progress bar (step, reward, noise probability, searches) on a terminal, and one full line per step always,
    so that logs of batch jobs carry every step too. Warns once when no group has had a learning signal for
    ``SILENT_STEPS`` steps in a row."""

    SILENT_STEPS = 3

    def __init__(self, total: int, done: int = 0) -> None:
        from tqdm import tqdm

        self.total = total
        self.silent = 0
        self.entropy: float | None = None  # the last update's; a skipped update (no signal) measures none
        self.bar = tqdm(total=total, initial=done, desc="RL steps", unit="step", dynamic_ncols=True,
                        disable=not sys.stderr.isatty())

    def show(self, step: int, m: dict[str, float]) -> None:
        skipped = m.get("train/update_skipped", 0.0) == 1.0
        if "actor/entropy" in m:
            self.entropy = m["actor/entropy"]
        entropy = "- (update skipped)" if skipped else f"{m.get('actor/entropy', float('nan')):.3f}"
        self.bar.set_postfix(reward=f"{m['critic/score/mean']:.3f}", noise=f"{m['search/noise_prob']:.3f}",
                             searches=f"{m['search/calls_per_episode']:.2f}", signal=f"{m['data/signal_share']:.2f}")
        self.bar.update(1)
        self.bar.write(
            f"step {step}/{self.total}  reward {m['critic/score/mean']:.3f}  noise {m['search/noise_prob']:.3f}  "
            f"searches {m['search/calls_per_episode']:.2f}  signal {m['data/signal_share']:.2f}  "
            f"valid {m['episode/valid_action_share']:.2f}  entropy {entropy}  "
            f"kl {m.get('actor/kl', 0.0):.4f}  step {m['timing_s/step']:.1f}s (gen {m['timing_s/gen']:.1f}s, "
            f"score {m['timing_s/score']:.1f}s, train {m['timing_s/train']:.1f}s, sync {m['timing_s/sync']:.2f}s)"
            + (f"  replay {m['replay/groups']:.0f} of {m['replay/buffer']:.0f} kept" if "replay/buffer" in m else ""),
            file=sys.stdout)
        self.silent = self.silent + 1 if m["data/signal_share"] == 0.0 else 0
        if self.silent == self.SILENT_STEPS:
            self.bar.write(silent_warning(self.silent, self.entropy), file=sys.stdout)
        sys.stdout.flush()

    def close(self) -> None:
        self.bar.close()


def silent_warning(steps: int, entropy: float | None) -> str:
    """Why a run whose groups all had equal rewards cannot learn, and what to change; ``entropy`` is the last update's
    (None when every update so far was skipped)."""
    measured = (f"The policy's entropy was {entropy:.3f} nats/token at its last update; near 0" if entropy is not None
                else "No update has measured the policy's entropy yet (each was skipped); near 0 entropy")
    return (f"warning: for {steps} steps every group's rewards were equal (data/signal_share 0), so every advantage "
            f"is 0 and the updates carry only the KL and entropy terms, or are skipped: this run is not learning. "
            f"{measured}, its samples of one question are all alike (a collapsed "
            f"cold start). Try a larger train.group_size, a higher rollout.temperature, train.dynamic_filter=true, "
            f"or a shorter warm-up (warmup.steps, warmup.lr).")


def rollout_metrics(trajectories: list[Trajectory]) -> dict[str, float]:
    """The field's metric names (DESIGN section 7) over one step's episodes."""
    def mean(values) -> float:
        values = list(values)
        return float(statistics.fmean(values)) if values else 0.0

    turns = sum(t.stats.turns for t in trajectories)
    searches = [s for t in trajectories for s in t.stats.noisy]
    # Reward per data source: on the synthetic world, single-hop and two-hop questions apart.
    sources = sorted({t.data_source for t in trajectories})
    by_source = {f"critic/score/{source}": mean(t.reward for t in trajectories if t.data_source == source)
                 for source in sources}
    # Searches per episode per source: on two-hop questions a second search is the skill RL should teach.
    by_source.update({f"search/calls_per_episode/{source}": mean(t.stats.searches for t in trajectories
                                                                 if t.data_source == source) for source in sources})
    return {
        **by_source,
        **answer_in_first_results(trajectories),
        "critic/score/mean": mean(t.reward for t in trajectories),
        "critic/score/max": max(t.reward for t in trajectories),
        "response_length/mean": mean(len(t.response_ids) for t in trajectories),
        "response_length/generated_mean": mean(t.stats.generated_tokens for t in trajectories),
        "search/calls_per_episode": mean(t.stats.searches for t in trajectories),
        "search/opened_share": mean(1.0 if t.stats.opened_searches else 0.0 for t in trajectories),
        "search/noisy_share": mean(1.0 if s else 0.0 for s in searches) if searches else 0.0,
        "search/failed": float(sum(t.stats.failed_searches for t in trajectories)),
        "episode/valid_action_share": sum(t.stats.valid_actions for t in trajectories) / max(turns, 1),
        "episode/answered_share": mean(1.0 if t.stats.answered else 0.0 for t in trajectories),
        "episode/turns_mean": mean(t.stats.turns for t in trajectories),
        "episode/errors": float(sum(t.stats.finish_reason == "error" for t in trajectories)),
    }


def answer_in_first_results(trajectories: list[Trajectory]) -> dict[str, float]:
    """Per data source, the share of first searches whose documents already contain a gold answer, and the same
    for the simulator's useful and noisy draws apart. On two-hop questions a real engine almost never does this
    (the answer is one hop further); a simulator that was shown the answer may write it in, and a policy trained on
    that learns a one-search shortcut that fails against a real engine."""
    from actors.reward import substring_match

    hits: dict[str, list[float]] = {}
    for t in trajectories:
        if not t.stats.documents:
            continue
        found = float(substring_match("\n".join(t.stats.documents[0]), tuple(t.golden_answers)))
        hits.setdefault(f"search/answer_in_first_results/{t.data_source}", []).append(found)
        noisy = t.stats.noisy[0] if t.stats.noisy else None
        if noisy is not None:
            draw = "noisy" if noisy else "useful"
            hits.setdefault(f"search/answer_in_first_results/{t.data_source}/{draw}", []).append(found)
    return {key: statistics.fmean(values) for key, values in sorted(hits.items())}
