"""Process groups from megatron-core's parallel_state, and the adapter DeepSpeed reads them from.

Rank order is megatron's default, "tp-cp-ep-dp-pp": TP fastest, then CP, then DP, then PP
(rank = tp_rank + TP x (cp_rank + CP x (dp_rank + DP x pp_rank))). DeepSpeed's
PipeModelDataParallelTopology has the axes (pipe, data, model); built with num_dp = DP x CP its
"data" coordinate is cp_rank + CP x dp_rank, so its groups coincide with megatron's and its
data-parallel group is megatron's data-parallel group with context parallelism.

Two data-parallel groups, on purpose: gradients are averaged (and ZeRO partitions) over DP x CP,
since every rank of a CP group holds the same parameters and computed them from other tokens of
the same samples; the data sampler splits samples over DP only, since the CP ranks of a group
read the same samples (each keeps its chunks of the sequence).
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from ..compat.torch_groups import live_process_groups
from ..config import ConfigError, ParallelConfig


def cuda_device_index(local_rank: int, local_world_size: int, visible: int) -> int:
    """This rank's CUDA device among the `visible` ones: its local rank when it sees every GPU
    of its node (deepspeed and torchrun start one process per GPU, each seeing all), device 0
    when it sees exactly one (a scheduler that masks each task to its own GPU, e.g.
    `srun --gpus-per-task=1`). Anything else would put two ranks on one GPU."""
    if visible == 1:
        return 0
    if local_rank < visible and local_world_size <= visible:
        return local_rank
    mask = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    raise ConfigError(
        f"{max(local_world_size, local_rank + 1)} ranks on this node (LOCAL_RANK={local_rank}, "
        f"LOCAL_WORLD_SIZE={local_world_size}) but this rank sees {visible} CUDA devices "
        f"(CUDA_VISIBLE_DEVICES={mask}), so ranks would share a GPU: start one rank per "
        f"visible GPU (deepspeed --num_gpus {visible}), or give each rank its own GPU "
        "(srun --gpus-per-task=1)")


def set_local_device(local_rank: int, local_world_size: int, tp: int) -> None:
    """Before anything touches the GPU (the CUDA context is made here): this rank's device,
    and with tensor parallelism CUDA_DEVICE_MAX_CONNECTIONS=1 unless the environment sets it.
    megatron-core's TP linear layers launch the all-reduce of the input gradient
    asynchronously and count on one hardware queue to start it before the weight-gradient
    GEMM (tensor_parallel/layers.py, LinearWithGradAccumulationAndAsyncCommunication); with
    several queues the GEMM may go first and the overlap is lost. Without TP nothing relies
    on it, and ZeRO's side streams overlap better with more queues. No-op on a CPU."""
    if not torch.cuda.is_available():
        return
    if tp > 1:
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    torch.cuda.set_device(cuda_device_index(local_rank, local_world_size,
                                            torch.cuda.device_count()))


def init_distributed(timeout_minutes: int = ParallelConfig.timeout_minutes) -> None:
    """The world's process group through DeepSpeed: NCCL on GPUs, gloo on CPUs; a collective
    waits `timeout_minutes` (parallel.timeout_minutes) for the slowest rank.

    On CPU, DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce when it starts
    (about 30 s, once per machine: comm/torch.py build_shm_op) that only its inference path
    uses (inference_all_reduce); training's collectives go through torch.distributed's gloo.
    It is marked unavailable here, as on a machine that cannot build it (DeepSpeed keeps that
    table for the process and reads it only there), so a fresh machine's first run skips it."""
    import deepspeed

    from ..compat.ds_engine import disable_cpu_shm_comm

    if not torch.cuda.is_available():
        disable_cpu_shm_comm()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               timeout=timedelta(minutes=timeout_minutes))


def initialize_groups(tp: int, pp: int,
                      timeout_minutes: int = ParallelConfig.timeout_minutes, cp: int = 1) -> None:
    """(Re)create the TP/CP/PP/DP groups; collective over the whole world."""
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
        destroy_subgroups()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 context_parallel_size=cp,
                                 distributed_timeout_minutes=timeout_minutes)


def destroy_subgroups() -> None:
    """Destroy every process group but the world: megatron's (destroy_model_parallel only
    forgets them) and those an earlier engine made (ZeRO's, the pipeline grid's). A gloo group
    keeps three threads alive until destroyed (17 groups a megatron layout on 2 ranks), so a
    process that builds layout after layout, as the layout tests' workers do, otherwise gathers
    thousands of threads and slows to a crawl. Collective over the whole world, like creating
    them."""
    world = dist.group.WORLD
    for group in live_process_groups():
        if group is not world:
            dist.destroy_process_group(group)


def tp_group():
    return ps.get_tensor_model_parallel_group()


def tp_rank() -> int:
    return ps.get_tensor_model_parallel_rank()


def tp_size() -> int:
    return ps.get_tensor_model_parallel_world_size()


def pp_rank() -> int:
    """This rank's pipeline stage (0 without pipeline parallelism)."""
    return ps.get_pipeline_model_parallel_rank()


def cp_group():
    return ps.get_context_parallel_group()


def cp_rank() -> int:
    return ps.get_context_parallel_rank()


def cp_size() -> int:
    return ps.get_context_parallel_world_size()


def grad_replica_group():
    """The ranks that average their gradients: data-parallel x context-parallel."""
    return ps.get_data_parallel_group(with_context_parallel=True)


def sampler_rank() -> int:
    """This rank's share of the samples: its data-parallel rank without CP."""
    return ps.get_data_parallel_rank()


class DeepSpeedMPU:
    """The `mpu` DeepSpeed's engine reads (no pipeline): DP groups for gradient reduction and
    ZeRO partitioning, the model-parallel group for the grad norm and checkpoint file names.

    Deliberately no `initialize_sequence_parallel`: DeepSpeed takes its presence as a sequence-
    parallel mpu and then ignores the model-parallel group, which trains without error and
    gives wrong losses under TP.
    """

    # DeepSpeed's data parallelism is gradient averaging and ZeRO partitioning: over DP x CP
    get_data_parallel_group = staticmethod(grad_replica_group)

    @staticmethod
    def get_data_parallel_rank() -> int:
        return ps.get_data_parallel_rank(with_context_parallel=True)

    @staticmethod
    def get_data_parallel_world_size() -> int:
        return ps.get_data_parallel_world_size(with_context_parallel=True)

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
        return dist.get_process_group_ranks(grad_replica_group())
