"""Replay of rare successes: the policy's own lucky episodes, brought back until it can repeat them.

Sparse rewards starve a group baseline. When one episode in a group of G succeeds and the rest fail, GRPO pushes it
up once, by one optimizer step, and the next step draws other questions. A small policy that finds a two-hop answer
a few times a run forgets each find before it can become a habit. Self-imitation learning (Oh et al., 2018) and
experience replay for RL on LLMs (RLEP, 2025) answer this the same way, and so does this module:

1. After a step's rollout, a group whose mean reward is at most ``max_group_mean`` gives up its best episode if that
   episode earned at least ``min_reward`` and, with ``grounded``, its answer stands in the documents it retrieved
   (a lucky guess is not a find).
2. On later steps, ``prompts`` of the step's questions are drawn from the buffer, oldest first. Each is rolled out
   afresh, and the kept episode joins the new group as one more member. The group then has a success to rank the
   new episodes against, so its advantages are not all zero.
3. An entry leaves when the fresh episodes of its question succeed often enough on their own (the group mean is
   above ``max_group_mean``: learned), after ``max_uses`` replays, or when the buffer is full and it is the oldest.

Nothing is demonstrated: every kept episode is one the policy sampled itself. A replayed episode comes from an older
policy. On the on-policy path (one optimizer step, ``train.max_staleness=0``) its ratio is 1 and its gradient is its
advantage times the gradient of its logprob, as in self-imitation; with ``max_staleness > 0`` the ratio against its
rollout logprobs clips it once the policy has moved far towards it.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from actors.dataset import QAExample
from actors.reward import substring_match
from actors.trajectory import EpisodeStats, Trajectory


@dataclass
class ReplayConfig:
    """Replay of rare successes (``launch/driver/replay.py``); off while ``prompts`` is 0.

    Attributes:
        prompts: of each step's ``train.prompts_per_step`` questions, at most this many come from the buffer; the
            rest are drawn as usual. 0 turns replay off.
        min_reward: an episode is a success when its reward is at least this (F1 1.0: the answer exactly).
        max_group_mean: a success is rare, and kept, when its group's mean reward is at most this. A replayed
            question whose fresh episodes average more than this has been learned and leaves the buffer.
        grounded: keep only successes whose answer occurs in the documents the episode retrieved, so that a guess
            that happened to be right is not taught.
        max_uses: replays of one entry before it leaves.
        capacity: entries kept; the oldest leaves when a new one comes.
    """

    prompts: int = 0
    min_reward: float = 1.0
    max_group_mean: float = 0.5
    grounded: bool = True
    max_uses: int = 4
    capacity: int = 32


@dataclass
class ReplayEntry:
    example: QAExample
    trajectory: Trajectory
    uses: int = 0


def grounded(trajectory: Trajectory) -> bool:
    """Whether some gold answer occurs in the documents the episode's searches returned."""
    retrieved = " ".join(doc for docs in trajectory.stats.documents for doc in docs)
    return bool(retrieved) and substring_match(retrieved, trajectory.golden_answers) == 1.0


