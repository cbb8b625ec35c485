"""Run on N ranks (tests/dist/ranks.py starts it): train each case of a JSON case list for a few
steps through the production path (build_training + Trainer.train_step) on a fixed synthetic
global batch sequence, and have rank 0 write {case name: result} to the output file.

    python tests/dist/layout_worker.py CASES.json OUT.json

A training case: {"name", "tp", "pp", "cp", "zero", "model": {ModelConfig overrides}, "steps",
"recompute", "sp" (parallel.sequence_parallel), "partition", "precision", "compile",
"deepspeed": [key=value of the deepspeed: section], "train": [key=value of the train: section],
"documents": packed documents (eod tokens in the data, document masking, positions restarting,
no loss on eod inputs)} -> [loss per step]; with "compile": {"losses", "note": the start-up note,
"compile_seconds": spent compiling this case}. A case with "check" runs one of
block_checks.py instead.
Starting ranks costs seconds, so one group of ranks goes through many cases.
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from magneto_dist.compat.dynamo import compile_seconds
from magneto_dist.config import load_config
from magneto_dist.model import InitWeights, model_skeleton
from magneto_dist.parallel import state
from magneto_dist.dims import ParallelDims
from magneto_dist.training.engine import build_training
from magneto_dist.training.loop import Trainer, TrainState
from magneto_dist.training.metrics import MetricsLogger
from magneto_dist.training.tasks import GPTTask, MaskedLMTask

VOCAB, SEQ, GLOBAL_BATCH, MICRO_BATCH = 250, 16, 8, 2
EOD = 3  # the end-of-document token of "documents" cases
BASE_MODEL = dict(num_layers=4, hidden_size=32, num_heads=4, ffn_hidden_size=64,
                  vocab_size=VOCAB, max_seq_len=SEQ)


def packed_positions(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Positions restarting after each eod token (megatron-core's reset_position_ids)."""
    positions, start = torch.empty_like(tokens), 0
    for i, token in enumerate(tokens.tolist()):
        positions[i] = i - start
        if token == eod:
            start = i + 1
    return positions


def synthetic_dataset(arch: str, samples: int, documents: bool = False):
    """Deterministic samples in the shape megatron-core's GPT / BERT datasets produce; with
    documents, 2-4 end-of-document tokens per sample, the loss masked on them and positions
    restarting after them (GPTDataset's eod_mask_loss and reset_position_ids)."""
    g = torch.Generator().manual_seed(99)
    data = []
    for _ in range(samples):
        tokens = torch.randint(0, VOCAB, (SEQ + 1,), generator=g)
        if documents:  # eod only where placed
            tokens[tokens == EOD] = EOD + 1
            ends = int(torch.randint(2, 5, (1,), generator=g))
            tokens[torch.randperm(SEQ, generator=g)[:ends]] = EOD
        if arch == "decoder":
            sample = {"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": torch.ones(SEQ),
                      "position_ids": torch.arange(SEQ)}
            if documents:
                sample["loss_mask"] = (tokens[:-1] != EOD).float()
                sample["position_ids"] = packed_positions(tokens[:-1], EOD)
            data.append(sample)
        else:
            masked = torch.rand(SEQ, generator=g) < 0.3
            padding = torch.ones(SEQ, dtype=torch.long)
            padding[SEQ - int(torch.randint(0, 4, (1,), generator=g)):] = 0
            data.append({"text": tokens[:-1], "labels": torch.where(masked, tokens[1:], -1),
                         "loss_mask": (masked & padding.bool()).long(), "padding_mask": padding})
    return data


def case_config(case):
    model = {**BASE_MODEL, **case.get("model", {})}
    overrides = [f"model.{k}={v}" for k, v in model.items()]
    documents = case.get("documents", False)
    overrides += [f"data.{key}={documents}"
                  for key in ("reset_attention_mask", "reset_position_ids", "eod_mask_loss")]
    overrides += [f"parallel.tensor_model_parallel_size={case['tp']}",
                  f"parallel.context_parallel_size={case.get('cp', 1)}",
                  f"parallel.pipeline_model_parallel_size={case['pp']}",
                  f"parallel.activation_checkpointing={case.get('recompute', False)}",
                  f"parallel.sequence_parallel={case.get('sp', False)}",
                  f"parallel.pipeline_partition={case.get('partition', 'parameters')}",
                  f"train.zero_stage={case['zero']}", f"train.micro_batch_size={MICRO_BATCH}",
                  f"train.precision={case.get('precision', 'fp32')}",
                  f"train.compile={case.get('compile', 'off')}",
                  f"train.global_batch_size={GLOBAL_BATCH}", "train.lr=3e-3",
                  "train.warmup_iters=1", f"train.train_iters={case['steps']}",
                  "train.grad_clip=0.5", "train.seed=7"]  # clipping active: tests the TP norm
    overrides += [f"train.{setting}" for setting in case.get("train", [])]
    overrides += [f"deepspeed.{setting}" for setting in case.get("deepspeed", [])]
    return load_config(None, overrides)


def train_case(case):
    cfg = case_config(case)
    compiled = cfg.train.compile != "off"
    if compiled:
        torch.compiler.reset()  # this case compiles its own blocks, reusing no earlier case's
        before = compile_seconds()
    dims = ParallelDims.of(cfg, dist.get_world_size())
    task = (GPTTask if cfg.model.arch == "decoder" else MaskedLMTask).for_run(cfg, dims, VOCAB,
                                                                              EOD)
    torch.manual_seed(cfg.train.seed)
    skeleton = model_skeleton(cfg.model)  # the production path: each rank builds its shard only
    setup = build_training(skeleton, cfg, dims, task,
                           InitWeights(skeleton, cfg.model, cfg.train.seed))
    data = synthetic_dataset(cfg.model.arch, case["steps"] * GLOBAL_BATCH,
                             case.get("documents", False))
    trainer = Trainer(cfg, task, setup, data, None, MetricsLogger("", False, False, 0, 1, None),
                      "", TrainState(), lambda s: {})
    batches = trainer.loader(data, len(data), 0)
    losses = [trainer.train_step(batches) for _ in range(case["steps"])]
    if not compiled:
        return losses
    return {"losses": losses, "note": setup.par.compile_note,
            "compile_seconds": compile_seconds() - before}


def main():
    cases_path, out_path = sys.argv[1:3]
    state.init_distributed()
    from block_checks import run_check  # beside this file
    from memory_checks import memory_versus_plan
    from precision_checks import fp16_loss_scale
    with open(cases_path) as f:
        cases = json.load(f)
    results = {}
    for case in cases:
        start = time.perf_counter()
        if case.get("check") == "memory_plan":
            results[case["name"]] = memory_versus_plan(case, case_config, synthetic_dataset)
        elif case.get("check") == "fp16_loss_scale":
            results[case["name"]] = fp16_loss_scale(case, case_config, synthetic_dataset)
        else:
            results[case["name"]] = run_check(case) if "check" in case else train_case(case)
        if dist.get_rank() == 0:
            print(f"{case['name']} ({time.perf_counter() - start:.1f} s): "
                  f"{results[case['name']]}", flush=True)
    if dist.get_rank() == 0:
        with open(out_path + ".tmp", "w") as f:
            json.dump(results, f)
        os.replace(out_path + ".tmp", out_path)
    dist.barrier()


if __name__ == "__main__":
    main()
