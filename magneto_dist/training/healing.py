"""What a Trainer does about loss spikes (train.spike_policy) and silent corruption
(train.replica_check_interval): the policy, between the trainer's hooks and its pieces
(spikes.py the rule, replica_check.py the digests, rollback.py the reload in place).

Every verdict is taken on global values (the all-reduced loss and grad norm, the gathered
digests), so every rank takes the same one, and the rollback policy's verdict also rides in
the loop's per-step all-reduce (Trainer.agree): no rank acts alone. Off adds nothing to a step;
warn a row per spike and no collective.

A spike under rollback, at step S:
1. the step's update is thrown away with the state: back to the newest complete checkpoint
   before S (step C) in this process, and the steps after it are replayed;
2. the first replayed step, C+1, re-runs the same batch from the same state: a loss other than
   its first run's (beyond train.replay_tolerance) is a hardware fault: the ranks whose own
   loss differs are named and the run exits HARDWARE, which the launcher retries;
3. at S again: no spike: it was transient, training goes on. The spike with the same loss: it
   is in the data or the state: back to C once more, and train.spike_skip_steps global batches
   around S (from max(C+1, S - skip/2) on) are skipped, recorded by their global sample indices.
   A spike with another loss: a hardware fault, as in 2;
4. a third spike within train.spike_skip_steps steps, or a skip the training split has no room
   for, stops the run (SPIKES, not retried), its checkpoints untouched.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from ..errors import ExitCode
from .replica_check import ReplicaCheck, flip_bit
from .rollback import mark_abandoned, reload
from .spikes import Judgement, SpikeRule, judge_step, remember

# What a step asks the ranks to do; the all-reduced maximum is what they do.
NOTHING, ROLLBACK, SKIP, STOP, HARDWARE = range(5)
ROLLED_BACK = "rolled back"  # before_step: the state went back, the step did not run


@dataclass
class Spike:
    step: int
    loss: float
    grad_norm: Optional[float]
    local_loss: float                 # this rank's own loss, before the data-parallel mean
    judged: Optional[Judgement]
    back_to: Optional[int] = None     # the step of the checkpoint it went back to
    first_run: Optional[Tuple[float, float]] = None  # (loss, local loss) a replay differs from


def same(a: float, b: float, tolerance: float) -> bool:
    return a == b or abs(a - b) <= tolerance * abs(b)


def hosts() -> List[str]:
    """Collective: every rank's host name, by rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, socket.gethostname())
    return out


