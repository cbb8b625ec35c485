"""Learning-rate schedule: linear warm-up, then cosine / linear / constant decay to min_lr, or
WSD (warm-up, stable, decay: Megatron's and torchtitan's, for runs whose length is not fixed in
advance: the LR stays at its peak and a short cooldown to min_lr ends the run).

A torch LambdaLR (which DeepSpeed steps and checkpoints with the engine); DeepSpeed's own
WarmupCosineLR has no min_lr floor in absolute terms and no linear-to-floor variant. The lambda
gives one factor for every parameter group, so groups with their own LR (muP's hidden matrices)
keep their ratio to train.lr all along.
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
    if t.lr_decay_style == "wsd":
        return t.min_lr + (t.lr - t.min_lr) * wsd_factor(step, t)
    decay_iters = (t.lr_decay_iters or t.train_iters) - warmup
    progress = min(1.0, (step - warmup) / max(1, decay_iters))
    if t.lr_decay_style == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0 - progress
    return t.min_lr + (t.lr - t.min_lr) * factor


# The cooldown's shape: its factor at progress p in [0, 1] (Megatron's lr_wsd_decay_style names
# 1-sqrt "minus_sqrt").
WSD_SHAPES = {"linear": lambda p: 1.0 - p,
              "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
              "1-sqrt": lambda p: 1.0 - math.sqrt(p)}


def wsd_factor(step: int, t: TrainConfig) -> float:
    """1 until the cooldown, which spans the last wsd_decay_iters steps before the decay's end
    (lr_decay_iters, else train_iters), then the shape's factor, 0 from the end on."""
    start = (t.lr_decay_iters or t.train_iters) - t.wsd_decay_iters
    progress = min(1.0, max(0.0, (step - start) / t.wsd_decay_iters))
    return WSD_SHAPES[t.wsd_decay_style](progress)


def make_scheduler(optimizer: torch.optim.Optimizer, t: TrainConfig):
    # LambdaLR multiplies the optimizer's initial lr (set to t.lr) by the returned factor;
    # train.lr=0 (weights held, e.g. to measure or to check an import) has factor 0.
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, t) / t.lr if t.lr else 0.0)
