"""Verdicts on a training-loss curve: ok, diverged, stuck, spiky (or crashed, from the sweep).

Pure functions of the per-step losses, so they are tested on synthetic curves and applied the
same way while a cell runs (early stop) and after it ends (the recorded verdict). A spike is
what training/spikes.py says it is, with the cell's own trainer keys (train.spike_*): the rule
its run judged its steps by while it trained, so the two never disagree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from ..training.spikes import SpikeRule, judge_curve

VERDICTS = ("ok", "spiky", "stuck", "diverged", "crashed")  # from best to worst


@dataclass
class VerdictConfig:
    nonfinite_steps: int = 3        # diverged: this many non-finite losses in a row
    above_start_steps: int = 20     # diverged: loss above its first value this many steps in a row
    stuck_margin: float = 0.1       # stuck: final loss within this many nats of the corpus's
                                    # unigram entropy (or above it): nothing beyond unigrams learned
    final_fraction: float = 0.05    # "final loss": the mean over this last fraction of the steps
    spiky_count: int = 3            # spiky: at least this many spikes (what a spike is: the
                                    # cells' train.spike_* keys, training/spikes.py)


@dataclass
class Verdict:
    verdict: str                    # one of VERDICTS
    reason: str                     # one line a person can check against the curve
    final_loss: Optional[float]
    spikes: int                     # loss spikes (a run of spiking steps counts once)
    max_spike: float                # the largest rise above the window's median loss, in nats


def final_loss(losses: Sequence[float], cfg: VerdictConfig) -> Optional[float]:
    finite = [x for x in losses if math.isfinite(x)]
    if not finite:
        return None
    tail = max(1, int(round(len(losses) * cfg.final_fraction)))
    last = [x for x in losses[-tail:] if math.isfinite(x)]
    return float(np.mean(last)) if last else None


def early_divergence(losses: Sequence[float], cfg: VerdictConfig) -> Optional[str]:
    """Why the curve so far has clearly diverged (stop the cell now), or None."""
    nonfinite = above = 0
    start = losses[0] if losses and math.isfinite(losses[0]) else None
    for step, loss in enumerate(losses, start=1):
        nonfinite = 0 if math.isfinite(loss) else nonfinite + 1
        above = above + 1 if start is not None and not loss <= start else 0
        if nonfinite >= cfg.nonfinite_steps:
            return f"{nonfinite} non-finite losses in a row (to step {step})"
        if above >= cfg.above_start_steps:
            return f"loss above its start {start:.3f} for {above} steps (to step {step})"
    return None


def count_spikes(losses: Sequence[float], rule: SpikeRule,
                 grad_norms: Optional[Sequence[Optional[float]]] = None) -> tuple:
    """(number of spikes, largest rise in nats over a window's median) of the curve, judged
    step by step as the run's detector judged it (a run of spiking steps counts once)."""
    spikes, largest, inside = 0, 0.0, False
    for judged in judge_curve(losses, grad_norms or [None] * len(losses), rule):
        if judged is None:
            continue
        largest = max(largest, judged.rise)
        spikes += int(judged.spike and not inside)
        inside = judged.spike
    return spikes, float(largest)


def judge(losses: List[float], unigram_entropy: Optional[float], cfg: VerdictConfig,
          rule: SpikeRule, grad_norms: Optional[Sequence[Optional[float]]] = None) -> Verdict:
    """The verdict of a whole curve (per-step training losses and grad norms, step 1 first);
    `rule`: what a spike is (the cell's trainer keys)."""
    if not losses:
        return Verdict("crashed", "no training step was logged", None, 0, 0.0)
    final = final_loss(losses, cfg)
    spikes, largest = count_spikes(losses, rule, grad_norms)
    diverged = early_divergence(losses, cfg)
    if diverged or final is None or not math.isfinite(losses[-1]):
        return Verdict("diverged", diverged or "the last loss is not finite", final, spikes,
                       largest)
    if unigram_entropy is not None and final >= unigram_entropy - cfg.stuck_margin:
        return Verdict("stuck", f"final loss {final:.3f} is at the unigram entropy "
                       f"{unigram_entropy:.3f} (margin {cfg.stuck_margin})", final, spikes,
                       largest)
    if spikes >= cfg.spiky_count:
        return Verdict("spiky", f"{spikes} spikes of the loss or grad norm (largest rise "
                       f"{largest:.2f} nats)", final, spikes, largest)
    return Verdict("ok", f"final loss {final:.3f}", final, spikes, largest)


def unigram_entropy(token_counts: np.ndarray) -> float:
    """Entropy in nats of the corpus's token frequencies: the loss of a model that has learned
    only how often each token occurs, i.e. the plateau a failed deep model sits on."""
    p = token_counts[token_counts > 0].astype(np.float64)
    p /= p.sum()
    return float(-(p * np.log(p)).sum())
