"""Precision on the GPU path, decided without a GPU: the gradient dtypes handed to DeepSpeed, and
the training loop's verdict on a skipped step (an fp16 loss-scale back-off is not a non-finite
step), checked on the real Trainer around a scripted engine in a one-rank gloo group.
tests/dist/test_precision.py runs the same paths through DeepSpeed itself."""
import math

import pytest
import torch
import torch.distributed as dist

from magneto_dist.config import ConfigError, load_config, validate
from magneto_dist.dims import ParallelDims
from magneto_dist.errors import ExitCode
from magneto_dist.training.engine import deepspeed_config
from magneto_dist.training.loop import (APPLIED, LOSS_SCALE_SKIP, NONFINITE, Trainer,
                                        TrainState, step_outcome)
from magneto_dist.training.metrics import MetricsLogger
from magneto_dist.training.metrics_file import read_metrics

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("precision,dtype", [("fp32", "fp32"), ("bf16", "fp32"),
                                             ("fp16", "fp16")])
def test_gradients_accumulate_and_reduce_in_fp32_under_bf16(precision, dtype):
    """DeepSpeed's default for a bf16 model accumulated micro-batch gradients and all-reduced
    them in bf16; the project now asks for fp32 for both."""
    cfg = load_config(None, [f"train.precision={precision}"])
    merged = deepspeed_config(cfg, ParallelDims.of(cfg, 2))
    assert merged["data_types"] == {"grad_accum_dtype": dtype}
    assert merged["communication_data_type"] == dtype
    for key in ("deepspeed.communication_data_type=bf16",
                "deepspeed.data_types.grad_accum_dtype=bf16"):
        bad = load_config(None, [key])
        with pytest.raises(ConfigError, match=rf"^{key.split('=')[0]} is set by the project from "
                                              r"train.precision; set that instead"):
            deepspeed_config(bad, ParallelDims.of(bad, 1))


def test_bf16_without_zero_is_refused_with_the_stage_that_works():
    """DeepSpeed has no fp32 gradient accumulation for a bf16 model without ZeRO
    (runtime/engine.py: NotImplementedError 'unsupported mix of model_dtype and
    grad_accum_dtype', from inside deepspeed.initialize)."""
    cfg = load_config(None, ["train.precision=bf16", "train.zero_stage=0"])
    with pytest.raises(ConfigError, match=r"train.precision='bf16' with train.zero_stage=0: .*"
                                          r"use train.zero_stage=1"):
        validate(cfg, 1)


@pytest.mark.parametrize("loss,norm,applied,fp16,outcome", [
    (2.5, 0.8, True, False, APPLIED),
    (2.5, 0.8, True, True, APPLIED),
    (2.5, INF, False, True, LOSS_SCALE_SKIP),   # DeepSpeed's scaler: overflow at this scale
    (NAN, INF, False, True, NONFINITE),         # the loss itself: every precision
    (INF, None, False, False, NONFINITE),
    (2.5, INF, False, False, NONFINITE),        # no loss scaling: the gradients themselves
    (2.5, NAN, False, False, NONFINITE),
])
def test_step_outcome(loss, norm, applied, fp16, outcome):
    assert step_outcome(loss, norm, applied, fp16) == outcome


