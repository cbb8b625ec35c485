"""Process groups from megatron-core's parallel_state, and the adapter DeepSpeed reads them from.

Rank order is megatron's default (TP fastest, then DP, then PP), which is also the order of
DeepSpeed's PipeModelDataParallelTopology axes (pipe, data, model), so the groups coincide.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


def init_distributed() -> None:
    """The world's process group through DeepSpeed: NCCL on GPUs, gloo on CPUs.

    On CPU, DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce when it starts
    (about 30 s, once per machine: comm/torch.py build_shm_op) that only its inference path
    uses (inference_all_reduce); training's collectives go through torch.distributed's gloo.
    It is marked unavailable here, as on a machine that cannot build it (DeepSpeed keeps that
    table for the process and reads it only there), so a fresh machine's first run skips it."""
    import deepspeed

    from ..compat.ds_engine import disable_cpu_shm_comm

    if not torch.cuda.is_available():
        disable_cpu_shm_comm()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def initialize_groups(tp: int, pp: int) -> None:
    """(Re)create the TP/PP/DP groups; collective over the whole world."""
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def tp_group():
    return ps.get_tensor_model_parallel_group()


def tp_rank() -> int:
    return ps.get_tensor_model_parallel_rank()


def tp_size() -> int:
    return ps.get_tensor_model_parallel_world_size()


class DeepSpeedMPU:
    """The `mpu` DeepSpeed's engine reads (no pipeline): DP groups for gradient reduction and
    ZeRO partitioning, the model-parallel group for the grad norm and checkpoint file names.

    Deliberately no `initialize_sequence_parallel`: DeepSpeed takes its presence as a sequence-
    parallel mpu and then ignores the model-parallel group, which trains without error and
    gives wrong losses under TP.
    """

    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_model_parallel_group = staticmethod(ps.get_model_parallel_group)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)
    get_pipeline_model_parallel_world_size = staticmethod(
        ps.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)

    @staticmethod
    def get_model_parallel_rank() -> int:
        return dist.get_rank(group=ps.get_model_parallel_group())

    @staticmethod
    def get_model_parallel_world_size() -> int:
        return dist.get_world_size(group=ps.get_model_parallel_group())

    @staticmethod
    def get_data_parallel_group_ranks():
        return dist.get_process_group_ranks(ps.get_data_parallel_group())
