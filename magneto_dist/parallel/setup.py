"""Turn a full model into a trained-in-parallel engine: TP, then PP, then DP/ZeRO, in steps."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch.distributed as dist
from torch import nn

from ..config import Config
from ..training.engine import build_engine


@dataclass
class ParallelSetup:
    engine: object                       # the DeepSpeed engine
    dp_rank: int
    dp_size: int
    dp_group: Optional[object]           # None: the whole world
    checkpoint_info: dict = field(default_factory=dict)  # extra client state for checkpoints
    train_step_fn: Optional[Callable] = None  # None: the trainer's micro-batch loop
    can_sample: bool = True              # whether engine.module maps tokens to full logits


def setup_parallel(model: nn.Module, cfg: Config, task) -> ParallelSetup:
    world = dist.get_world_size()
    engine = build_engine(model, cfg, dp_size=world)
    return ParallelSetup(engine=engine, dp_rank=dist.get_rank(), dp_size=world, dp_group=None)
