"""Verdicts on a training-loss curve: ok, diverged, stuck, spiky (or crashed, from the sweep).

Pure functions of the per-step losses, so they are tested on synthetic curves and applied the
same way while a cell runs (early stop) and after it ends (the recorded verdict).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

VERDICTS = ("ok", "spiky", "stuck", "diverged", "crashed")  # from best to worst


@dataclass
class VerdictConfig:
    nonfinite_steps: int = 3        # diverged: this many non-finite losses in a row
    above_start_steps: int = 20     # diverged: loss above its first value this many steps in a row
    stuck_margin: float = 0.1       # stuck: final loss within this many nats of the corpus's
                                    # unigram entropy (or above it): nothing beyond unigrams learned
    final_fraction: float = 0.05    # "final loss": the mean over this last fraction of the steps
    spike_threshold: float = 1.0    # a spike: loss this many nats above the median loss of the
    spike_window: int = 10          # previous spike_window steps (the batch-to-batch noise of
                                    # the CPU miniature's 512-token batches is ~0.2 nats)
    spiky_count: int = 3            # spiky: at least this many spikes


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


def count_spikes(losses: Sequence[float], cfg: VerdictConfig) -> tuple:
    """(number of spikes, largest rise in nats) over the finite part of the curve."""
    spikes, largest, inside = 0, 0.0, False
    for t in range(1, len(losses)):
        window = [x for x in losses[max(0, t - cfg.spike_window):t] if math.isfinite(x)]
        if not window or not math.isfinite(losses[t]):
            continue
        rise = losses[t] - float(np.median(window))
        largest = max(largest, rise)
        spiking = rise > cfg.spike_threshold
        spikes += int(spiking and not inside)
        inside = spiking
    return spikes, float(largest)


def judge(losses: List[float], unigram_entropy: Optional[float], cfg: VerdictConfig) -> Verdict:
    """The verdict of a whole curve (per-step training losses, step 1 first)."""
    if not losses:
        return Verdict("crashed", "no training step was logged", None, 0, 0.0)
    final = final_loss(losses, cfg)
    spikes, largest = count_spikes(losses, cfg)
    diverged = early_divergence(losses, cfg)
    if diverged or final is None or not math.isfinite(losses[-1]):
        return Verdict("diverged", diverged or "the last loss is not finite", final, spikes,
                       largest)
    if unigram_entropy is not None and final >= unigram_entropy - cfg.stuck_margin:
        return Verdict("stuck", f"final loss {final:.3f} is at the unigram entropy "
                       f"{unigram_entropy:.3f} (margin {cfg.stuck_margin})", final, spikes,
                       largest)
    if spikes >= cfg.spiky_count:
        return Verdict("spiky", f"{spikes} loss spikes of more than {cfg.spike_threshold} nats "
                       f"(largest {largest:.2f})", final, spikes, largest)
    return Verdict("ok", f"final loss {final:.3f}", final, spikes, largest)


def unigram_entropy(token_counts: np.ndarray) -> float:
    """Entropy in nats of the corpus's token frequencies: the loss of a model that has learned
    only how often each token occurs, i.e. the plateau a failed deep model sits on."""
    p = token_counts[token_counts > 0].astype(np.float64)
    p /= p.sum()
    return float(-(p * np.log(p)).sum())