class ScriptedEngine:
    """What the Trainer reads from a DeepSpeed engine, each step's values from a script:
    (loss, grad norm, whether the update was applied). A skipped step holds the LR, as
    DeepSpeed's engine does (_take_model_step)."""

    device = torch.device("cpu")
    module = None

    def __init__(self, script):
        self.script, self.current, self.lr = list(script), None, 1.0

    def run_step(self):
        self.current = self.script.pop(0)
        if self.current[2]:
            self.lr *= 0.5
        return torch.tensor(self.current[0])

    def get_global_grad_norm(self):
        return self.current[1]

    def was_step_applied(self):
        return self.current[2]

    def get_lr(self):
        return [self.lr]

    def train(self):
        pass

    def eval(self):
        pass


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def scripted_trainer(tmp_path, script, overrides, clock):
    from types import SimpleNamespace

    cfg = load_config(None, ["train.log_interval=1", *overrides])
    engine = ScriptedEngine(script)

    def train_step(batches):
        clock.now += 1.0  # each optimizer step takes one second
        return engine.run_step()
    par = SimpleNamespace(dims=ParallelDims.of(cfg, 1), dp_rank=0, dp_group=None, tp_rng=None,
                          compile_note=None, local_batch=lambda batch: batch)
    setup = SimpleNamespace(engine=engine, par=par, train_step_fn=train_step,
                            eval_fn=lambda batches, n: torch.tensor(3.0))
    metrics = MetricsLogger(str(tmp_path), True, False, 6 * 1000, 1, None)
    logged = []
    trainer = Trainer(cfg, None, setup, [], None, metrics, str(tmp_path / "ckpt"), TrainState(),
                      lambda s: {}, log=logged.append)
    return trainer, logged


def run_steps(trainer, n):
    trainer.start()
    return [trainer.step(iter(())) for _ in range(n)]


def test_fp16_loss_scale_skips_in_a_row_do_not_stop_the_run(tmp_path, one_rank_group,
                                                            monkeypatch):
    """Four loss-scale skips in a row (initial scale 2^16 backing off) with a finite loss: the
    run went on, the skips counted in the metrics rows; before, the third ended it with exit
    4, which the launcher never retries."""
    clock = Clock()
    monkeypatch.setattr("magneto_dist.training.loop.time.perf_counter", clock)
    script = [(5.0, INF, False)] * 4 + [(4.9, 1.2, True), (4.8, 1.1, True)]
    trainer, logged = scripted_trainer(tmp_path, script, ["train.precision=fp16"], clock)
    assert run_steps(trainer, 6) == [None] * 6, logged
    assert trainer.state.nonfinite_streak == 0 and not logged
    rows = read_metrics(str(tmp_path), "train")
    assert [r["skipped_steps"] for r in rows] == [1, 1, 1, 1, 0, 0]
    assert [r["lr"] for r in rows] == [1.0, 1.0, 1.0, 1.0, 0.5, 0.25]  # held while skipping


@pytest.mark.parametrize("precision,script", [
    ("fp16", [(NAN, INF, False)] * 3),   # a NaN loss is non-finite under loss scaling too
    ("bf16", [(5.0, INF, False)] * 3),   # no loss scaler: an infinite gradient is the model's
])
def test_non_finite_steps_still_stop_the_run(tmp_path, one_rank_group, monkeypatch, precision,
                                             script):
    clock = Clock()
    monkeypatch.setattr("magneto_dist.training.loop.time.perf_counter", clock)
    trainer, logged = scripted_trainer(tmp_path, [(5.0, 1.0, True)] + script,
                                       [f"train.precision={precision}"], clock)
    assert run_steps(trainer, 4) == [None, None, None, ExitCode.NONFINITE]
    assert any("update skipped (3 of train.max_nonfinite_steps=3 in a row)" in line
               for line in logged), logged


def test_tokens_per_second_counts_only_the_steps(tmp_path, one_rank_group, monkeypatch):
    """Evaluation (50 s) and a save (100 s) at step 2 stay out of the next interval's time:
    every row is one step's tokens over one second."""
    clock = Clock()
    monkeypatch.setattr("magneto_dist.training.loop.time.perf_counter", clock)
    trainer, _ = scripted_trainer(tmp_path, [(5.0, 1.0, True)] * 4,
                                  ["train.eval_interval=2", "checkpoint.save_interval=2"], clock)

    def slow(seconds, name):
        def work():
            clock.now += seconds
            trainer.log(name)
        return work
    trainer.validate, trainer.save = slow(50.0, "validated"), slow(100.0, "saved")
    run_steps(trainer, 4)
    tokens = trainer.cfg.train.global_batch_size * trainer.cfg.model.max_seq_len
    rows = read_metrics(str(tmp_path), "train")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isclose(r["tokens_per_s"], tokens) for r in rows), rows
    assert clock.now == 4 + 2 * 150  # the evaluations and saves did run
