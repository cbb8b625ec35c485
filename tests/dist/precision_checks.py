"""DeepSpeed's fp16 loss scaler through the real trainer, inside layout_worker.py's rank group.

DeepSpeed refuses fp16 on a CPU without mkldnn's fp16 kernels (engine.py _do_sanity_check, its
CPU accelerator's is_fp16_supported); its fp16 ZeRO optimizer itself runs on CPU tensors, so
this check lifts that one refusal for a tiny model and watches DeepSpeed's own loss scaler: an
initial scale of 2^24 overflows fp16 for the first steps (each skipped, the scale halved), the
way 2^16 does at the start of a real fp16 run.
"""
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from magneto_dist.dims import ParallelDims
from magneto_dist.model import InitWeights, model_skeleton
from magneto_dist.resilience.faults import FaultSpec, InjectedFaults
from magneto_dist.training.engine import build_training
from magneto_dist.training.loop import Trainer, TrainState
from magneto_dist.training.metrics import MetricsLogger
from magneto_dist.training.tasks import GPTTask


def fp16_loss_scale(case: dict, case_config, synthetic_dataset) -> dict:
    """Steps of an fp16 run with a NaN loss injected from step case["nan_from"] on: per step
    the trainer's verdict (None or the exit code), the loss, the LR after it, whether
    DeepSpeed applied it and its loss scale."""
    accelerator = get_accelerator()
    accelerator.is_fp16_supported = lambda: True
    cfg = case_config({**case, "precision": "fp16",
                       "deepspeed": ["fp16.initial_scale_power=20"]})
    dims = ParallelDims.of(cfg, dist.get_world_size())
    task = GPTTask(cfg.model.vocab_size, tensor_parallel=False)
    skeleton = model_skeleton(cfg.model)
    setup = build_training(skeleton, cfg, dims, task,
                           InitWeights(skeleton, cfg.model, cfg.train.seed))
    data = synthetic_dataset(cfg.model.arch, case["steps"] * cfg.train.global_batch_size)
    faults = InjectedFaults([FaultSpec.parse(f"nonfinite_loss:0:{case['nan_from']}-")])
    logged = []
    trainer = Trainer(cfg, task, setup, data, None, MetricsLogger("", False, False, 0, 1, None),
                      "", TrainState(), lambda s: {}, log=logged.append, faults=faults)
    batches = trainer.loader(data, len(data), 0)
    trainer.start()
    steps = []
    for _ in range(case["steps"]):
        verdict = trainer.step(batches)
        engine = setup.engine
        steps.append({"verdict": None if verdict is None else int(verdict),
                      "applied": engine.was_step_applied(), "lr": engine.get_lr()[0],
                      "scale": float(engine.optimizer.loss_scale),
                      "streak": trainer.state.nonfinite_streak})
        if verdict is not None:
            break
    del accelerator.is_fp16_supported  # the class's own method again
    return {"steps": steps, "logged": logged}
