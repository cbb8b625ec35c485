"""Silent corruption (train.replica_check_interval): a digest of every copy the ranks hold of
each block of parameter bytes, compared across the copies.

The copies of one block (compat/ds_zero.py says where DeepSpeed keeps them):
- ZeRO-1/2: partition r of a parameter group is in every data-parallel rank's model (the
  weights are all-gathered after each step) and in rank r's optimizer, which writes the model's
  copies from it: dp + 1 copies. A bf16/fp16 model is compared with the master rounded to its
  dtype, as DeepSpeed rounds it.
- ZeRO-3: rank r alone holds partition r: its model's partition and, when they are separate
  tensors (a bf16/fp16 model, an offloaded optimizer), its master copy. With fp32 the two are
  one tensor; the digest taken right after the optimizer step that last wrote it stands in as
  the second copy.
- ZeRO-0: every data-parallel rank's copy of each parameter.
Copies that differ from a strict majority name their holders; without one (two copies that
disagree) every holder is named: with both copies on one rank (ZeRO-3) that is still exact.
Under tensor or pipeline parallelism each group of ranks that holds the same shard is compared
on its own.

A digest is the int64 sum of a tensor's bits read as integers: a single flipped bit always
changes it (by 2^b), and it runs at memory speed on the device. A check sees what changed
between the last optimizer step's write and the check (it runs at the start of a step, before
the forward reads the weights): a change that the next all-gather overwrites before a check is
not seen, nor is a fault inside the step's own arithmetic (the spike replay's business).
"""
from __future__ import annotations

import math
import socket
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..compat.ds_zero import parameter_shape, parameter_shard, zero_partitions

INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
Key = Tuple  # what a block of bytes is: (its group's ranks, parameter group, partition)


@dataclass(frozen=True)
class Copy:
    rank: int              # global rank holding it
    what: str              # "model copy", "master copy", "digest after the last update"
    digest: int


@dataclass(frozen=True)
class Mismatch:
    rank: int
    host: str
    text: str              # what differs, in words


def digest(tensor: torch.Tensor) -> torch.Tensor:
    """The int64 sum of the tensor's bits as integers (a 0-d tensor on its device)."""
    flat = tensor.detach().reshape(-1)
    return flat.view(INT_VIEW[flat.element_size()]).sum(dtype=torch.int64)


def flip_bit(module: torch.nn.Module) -> str:
    """Flip the highest mantissa bit of element 0 of the first matrix of a transformer block
    that this rank holds a part of (the fault point `bitflip`); -> what was flipped."""
    held = [(name, parameter_shard(p)) for name, p in module.named_parameters()
            if len(parameter_shape(p)) >= 2 and parameter_shard(p).numel()]
    if not held:
        raise RuntimeError("bitflip: this rank holds no element of any weight matrix")
    name, shard = next(((n, s) for n, s in held if "layers." in n), held[0])
    bit = -int(math.log2(torch.finfo(shard.dtype).eps)) - 1
    ints = shard.detach().reshape(-1).view(INT_VIEW[shard.element_size()])
    ints[0] ^= 1 << bit
    return f"bit {bit} of element 0 of {name}"


class ReplicaCheck:
    """Collective check() of the copies this rank holds; record() after each optimizer step
    whose state a check will read (the stand-in copy of an fp32 ZeRO-3 partition)."""

    def __init__(self, engine, dp_group):
        self.engine, self.dp_group = engine, dp_group
        self.rank = dist.get_rank()
        self.recorded: Dict[Key, int] = {}
        self.hosts: Optional[List[str]] = None

    def _blocks(self) -> List[Tuple[Key, str, torch.Tensor]]:
        """(key, what, tensor) of every copy this rank holds."""
        partitions = zero_partitions(self.engine.optimizer)
        if partitions is None:  # ZeRO-0: the parameters themselves, replicated over DP
            ranks = tuple(dist.get_process_group_ranks(self.dp_group))
            return [((ranks, name), "model copy", p.data)
                    for name, p in self.engine.module.named_parameters()]
        blocks = []
        for i, part in enumerate(partitions):
            ranks = tuple(dist.get_process_group_ranks(part.group))
            for r, view in enumerate(part.model):
                if view is not None:
                    blocks.append(((ranks, i, r), "model copy", view))
            if part.master is not None:
                own = part.model[part.index]
                blocks.append(((ranks, i, part.index), "master copy",
                               part.master.to(own.dtype if own is not None else
                                              part.master.dtype)))
        return blocks

    def _single_copies(self) -> List[Tuple[Key, torch.Tensor]]:
        """The partitions of which this rank holds the only copy (ZeRO-3 with an fp32 model:
        the optimizer steps the model's partition itself)."""
        alone = []
        for i, part in enumerate(zero_partitions(self.engine.optimizer) or []):
            own = part.model[part.index]
            if part.master is None and own is not None and \
                    sum(view is not None for view in part.model) == 1:
                alone.append(((tuple(dist.get_process_group_ranks(part.group)), i,
                               part.index), own))
        return alone

    def record(self) -> None:
        """Digests of the single copies as the last optimizer step left them."""
        single = self._single_copies()
        if single:
            values = torch.stack([digest(t) for _, t in single]).tolist()
            self.recorded = {key: v for (key, _), v in zip(single, values)}

    def check(self) -> List[Mismatch]:
        """Collective over the world: every rank's copies compared; -> the ranks whose copy
        differs (the same list on every rank; empty: all agree)."""
        blocks = self._blocks()
        values = torch.stack([digest(t) for _, _, t in blocks]).tolist() if blocks else []
        mine = [(key, what, v) for (key, what, _), v in zip(blocks, values)]
        mine += [(key, "digest after the last update", v) for key, v in self.recorded.items()]
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (socket.gethostname(), mine))
        copies: Dict[Key, List[Copy]] = {}
        for rank, (_, entries) in enumerate(gathered):
            for key, what, value in entries:
                copies.setdefault(tuple(key), []).append(Copy(rank, what, value))
        hosts = [host for host, _ in gathered]
        return [m for key in sorted(copies, key=repr) for m in _outliers(key, copies[key], hosts)]


def _outliers(key: Key, copies: List[Copy], hosts: List[str]) -> List[Mismatch]:
    """The holders of the copies of one block that differ from a strict majority (every
    holder, when there is none), one entry per rank."""
    counts = Counter(c.digest for c in copies)
    if len(counts) == 1:
        return []
    value, votes = counts.most_common(1)[0]
    majority = value if votes * 2 > len(copies) else None
    odd: Dict[int, List[str]] = {}
    for c in copies:
        if c.digest != majority:
            odd.setdefault(c.rank, []).append(c.what)
    block = (f"partition {key[2]} of parameter group {key[1]}" if len(key) == 3
             else f"parameter {key[1]}")
    where = f"data-parallel group of ranks {', '.join(map(str, key[0]))}"
    against = (f"the other {votes} copies" if majority is not None
               else f"the other copies ({len(copies)} in all, no majority)")
    return [Mismatch(rank, hosts[rank], f"rank {rank} on {hosts[rank]}: its "
                     f"{' and '.join(whats)} of {block} ({where}) differ from {against}")
            for rank, whats in odd.items()]
