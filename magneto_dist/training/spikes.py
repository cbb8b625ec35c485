"""Loss spikes: one rule, judged the same way by a running trainer (train.spike_policy) and by
the stability sweep's "spiky" verdict (stability/verdicts.py), so the two never disagree.

A step spikes when its loss is at least `loss_rise` nats above the median of the previous
`window` steps and at least `mad_factor` robust standard deviations above it (1.4826 x the
median absolute deviation: the standard deviation, for normal noise), or when its grad norm is
`grad_norm_factor` times the window's median and as many robust deviations above it on a log
scale. Median and MAD because a spike inside the window moves them little, where it would drag
a mean and a standard deviation up and hide the next one. The first `warmup` steps (the LR
warm-up, where the loss falls fastest) are neither judged nor part of a window, a step is judged
only once its window is full, and non-finite values are left out (the non-finite step rule
handles those).

The window is part of the training state (TrainState.loss_window, saved with each checkpoint),
so a resumed or rolled-back run judges its next steps exactly as the uninterrupted one would.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

ROBUST_SD = 1.4826  # MAD x this = the standard deviation of normal noise
Window = List[Tuple[float, Optional[float]]]  # (loss, grad norm) of recent steps, oldest first


@dataclass(frozen=True)
class SpikeRule:
    window: int = 10               # steps whose median and MAD judge the next one
    loss_rise: float = 1.0         # nats above the window's median loss, at least
    mad_factor: float = 4.0        # robust standard deviations above it, at least
    grad_norm_factor: float = 10.0  # or the grad norm this many times its median (0: loss only)
    warmup: int = 0                # the first steps: not judged, not in any window

    @classmethod
    def of(cls, train) -> "SpikeRule":
        """The rule a run's train section sets (config.TrainConfig)."""
        return cls(train.spike_window, train.spike_loss_rise, train.spike_mad_factor,
                   train.spike_grad_norm_factor, train.warmup_iters)


@dataclass(frozen=True)
class Judgement:
    spike: bool
    rise: float            # loss minus the window's median, nats
    median: float          # the window's median loss
    why: str               # one line a person can check against the curve


def _robust(values: Sequence[float]) -> Tuple[float, float]:
    """(median, robust standard deviation) of the values."""
    median = float(np.median(values))
    return median, ROBUST_SD * float(np.median(np.abs(np.asarray(values) - median)))


def judge_step(window: Window, loss: float, grad_norm: Optional[float],
               rule: SpikeRule) -> Optional[Judgement]:
    """The verdict on one step against the window of the steps before it; None while the
    window is not full or the loss is not finite."""
    if len(window) < rule.window or not math.isfinite(loss):
        return None
    median, sd = _robust([w[0] for w in window])
    rise = loss - median
    if rise >= rule.loss_rise and rise >= rule.mad_factor * sd:
        return Judgement(True, rise, median, f"loss {loss:.4f} is {rise:.2f} nats above the "
                         f"median {median:.4f} of the last {rule.window} steps "
                         f"({rise / max(sd, 1e-12):.1f} robust deviations)")
    norms = [math.log(w[1]) for w in window if w[1] is not None and w[1] > 0]
    if (rule.grad_norm_factor and grad_norm is not None and math.isfinite(grad_norm)
            and grad_norm > 0 and len(norms) == rule.window):
        log_median, log_sd = _robust(norms)
        excess = math.log(grad_norm) - log_median
        if excess >= math.log(rule.grad_norm_factor) and excess >= rule.mad_factor * log_sd:
            return Judgement(True, rise, median, f"grad norm {grad_norm:.4g} is "
                             f"{math.exp(excess):.1f}x the median {math.exp(log_median):.4g} "
                             f"of the last {rule.window} steps")
    return Judgement(False, rise, median, "")


def remember(window: Window, step: int, loss: float, grad_norm: Optional[float],
             rule: SpikeRule) -> Window:
    """The window after `step` (1-based) is kept: its values joined if finite and past the
    warm-up, the oldest dropped beyond `rule.window`."""
    if step <= rule.warmup or not math.isfinite(loss):
        return window
    norm = grad_norm if grad_norm is not None and math.isfinite(grad_norm) else None
    return (window + [(loss, norm)])[-rule.window:]


def judge_curve(losses: Sequence[float], grad_norms: Sequence[Optional[float]],
                rule: SpikeRule) -> List[Optional[Judgement]]:
    """Every step of a whole curve (step 1 first) judged as a run in train.spike_policy=warn
    judged it while training: against the window of the steps before it, every step kept."""
    window: Window = []
    verdicts = []
    for step, (loss, norm) in enumerate(zip(losses, grad_norms), start=1):
        verdicts.append(judge_step(window, loss, norm, rule) if step > rule.warmup else None)
        window = remember(window, step, loss, norm, rule)
    return verdicts
