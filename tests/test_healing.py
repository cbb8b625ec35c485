"""The spike policy's verdicts (training/healing.py) on a scripted run, without processes: what
each policy makes of a spike, of its replay, and of a replay that differs; and that off adds
nothing to a step. The runs themselves: tests/dist/test_healing.py."""
import numpy as np

from magneto_dist.config import load_config
from magneto_dist.training import healing
from magneto_dist.training.healing import HARDWARE, NOTHING, ROLLBACK, SKIP, Healer, make_healer
from magneto_dist.training.spikes import SpikeRule, judge_curve
from magneto_dist.training.train_state import TrainState


class Recorder:
    def __init__(self):
        self.rows = []

    def event(self, row, text):
        self.rows.append(row)


class FakeTrainer:
    """What the healer reads of a Trainer for its verdicts (no engine: no replica check)."""

    def __init__(self, policy, **train):
        self.cfg = load_config(None, [f"train.spike_policy={policy}", "train.warmup_iters=2",
                                      *(f"train.{k}={v}" for k, v in train.items())])
        self.state, self.metrics, self.logged = TrainState(), Recorder(), []
        self.saved_at, self.local_loss = None, None

    def log(self, line):
        self.logged.append(line)


def curve(steps=30, seed=0):
    rng = np.random.default_rng(seed)
    return list(4.0 + rng.normal(0, 0.05, steps))


def run(healer, trainer, losses, first=1, save_every=4):
    """The healer's after_step over `losses` from step `first`; -> the actions."""
    actions = []
    for step, loss in enumerate(losses, start=first):
        trainer.state.step, trainer.local_loss = step, loss
        actions.append(healer.after_step(loss, 1.0) and healer.action)
        if step % save_every == 0 and not actions[-1]:
            trainer.saved_at = step
    return actions


def test_off_adds_nothing_and_warn_adds_no_collective():
    """off: no healer at all (no hook, no collective); warn: a row per spike, and nothing in
    the loop's all-reduce."""
    assert make_healer(FakeTrainer("off")) is None
    trainer = FakeTrainer("warn")
    healer = make_healer(trainer)
    losses = curve()
    losses[20] += 3.0
    assert not any(run(healer, trainer, losses)) and healer.flags() == ()
    assert [(r["step"], r["action"]) for r in trainer.metrics.rows] == [(21, "warn")]


def test_warn_rows_are_the_spikes_the_sweep_counts():
    """The trainer's detector, step by step, and the sweep's (judge_curve) on one curve."""
    trainer = FakeTrainer("warn")
    losses = curve(80, seed=3)
    for at in (30, 31, 50, 70):
        losses[at] += 2.0
    run(make_healer(trainer), trainer, losses)
    rule = SpikeRule.of(trainer.cfg.train)
    swept = [s for s, j in enumerate(judge_curve(losses, [1.0] * 80, rule), 1) if j and j.spike]
    assert [r["step"] for r in trainer.metrics.rows] == swept == [31, 32, 51, 71]


def replay_from(healer, trainer, back_to):
    """What _rollback leaves behind (the reload itself needs a process group)."""
    spike = healer.spike
    spike.back_to = back_to
    healer.replaying, healer.action = spike, NOTHING
    trainer.state.step = back_to


def test_rollback_verdicts_transient_persistent_and_a_replay_that_differs():
    trainer = FakeTrainer("rollback", spike_skip_steps=4)
    healer = Healer(trainer)
    losses = curve()
    bad = losses[:20] + [losses[20] + 3.0]
    assert run(healer, trainer, bad)[-1] == ROLLBACK  # step 21; the newest save: step 20
    # a transient spike: the replay of step 21 is fine
    replay_from(healer, trainer, 20)
    assert run(healer, trainer, [losses[20]], first=21) == [False]
    assert trainer.metrics.rows[-1]["action"] == "transient"
    # a persistent one: rollback, then the same loss on the replay: skip
    trainer.state.step = 24
    assert run(healer, trainer, [losses[20] + 3.0], first=25)[-1] == ROLLBACK
    replay_from(healer, trainer, 24)
    assert run(healer, trainer, [losses[20] + 3.0], first=25) == [SKIP]
    # the replay of a step that ran before from the same checkpoint gives another loss: a
    # hardware fault (step 29, the first after the save of step 28, replayed from it)
    healer.replaying = None
    run(healer, trainer, losses[25:28], first=26)
    assert run(healer, trainer, [losses[28]], first=29) == [False]
    assert healer.first_runs[29] == (losses[28], losses[28])
    assert run(healer, trainer, [losses[29] + 3.0], first=30)[-1] == ROLLBACK
    replay_from(healer, trainer, 28)
    assert run(healer, trainer, [losses[28] + 1e-6], first=29) == [HARDWARE]
    assert healer.spike.first_run == (losses[28], losses[28])


def test_a_third_spike_within_the_window_stops():
    trainer = FakeTrainer("rollback", spike_skip_steps=4)
    healer = Healer(trainer)
    losses = curve()
    assert run(healer, trainer, losses[:20] + [losses[20] + 3.0])[-1] == ROLLBACK
    replay_from(healer, trainer, 20)
    assert run(healer, trainer, [losses[20] + 3.0], first=21) == [SKIP]
    healer.replaying, healer.action = None, NOTHING
    trainer.state.step = 21
    assert run(healer, trainer, [losses[21] + 3.0], first=22) == [healing.STOP]