class Healer:
    """One Trainer's spike policy and replica check (make_healer: None when both are off)."""

    def __init__(self, trainer):
        self.trainer, t = trainer, trainer.cfg.train
        self.policy, self.rule = t.spike_policy, SpikeRule.of(t)
        self.tolerance, self.interval = t.replay_tolerance, t.replica_check_interval
        self.replicas = ReplicaCheck(trainer.engine, trainer.dp_group) if self.interval else None
        self.last_agreed = trainer.state.step  # the last check that agreed (the start: trusted)
        self.first_runs = {}          # step -> (loss, local loss) of the steps after a save
        self.spikes: List[int] = []   # steps of the spikes met, first runs and replays
        self.replaying: Optional[Spike] = None
        self.action, self.spike = NOTHING, None
        self.skip_from: Optional[int] = None  # the step before which a window is skipped

    # -- the trainer's hooks -------------------------------------------------------------
    def start(self) -> None:
        """Before the first step: the state a first check compares with."""
        self._record()

    def before_step(self) -> Union[None, str, ExitCode]:
        """At the top of a step, after the fault points: a due data skip, the bitflip fault, a
        due replica check. ROLLED_BACK: the step did not run; an ExitCode: stop."""
        tr = self.trainer
        step = tr.state.step + 1
        if self.skip_from == step:
            self._skip_window()
        if tr.faults.active("bitflip", tr.rank, step):
            print(f"fault injection: rank {tr.rank} at bitflip, step {step}: "
                  f"{flip_bit(tr.engine.module)}", flush=True)
        if self.replicas and tr.state.step % self.interval == 0:
            return self._check_replicas()
        return None

    def after_step(self, loss: float, grad_norm: Optional[float]) -> bool:
        """After the step's update: judge it. True: an action is due at agree(), so the step's
        state is not to be saved."""
        tr = self.trainer
        step = tr.state.step
        if self.interval and step % self.interval == 0:
            self._record()
        if self.policy == "off":
            return False
        judged = judge_step(tr.state.loss_window, loss, grad_norm, self.rule) \
            if step > self.rule.warmup else None
        if self.policy == "warn":
            if judged and judged.spike:
                self._row(step, loss, grad_norm, judged, "warn")
            self._keep(step, loss, grad_norm)
            return False
        local = float(tr.local_loss)
        self.action = self._verdict(Spike(step, loss, grad_norm, local, judged))
        if self.action == NOTHING:
            self._keep(step, loss, grad_norm)
            if tr.saved_at == step - 1:  # the step a rollback to that save replays first
                horizon = step - 4 * tr.cfg.checkpoint.save_interval
                self.first_runs = {s: v for s, v in self.first_runs.items() if s > horizon}
                self.first_runs[step] = (loss, local)
        return self.action != NOTHING

    def flags(self) -> tuple:
        """This step's share of the loop's all-reduce (max over ranks): the action and its
        negation, whose maximum is minus the smallest, so ranks that disagree show."""
        return (float(self.action), -float(self.action)) if self.policy == "rollback" else ()

    def act(self, agreed: List[float]) -> Optional[ExitCode]:
        """After the all-reduce, on every rank: do what the step asked for."""
        if not agreed or agreed[0] == NOTHING:
            return None
        action, self.action = self.action, NOTHING
        if agreed[0] != -agreed[1]:  # the same global values judged differently
            return self._hardware(self.trainer.state.step, "the ranks judged the same global "
                                  "loss differently", None)
        if action == ROLLBACK:
            return self._rollback()
        if action == SKIP:
            return self._skip()
        if action == STOP:
            return self._stop()
        spike = self.spike
        return self._hardware(spike.step, f"step {spike.step} re-run from the checkpoint of "
                              f"step {spike.back_to} (the same batch, the same state) gave loss "
                              f"{spike.loss!r}, its first run {spike.first_run[0]!r}",
                              spike.first_run[1])

    # -- verdicts ------------------------------------------------------------------------
    def _verdict(self, now: Spike) -> int:
        """What the rollback policy makes of this step (see the module docstring)."""
        replay, spiking = self.replaying, bool(now.judged and now.judged.spike)
        first = self.first_runs.get(now.step)
        now.back_to = replay.back_to if replay else None
        if replay and now.step == replay.back_to + 1 != replay.step and first and \
                not same(now.loss, first[0], self.tolerance):
            now.first_run, self.spike = first, now
            return HARDWARE
        if replay and now.step == replay.step:
            self.replaying = None
            if not spiking:
                self._row(now.step, now.loss, now.grad_norm, now.judged, "transient",
                          first_loss=replay.loss)
                return NOTHING
            self.spike = now
            if not same(now.loss, replay.loss, self.tolerance):
                now.first_run = (replay.loss, replay.local_loss)
                return HARDWARE
            return self._counted(now.step) or SKIP
        if not spiking:
            return NOTHING
        self.spike = now
        return self._counted(now.step) or ROLLBACK

    def _counted(self, step: int) -> int:
        """STOP when this spike is the third within train.spike_skip_steps steps."""
        window = self.trainer.cfg.train.spike_skip_steps
        self.spikes = [s for s in self.spikes if s > step - window] + [step]
        return STOP if len(self.spikes) >= 3 else NOTHING

    # -- actions -------------------------------------------------------------------------
    def _reload(self, at_most: int, why: str) -> Optional[str]:
        tag = reload(self.trainer, at_most, why)
        if tag:
            self.skip_from = None
            self._record()
        return tag

    def _rollback(self) -> None:
        spike = self.spike
        tag = self._reload(spike.step - 1, f"loss spike at step {spike.step}")
        self._row(spike.step, spike.loss, spike.grad_norm, spike.judged,
                  "rollback" if tag else "none", to_tag=tag)
        if tag is None:
            self.trainer.log(f"WARNING: no complete checkpoint before step {spike.step}: "
                             "training on through the spike")
            self._keep(spike.step, spike.loss, spike.grad_norm)
            return
        spike.back_to = self.trainer.state.step
        self.replaying = spike

    def _skip(self) -> Optional[ExitCode]:
        spike, t = self.spike, self.trainer.cfg.train
        tag = self._reload(spike.step - 1, f"loss spike at step {spike.step}, again on the "
                                           "replay")
        self._row(spike.step, spike.loss, spike.grad_norm, spike.judged, "skip", to_tag=tag)
        back_to = self.trainer.state.step
        self.skip_from = max(back_to + 1, spike.step - t.spike_skip_steps // 2)
        if not self._room_to_skip():
            return self._stop(f"the spike at step {spike.step} came back on the replay and the "
                              f"training split has no room left to skip {t.spike_skip_steps} "
                              f"global batches (train.spike_max_skips={t.spike_max_skips} "
                              "windows were reserved)")
        if self.skip_from == back_to + 1:
            self._skip_window()
        return None

    def _room_to_skip(self) -> bool:
        """Whether the training split holds the steps left after the window."""
        tr, t = self.trainer, self.trainer.cfg.train
        start = tr.state.consumed_samples + (self.skip_from - 1 - tr.state.step) * \
            t.global_batch_size
        needed = start + (t.spike_skip_steps + t.train_iters - self.skip_from + 1) * \
            t.global_batch_size
        return needed <= len(tr.train_ds)

    def _skip_window(self) -> None:
        skip_data(self.trainer, self.trainer.cfg.train.spike_skip_steps,
                  f"the spike at step {self.spike.step} came back on the replay",
                  self.spike.step)
        self.skip_from = None

    def _stop(self, why: Optional[str] = None) -> ExitCode:
        tr, spike = self.trainer, self.spike
        why = why or (f"a third loss spike within train.spike_skip_steps="
                      f"{tr.cfg.train.spike_skip_steps} steps (at steps "
                      f"{', '.join(map(str, self.spikes))})")
        tr.saver.flush(tr.state.step, "the run stops")
        self._row(spike.step, spike.loss, spike.grad_norm, spike.judged, "stop")
        tr.log(f"stopped: {why}. The last checkpoint is untouched: rerunning resumes from it "
               "and meets the same data; to go past it, rerun with checkpoint.resume=TAG "
               "checkpoint.resume_skip_batches=N (N global batches skipped by hand), or lower "
               "train.lr")
        return ExitCode.SPIKES

    def _hardware(self, step: int, what: str, local_first: Optional[float]) -> ExitCode:
        """Collective: name the ranks whose own loss differs from its first run's; stop."""
        tr = self.trainer
        differs = torch.zeros(dist.get_world_size(), device=tr.device)
        if local_first is not None:
            differs[tr.rank] = float(not same(float(tr.local_loss), local_first,
                                              self.tolerance))
        dist.all_reduce(differs)
        ranks, names = [r for r, d in enumerate(differs.tolist()) if d], hosts()
        who = (f"{', '.join(f'rank {r} on {names[r]}' for r in ranks)} computed another result"
               if 0 < len(ranks) < len(names) else "which rank cannot be told")
        tr.metrics.event({"split": "spike", "step": step, "action": "hardware_fault",
                          "ranks": ranks, "hosts": [names[r] for r in ranks], "why": what},
                         f"hardware fault at step {step}: {what}; {who}")
        tr.log(f"stopped: a hardware fault, not the data: {what}; {who}. Exit "
               f"{int(ExitCode.HARDWARE)}: the launcher retries, resuming from the last "
               "checkpoint; a node that does it again should be replaced")
        tr.saver.flush(tr.state.step, "the run stops")
        return ExitCode.HARDWARE

    def _check_replicas(self) -> Union[None, str, ExitCode]:
        """Collective: the replica check; a mismatch is named and rolled back."""
        tr = self.trainer
        found, checked = self.replicas.check(), tr.state.step
        if not found:
            self.last_agreed = checked
            return None
        for m in found:
            tr.metrics.event({"split": "replica_mismatch", "rank": m.rank, "host": m.host,
                              "step": checked, "last_agreed": self.last_agreed, "what": m.text},
                             f"replica mismatch at step {checked}: {m.text}")
            tr.log(f"WARNING: silent corruption at step {checked}: {m.text}")
        why = (f"replica mismatch at step {checked} (the last check that agreed: step "
               f"{self.last_agreed})")
        tag = self._reload(self.last_agreed, why)
        mark_abandoned(tr.ckpt_dir, self.last_agreed, f"saved after the last replica check "
                       f"that agreed (step {self.last_agreed}), before a mismatch at step "
                       f"{checked}")
        if tag is None:
            tr.log(f"stopped: {why}, and no complete checkpoint of step {self.last_agreed} or "
                   f"earlier to go back to. Exit {int(ExitCode.HARDWARE)}: the launcher "
                   "retries from the start")
            return ExitCode.HARDWARE
        self.replaying = None
        return ROLLED_BACK

    # -- small pieces --------------------------------------------------------------------
    def _record(self) -> None:
        if self.replicas and self.trainer.state.step % self.interval == 0:
            self.replicas.record()

    def _keep(self, step: int, loss: float, grad_norm: Optional[float]) -> None:
        state = self.trainer.state
        state.loss_window = remember(state.loss_window, step, loss, grad_norm, self.rule)

    def _row(self, step: int, loss: float, grad_norm: Optional[float],
             judged: Optional[Judgement], action: str, **extra) -> None:
        why = judged.why if judged and judged.why else "no spike on the replay"
        self.trainer.metrics.event(
            {"split": "spike", "step": step, "loss": loss, "grad_norm": grad_norm,
             "median": judged.median if judged else None,
             "rise": judged.rise if judged else None, "action": action,
             "consumed_samples": self.trainer.state.consumed_samples, **extra},
            f"loss spike at step {step}: {why} ({action})")
        self.trainer.log(f"{'WARNING: ' * (action != 'transient')}loss spike at step {step}: "
                         f"{why} ({action})")


def skip_data(trainer, batches: int, why: str, step: Optional[int] = None) -> None:
    """Move the data position `batches` global batches ahead: the samples in between are
    never trained on, recorded in the state (every later checkpoint lists them) and in a
    {"split": "spike", "action": "skip_data"} row."""
    state, gbs = trainer.state, trainer.cfg.train.global_batch_size
    first, end = state.consumed_samples, state.consumed_samples + batches * gbs
    state.consumed_samples = end
    state.skipped_samples = state.skipped_samples + [(first, end)]
    if trainer.batches is not None:  # else train() starts them from the new position
        trainer.batches.seek(state)
    trainer.metrics.event({"split": "spike", "step": step or state.step, "action": "skip_data",
                           "skipped_samples": [first, end], "before_step": state.step + 1},
                          f"skipped samples {first}-{end - 1} ({batches} global batches) "
                          f"before step {state.step + 1}")
    trainer.log(f"{why}: skipping samples {first}-{end - 1} ({batches} global batches); step "
                f"{state.step + 1} trains on samples from {end} on")


def make_healer(trainer) -> Optional[Healer]:
    t = trainer.cfg.train
    if t.spike_policy == "off" and not t.replica_check_interval:
        return None
    return Healer(trainer)
