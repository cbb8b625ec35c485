"""Learning-rate schedule: linear warm-up, then cosine / linear / constant decay to min_lr.

A torch LambdaLR (which DeepSpeed steps and checkpoints with the engine); DeepSpeed's own
WarmupCosineLR has no min_lr floor in absolute terms and no linear-to-floor variant.
"""
from __future__ import annotations

import math

import torch

from ..config import TrainConfig


def warmup_steps(t: TrainConfig) -> int:
    """The configured warm-up, cut to the run's length: a short smoke run
    (train.train_iters=10 against a YAML warm-up of 20) needs no second override."""
    return min(t.warmup_iters, t.train_iters)


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate after `step` optimizer steps (step 0 is the first update)."""
    warmup = warmup_steps(t)
    if warmup and step < warmup:
        return t.lr * (step + 1) / warmup
    if t.lr_decay_style == "constant":
        return t.lr
    decay_iters = (t.lr_decay_iters or t.train_iters) - warmup
    progress = min(1.0, (step - warmup) / max(1, decay_iters))
    if t.lr_decay_style == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0 - progress
    return t.min_lr + (t.lr - t.min_lr) * factor


def make_scheduler(optimizer: torch.optim.Optimizer, t: TrainConfig):
    # LambdaLR multiplies the optimizer's initial lr (set to t.lr) by the returned factor;
    # train.lr=0 (weights held, e.g. to measure or to check an import) has factor 0.
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, t) / t.lr if t.lr else 0.0)