class SuccessReplay:
    """The buffer of rare successes, keyed by question uid (one entry per question)."""

    def __init__(self, cfg: ReplayConfig) -> None:
        if cfg.prompts < 0 or cfg.max_uses < 1 or cfg.capacity < 1:
            raise ValueError(f"replay.prompts={cfg.prompts}, replay.max_uses={cfg.max_uses}, replay.capacity="
                             f"{cfg.capacity}: expected prompts >= 0, max_uses >= 1 and capacity >= 1")
        self.cfg = cfg
        self.entries: dict[str, ReplayEntry] = {}  # insertion order is age: the first is the oldest
        self.counts: dict[str, int] = defaultdict(int)  # since the last ``draw``: what the step's metrics report
        self.rejoined_uids: list[str] = []  # since the last ``draw``: the replayed episodes added to groups

    @property
    def enabled(self) -> bool:
        return self.cfg.prompts > 0

    def draw(self, limit: int) -> list[ReplayEntry]:
        """Up to ``min(prompts, limit)`` entries to replay this step, the oldest first. Starts the step's counts."""
        self.counts = defaultdict(int)
        self.rejoined_uids = []
        return list(self.entries.values())[: min(self.cfg.prompts, limit)] if self.enabled else []

    def observe(self, trajectories: list[Trajectory], examples: dict[str, QAExample],
                replayed: dict[str, ReplayEntry]) -> list[Trajectory]:
        """Add each replayed entry's episode to its new group, update the buffer from the step's groups, and return
        the trajectories with the replayed episodes in.

        ``examples`` maps each group id to the question it was rolled for; ``replayed`` maps the group ids of the
        replayed questions to their entries. Called once per rollout round of a step (dynamic filtering refills);
        the counts add up until the next ``draw``."""
        groups: dict[str, list[Trajectory]] = defaultdict(list)
        for t in trajectories:
            groups[t.group_id].append(t)
        out = list(trajectories)
        for group_id, fresh in groups.items():
            example = examples[group_id]
            fresh_mean = statistics.fmean(t.reward for t in fresh)
            entry = replayed.get(group_id)
            if entry is not None:
                entry.uses += 1
                self.counts["replayed"] += 1
                self.counts["fresh_successes"] += sum(t.reward >= self.cfg.min_reward for t in fresh)
                self.counts["fresh_episodes"] += len(fresh)
                out.append(_rejoined(entry.trajectory, group_id, entry.uses))
                self.rejoined_uids.append(out[-1].uid)
                if fresh_mean > self.cfg.max_group_mean:
                    self.counts["learned"] += 1
                    self._remove(example.uid)
                elif entry.uses >= self.cfg.max_uses:
                    self.counts["retired"] += 1
                    self._remove(example.uid)
                continue
            if fresh_mean > self.cfg.max_group_mean or example.uid in self.entries:
                continue
            best = max(fresh, key=lambda t: t.reward)
            if best.reward < self.cfg.min_reward or (self.cfg.grounded and not grounded(best)):
                continue
            self.entries[example.uid] = ReplayEntry(example, copy.deepcopy(best))
            self.counts["added"] += 1
            while len(self.entries) > self.cfg.capacity:
                self._remove(next(iter(self.entries)))
                self.counts["evicted"] += 1
        return out

    def metrics(self) -> dict[str, float]:
        c = self.counts
        return {"replay/buffer": float(len(self.entries)), "replay/groups": float(c["replayed"]),
                "replay/added": float(c["added"]), "replay/learned": float(c["learned"]),
                "replay/retired": float(c["retired"] + c["evicted"]),
                "replay/fresh_success_share": c["fresh_successes"] / max(c["fresh_episodes"], 1)}

    def _remove(self, uid: str) -> None:
        self.entries.pop(uid, None)

    def state_dict(self) -> dict[str, Any]:
        return {"entries": [{"example": dataclasses.asdict(e.example), "trajectory": dataclasses.asdict(e.trajectory),
                             "uses": e.uses} for e in self.entries.values()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entries = {}
        for item in state.get("entries", []):
            example = QAExample(**{**item["example"], "golden_answers": tuple(item["example"]["golden_answers"])})
            t = dict(item["trajectory"])
            t["stats"] = EpisodeStats(**t["stats"])
            t["golden_answers"] = tuple(t["golden_answers"])
            self.entries[example.uid] = ReplayEntry(example, Trajectory(**t), int(item["uses"]))


def _rejoined(kept: Trajectory, group_id: str, use: int) -> Trajectory:
    """The kept episode as a member of a new group: same tokens and reward, its own uid."""
    return dataclasses.replace(kept, uid=f"{kept.uid}/replay{use}", group_id=group_id,
                               stats=copy.deepcopy(kept.stats))
