"""Going back to a checkpoint inside the running process (training/healing.py: a spike's
rollback, a replica mismatch), with the load a resume uses (`load_train_state`, also what
training/run.py resumes with), so the replayed steps are the ones an uninterrupted run takes.

What the load restores: DeepSpeed's engine.load_checkpoint the module's weights, the
optimizer's state and, under ZeRO, this rank's partitions (ZeRO-1/2 write its fp32 master back
into the model and all-gather it; ZeRO-3 repartitions first, checkpoint_event_prologue), the
LR scheduler, and its step and sample counters; checkpoint.manager.load this rank's Python,
NumPy, torch (and CUDA) RNG states. Then the loop's own: its TrainState from the client state
(step, data position, the spike detector's window, the skipped windows), the TP dropout
stream, and the data from the checkpoint's global sample index (a new loader, as a resumed run
makes one). A pending background save is completed first: it is older than what is rolled
back, and a tag still being written is never the one chosen.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator, Optional, Tuple

import torch.distributed as dist

from ..checkpoint import manager as ckpt
from ..checkpoint.resume import rollback_point
from ..checkpoint.storage import agree_on_resume
from ..checkpoint.tags import CheckpointDir, Tag
from ..data.datasets import train_samples
from .train_state import TrainState


def load_train_state(engine, tag: Tag) -> Tuple[TrainState, dict]:
    """Collective: `tag` into the engine (and this rank's RNG); -> the loop's state and the
    client state."""
    client = ckpt.load(engine, tag)
    return TrainState.from_client(client), client


class Batches:
    """The training micro-batches of this DP rank from a global sample index on; seek()
    starts them over elsewhere (a rollback, a skipped window)."""

    def __init__(self, open_at: Callable[[int, int], Iterator], train_iters: int,
                 global_batch: int, state: TrainState):
        """open_at(total, start): micro-batches of samples [start, total)."""
        self.open_at, self.train_iters, self.global_batch = open_at, train_iters, global_batch
        self.seek(state)

    def seek(self, state: TrainState) -> None:
        """From state's data position: the batches of the steps it has left."""
        self.it = self.open_at(train_samples(self.train_iters, self.global_batch, state.step,
                                             state.consumed_samples), state.consumed_samples)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.it)


def reload(trainer, at_most: int, why: str) -> Optional[str]:
    """Collective: the newest complete checkpoint of step `at_most` or earlier, loaded into
    the running trainer in place, every rank the same tag (checked as a resume checks it);
    -> its tag, or None when there is none (nothing changed)."""
    start = time.time()
    trainer.saver.flush(trainer.state.step, why)
    ckpts = CheckpointDir(trainer.ckpt_dir)
    tag = rollback_point(ckpts, at_most, (dist.get_rank(), dist.get_world_size()), trainer.log)
    problem = agree_on_resume(ckpts, tag and tag.name, trainer.log)
    if problem is not None:
        raise problem
    if tag is None:
        return None
    trainer.state, client = load_train_state(trainer.engine, tag)
    trainer.restore_tp_rng(client.get("_rng"))
    trainer.saved_at = trainer.state.step
    trainer.batches.seek(trainer.state)
    trainer.metrics.resumed(trainer.state.step, tag.name, start, start, reason=why)
    trainer.restart_interval()
    trainer.log(f"{why}: back to {tag.label} (step {trainer.state.step}, "
                f"{trainer.state.consumed_samples} samples consumed) in "
                f"{time.time() - start:.2f} s, in this process")
    return tag.name


def mark_abandoned(ckpt_dir: str, after: int, why: str) -> None:
    """Rank 0: move the markers of the complete tags after step `after` aside (damaged.json),
    so that no restart resumes the state a rollback left behind."""
    if dist.get_rank() != 0:
        return
    ckpts = CheckpointDir(ckpt_dir)
    for tag in map(ckpts.tag, ckpts.complete_tags()):
        if tag.step > after:
            tag.mark_damaged(why)
