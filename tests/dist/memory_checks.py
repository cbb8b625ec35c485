"""The memory planner (training/memory_plan.py) against what a rank really holds after one
optimizer step, inside layout_worker.py's rank group: parameter bytes (ZeRO-3's own partitions)
and optimizer-state bytes (the fp32 master partitions and Adam's moments in the optimizer
DeepSpeed steps), on the busiest rank."""
import torch
import torch.distributed as dist

from magneto_dist.model import InitWeights, model_skeleton
from magneto_dist.dims import ParallelDims
from magneto_dist.training.engine import build_training
from magneto_dist.training.loop import Trainer, TrainState
from magneto_dist.training.memory_plan import Layout, MemoryPlanner
from magneto_dist.training.metrics import MetricsLogger
from magneto_dist.training.tasks import GPTTask


def _bytes(tensors) -> int:
    return sum({id(t): t.numel() * t.element_size() for t in tensors}.values())


def measured(engine) -> dict:
    params = _bytes(getattr(p, "ds_tensor", p) for p in engine.module.parameters())
    zero = engine.optimizer
    # fp32 master partitions (ZeRO-1/2 and ZeRO-3 name them differently); one that is the
    # parameters' own partition (ZeRO-3 may step on it directly) is no extra memory
    masters = (getattr(zero, "single_partition_of_fp32_groups", None)
               or getattr(zero, "fp32_partitioned_groups_flat", []))
    weights = {t.untyped_storage().data_ptr() for t in getattr(zero, "fp16_partitioned_groups_flat",
                                                               [])}
    master = [t for t in masters if t.untyped_storage().data_ptr() not in weights]
    moments = [t for state in zero.optimizer.state.values() for t in state.values()
               if torch.is_tensor(t) and t.dim() > 0]  # Adam's step counts are scalars
    return {"parameters": params, "optimizer": _bytes(master) + _bytes(moments)}


def memory_versus_plan(case: dict, case_config, synthetic_dataset) -> dict:
    cfg = case_config(case)
    dims = ParallelDims.of(cfg, dist.get_world_size())
    task = GPTTask(cfg.model.vocab_size, tensor_parallel=dims.tp > 1)
    skeleton = model_skeleton(cfg.model)
    setup = build_training(skeleton, cfg, dims, task,
                           InitWeights(skeleton, cfg.model, cfg.train.seed))
    data = synthetic_dataset(cfg.model.arch, cfg.train.global_batch_size)
    trainer = Trainer(cfg, task, setup, data, None, MetricsLogger("", False, False, 0, 1, None),
                      "", TrainState(), lambda s: {})
    trainer.train_step(trainer.loader(data, len(data), 0))  # Adam's moments exist from here
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, measured(setup.engine))
    layout = Layout.of(cfg, dims)
    planned = MemoryPlanner(cfg.model, cfg.train.precision, cfg.model.max_seq_len).plan(layout)
    return {key: {"measured": max(r[key] for r in ranks), "planned": planned[key]}
            for key in ("parameters", "optimizer")}
