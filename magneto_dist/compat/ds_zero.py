"""DeepSpeed 0.19.8's ZeRO optimizers' parameter partitions, as the replica check reads them
(training/replica_check.py): which tensors hold the same bytes.

- ZeRO-1/2 (`stage_1_and_2.DeepSpeedZeroOptimizer`): each parameter group is one flat buffer
  of the model's weights (`bit16_groups_flat[i]`; the module's parameters are views into it),
  cut into one partition per data-parallel rank (`parallel_partitioned_bit16_groups[i][r]`,
  views). Rank r's optimizer steps its own master copy of partition r
  (`single_partition_of_fp32_groups[i]`, a tensor of its own, fp32 whatever the model's dtype),
  writes it into its partition of the buffer (`bit16_partitions[partition_id].data.copy_(
  fp32_partition.data)` in step()) and all-gathers the buffer over
  `real_dp_process_group[i]`. Every rank so holds every partition, and rank r a second copy of
  its own.
- ZeRO-3 (`stage3.DeepSpeedZeroOptimizer_Stage3`): a rank holds only its partition of each
  parameter (`param.ds_tensor`), a sub-group's partitions in one flat buffer
  (`fp16_partitioned_groups_flat[i]`), partitioned over `sub_group_process_groups[i]`, and its
  master copy (`fp32_partitioned_groups_flat[i]`), written back into the buffer by
  `_reassign_or_swap_out_partitioned_parameters`. When the model is fp32 on the optimizer's
  device the master is that same buffer (`_create_fp32_partitions`): one copy only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from deepspeed.runtime.zero import stage3
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

from . import require_source

LIBRARY = "deepspeed"


@dataclass
class Partitions:
    """One parameter group's partitions as this rank holds them."""
    model: List[Optional[torch.Tensor]]  # the model's copy of partition r, for each DP rank r
                                         # (None: this rank does not hold that partition)
    master: Optional[torch.Tensor]       # the optimizer's copy of this rank's partition (None:
                                         # the model's partition is the optimizer's copy)
    group: object                        # the process group the partitions are cut over
    index: int                           # this rank's partition (its rank in `group`)


def zero_partitions(optimizer) -> Optional[List[Partitions]]:
    """Every parameter group's partitions; None for an optimizer that partitions nothing
    (ZeRO-0: the model's parameters are the only copy, on every data-parallel rank)."""
    import torch.distributed as dist

    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        # private API: deepspeed 0.19.8 stage_1_and_2 (see the module docstring)
        out = []
        for i, views in enumerate(optimizer.parallel_partitioned_bit16_groups):
            group = optimizer.real_dp_process_group[i]
            out.append(Partitions(list(views), optimizer.single_partition_of_fp32_groups[i],
                                  group, dist.get_rank(group=group)))
        return out
    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        # private API: deepspeed 0.19.8 stage3 (see the module docstring)
        out = []
        for i, flat in enumerate(optimizer.fp16_partitioned_groups_flat):
            group = optimizer.sub_group_process_groups[i]
            index, size = dist.get_rank(group=group), dist.get_world_size(group=group)
            master = optimizer.fp32_partitioned_groups_flat[i]
            alias = flat is not None and master.data_ptr() == flat.data_ptr()
            out.append(Partitions([flat if r == index else None for r in range(size)],
                                  None if alias else master, group, index))
        return out
    return None


def parameter_shard(param: torch.nn.Parameter) -> torch.Tensor:
    """What this rank holds of a parameter: its ZeRO-3 partition, else the parameter."""
    # private API: deepspeed 0.19.8 stage3 keeps a parameter's partition in `ds_tensor`
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


def parameter_shape(param: torch.nn.Parameter) -> torch.Size:
    """A parameter's full shape (ZeRO-3 empties `param.data` between uses: `ds_shape`)."""
    return getattr(param, "ds_shape", param.shape)


def check() -> None:
    """What this module relies on is still there (run at import)."""
    for method, fragment, what in (
            (DeepSpeedZeroOptimizer.__init__, "self.parallel_partitioned_bit16_groups.append(",
             "ZeRO-1/2's partition views"),
            (DeepSpeedZeroOptimizer.__init__, "self.single_partition_of_fp32_groups.append(",
             "ZeRO-1/2's master partitions"),
            (DeepSpeedZeroOptimizer.__init__, "self.real_dp_process_group =",
             "ZeRO-1/2's partitioning groups"),
            (DeepSpeedZeroOptimizer.step, "bit16_partitions[partition_id].data.copy_(",
             "ZeRO-1/2's write of the master into the model's partition"),
            (DeepSpeedZeroOptimizer_Stage3._create_fp16_partitions_with_defragmentation,
             "self.sub_group_process_groups.append(", "ZeRO-3's partitioning groups"),
            (DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions,
             "self.fp32_partitioned_groups_flat.append(self.fp16_partitioned_groups_flat[i])",
             "ZeRO-3's master partitions (shared with an fp32 model's)"),
            # by module: DeepSpeed wraps this method in its NVTX instrumentation
            (stage3, "self.fp16_partitioned_groups_flat[sub_group_id].data.copy_(",
             "ZeRO-3's write of the master into the model's partition "
             "(_reassign_or_swap_out_partitioned_parameters)"),
            (DeepSpeedZeroOptimizer_Stage3._create_fp16_partitions_with_defragmentation,
             "param.ds_tensor", "ZeRO-3's parameter partitions (ds_tensor)")):
        owner = getattr(method, "__qualname__", None)
        require_source(LIBRARY, method, fragment, f"{what} ({owner})" if owner else what)


check()
