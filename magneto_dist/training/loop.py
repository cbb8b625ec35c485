"""The training loop: micro-batches through the DeepSpeed engine, metrics, eval, checkpoints,
a graceful stop on SIGTERM / Ctrl-C / the launcher's exit, and a stop on a run of non-finite
steps."""
from __future__ import annotations

import math
import signal
import time
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..checkpoint.savers import make_saver
from ..config import Config
from ..data.datasets import GlobalSampleBatches
from ..errors import ExitCode
from ..resilience.faults import LOSS_SPIKE_SCALE, NO_FAULTS, Faults
from ..resilience.parent_watch import Launchers, watch_launchers
from ..resilience.watchdog import StepWatchdog
from .diagnostics import Diagnostics
from .healing import ROLLED_BACK, make_healer
from .metrics import MetricsLogger
from .profiling import profile_window
from .stragglers import straggler_check
from .rollback import Batches
from .tasks import move_batch
from .train_state import TrainState

TP_RNG_KEY = "tensor_parallel"  # the TP dropout stream's entry in a rank's saved RNG state


class StopRequest:
    """SIGTERM, the first Ctrl-C or the exit of one of `launchers` asks to stop after the
    current step; a second Ctrl-C aborts."""

    def __init__(self, launchers: Launchers):
        self.requested = False
        self.signal_name = None
        self.launchers = launchers

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        watch_launchers(self.launchers, self.request)

    def request(self, reason: str) -> None:
        self.requested = True
        self.signal_name = self.signal_name or reason

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.request(signal.Signals(signum).name)


def rank_max(device: torch.device, *values: float) -> List[float]:
    """Collective: each value's maximum over the ranks (one all-reduce for all)."""
    gathered = torch.tensor([float(v) for v in values], device=device)
    dist.all_reduce(gathered, op=dist.ReduceOp.MAX)
    return gathered.tolist()


# What became of an optimizer step (step_outcome).
APPLIED = "applied"
LOSS_SCALE_SKIP = "loss-scale skip"  # fp16: the loss scaler skipped it and lowered the scale
NONFINITE = "non-finite"             # skipped for a non-finite loss or gradient


def step_outcome(loss: float, grad_norm: Optional[float], applied: bool,
                 loss_scaled: bool) -> str:
    """APPLIED, LOSS_SCALE_SKIP or NONFINITE. Under fp16 (`loss_scaled`) DeepSpeed's dynamic
    loss scaler skips a step whose scaled gradients overflowed fp16 and reports an infinite
    grad norm (zero/stage_1_and_2.py), then lowers the scale: the ordinary start of an fp16 run
    (initial scale 2^16, hysteresis 2) and a routine event later, not a sick model, as long as
    the loss itself is finite. A non-finite loss is NONFINITE in every precision, and so is a
    non-finite gradient without loss scaling."""
    if not math.isfinite(loss):
        return NONFINITE
    if loss_scaled and not applied:
        return LOSS_SCALE_SKIP
    if grad_norm is not None and not math.isfinite(grad_norm):
        return NONFINITE
    return APPLIED


def dp_mean(value: torch.Tensor, group) -> float:
    value = value.detach().float().clone()  # stays on its device: NCCL reduces CUDA tensors
    dist.all_reduce(value, group=group)
    return value.item() / dist.get_world_size(group)


class Trainer:
    def __init__(self, cfg: Config, task, setup, train_ds, valid_ds, metrics: MetricsLogger,
                 ckpt_dir: str, state: TrainState, client_state_fn: Callable[[TrainState], dict],
                 log=print, faults: Faults = NO_FAULTS, launchers: Launchers = ()):
        """setup: a training/engine.py TrainingSetup (the engine, the parallelized model's DP
        rank/size/group, and the pipeline's own train/eval steps when there is one). faults:
        the fault points' hook (tests; NO_FAULTS in production). launchers: those above this
        process (parent_watch.launcher_chain), watched while training; () watches none."""
        par = setup.par
        self.cfg, self.task, self.engine = cfg, task, setup.engine
        self.train_ds, self.valid_ds = train_ds, valid_ds
        self.dims, self.dp_rank, self.dp_group = par.dims, par.dp_rank, par.dp_group
        self.local_batch = par.local_batch  # this rank's chunks of each sequence under CP
        self.metrics, self.ckpt_dir, self.state = metrics, ckpt_dir, state
        self.client_state_fn = client_state_fn
        self.tp_rng = par.tp_rng
        self.compile_note = par.compile_note  # train.compile=blocks: what compiles, or why not
        self.log, self.faults = log, faults
        self.device = self.engine.device
        self.rank = dist.get_rank()
        self.stop = StopRequest(launchers)
        # the pipeline engine replaces the micro-batch loops with its own schedule
        self.train_step_fn = setup.train_step_fn or self._micro_batch_step
        self.eval_fn = setup.eval_fn or self._micro_batch_eval
        self.diagnostics = self._make_diagnostics()
        self.watchdog: Optional[StepWatchdog] = None  # while train() runs
        self.saver = make_saver(self.engine, ckpt_dir, cfg, self.dims, faults=faults, log=log,
                                report=metrics.checkpoint, keepalive=self._keepalive)
        self.saved_at: Optional[int] = None  # the step of this process's newest save
        self.started_steps = False           # whether a step ran (the start-up time is logged)
        self.interval_start = time.perf_counter()  # this metrics interval: its start, its steps
        self.interval_steps = 0                    # and its skipped steps (not applied)
        self.interval_skipped = 0
        g = cfg.logging  # the straggler check times each step's sections; the profile window
        self.stragglers = straggler_check(g.straggler_interval, g.straggler_margin, self.device,
                                          metrics, self.dims.pp)
        self.profile = profile_window(g, g.run_dir, self.rank, log)
        self.batches: Optional[Batches] = None     # the training data, while train() runs
        self.local_loss: Optional[torch.Tensor] = None  # this rank's loss of the last step
        self.healer = make_healer(self)  # train.spike_policy, replica_check_interval

    def _make_diagnostics(self) -> Optional[Diagnostics]:
        if not self.cfg.logging.diagnostics_interval or self.rank != 0:
            return None
        # a fixed probe batch: the first micro-batch of the training data
        probe = torch.utils.data.default_collate(
            [self.train_ds[i] for i in range(self.cfg.train.micro_batch_size)])
        return Diagnostics(self.engine.module, self.task,
                           self.task.prepare(move_batch(probe, self.device)))

    def loader(self, dataset, total: int, start: int):
        """Micro-batches of this DP rank for global samples [start, total)."""
        t = self.cfg.train
        sampler = GlobalSampleBatches(total, start, t.micro_batch_size, self.dp_rank,
                                      self.dims.dp)
        # A generator of its own: an iterator draws its base seed from the loader's generator,
        # which by default is the global one that dropout uses, so creating a loader after a
        # resume (or for each evaluation) shifted every later dropout mask.
        return iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                                num_workers=self.cfg.data.loader_workers,
                                                generator=torch.Generator().manual_seed(t.seed)))

    def _loss(self, batch) -> torch.Tensor:
        batch = self.local_batch(self.task.prepare(move_batch(batch, self.device)))
        return self.task.loss(self.task.forward(self.engine, batch), batch)

    def _micro_batch_step(self, batches) -> torch.Tensor:
        # The losses are summed in place and each micro-batch's loss is dropped before the
        # next forward: keeping them in a list (with the last one still bound) measured ~3%
        # slower per step on the default run (tools/bench_train.py, CPU).
        total = torch.zeros((), device=self.device)
        # loss_spike: a bad batch, the one of this data position (the fault point's steps)
        batch_index = self.state.consumed_samples // self.cfg.train.global_batch_size + 1
        spike = self.faults.active("loss_spike", self.rank, batch_index)
        for _ in range(self.dims.grad_accum):
            batch = next(batches)
            self.stragglers.lap("data")
            loss = self._loss(batch)
            if self.faults.active("nonfinite_loss", self.rank, self.state.step + 1):
                loss = loss * float("nan")
            if spike:
                loss = loss * LOSS_SPIKE_SCALE
            self.stragglers.lap("forward")
            self.engine.backward(loss)
            self.stragglers.lap("backward")
            self.engine.step()
            self.stragglers.lap("optimizer")
            total += loss.detach()
            del loss
        return total / self.dims.grad_accum

    @torch.no_grad()
    def _micro_batch_eval(self, batches, global_batches: int) -> torch.Tensor:
        return torch.stack([self._loss(batch) for batch in batches]).mean()

    def train_step(self, batches) -> float:
        """One optimizer step over a global batch; the loss averaged over it (all DP ranks)."""
        self.local_loss = self.train_step_fn(batches)
        self.stragglers.lap("pipeline")  # the pipeline's schedule (the micro-batch loop lapped)
        mean = dp_mean(self.local_loss, self.dp_group)
        self.stragglers.lap("wait")
        return mean

    def evaluate(self) -> Optional[float]:
        """Validation loss over the first eval_iters global batches of the validation split."""
        t = self.cfg.train
        if self.valid_ds is None or len(self.valid_ds) < t.global_batch_size:
            return None
        global_batches = min(len(self.valid_ds) // t.global_batch_size, t.eval_iters)
        self.engine.eval()
        loss = self.eval_fn(self.loader(self.valid_ds, global_batches * t.global_batch_size, 0),
                            global_batches)
        self.engine.train()
        return dp_mean(loss, self.dp_group)

    def check_finite(self, loss: float, grad_norm: Optional[float]) -> bool:
        """Count a step whose loss or grad norm is non-finite (its update was skipped, see
        training/engine.py); False once train.max_nonfinite_steps of them came in a row. An
        fp16 loss-scale skip is counted in the metrics row, not here, and does not end a
        streak either. Every input is global (all-reduced or agreed by the engine), so every
        rank decides alike."""
        outcome = step_outcome(loss, grad_norm, self.engine.was_step_applied(),
                               self.cfg.train.precision == "fp16")
        if outcome == LOSS_SCALE_SKIP:
            self.interval_skipped += 1
            return True
        if outcome == APPLIED:
            self.state.nonfinite_streak = 0
            return True
        self.interval_skipped += 1
        self.state.nonfinite_streak += 1
        limit = self.cfg.train.max_nonfinite_steps
        self.log(f"WARNING: step {self.state.step}: loss {loss}, grad norm {grad_norm}: update "
                 f"skipped ({self.state.nonfinite_streak} of train.max_nonfinite_steps={limit} "
                 "in a row)")
        return self.state.nonfinite_streak < limit

    def save(self) -> None:
        """Collective: the checkpoint of this step (checkpoint.async_save: begun; it completes
        at a later step's agree(), or at flush_saves())."""
        extra_rng = {TP_RNG_KEY: self.tp_rng.state} if self.tp_rng is not None else None
        self.saver.save(self.state.step, self.client_state_fn(self.state), extra_rng)
        self.saved_at = self.state.step

    def _keepalive(self) -> None:
        """Waiting for a background checkpoint write that progresses is not a hang."""
        if self.watchdog is not None:
            self.watchdog.renew()

    def restore_tp_rng(self, saved_rng: Optional[dict]) -> None:
        """The TP dropout stream where the checkpoint left it (exact resume with dropout)."""
        if self.tp_rng is not None and saved_rng and TP_RNG_KEY in saved_rng:
            self.tp_rng.state = saved_rng[TP_RNG_KEY]

    def _evaluates(self, step: int) -> bool:
        t = self.cfg.train
        return bool(t.eval_interval and (step % t.eval_interval == 0 or step == t.train_iters))

    def _saves(self, step: int) -> bool:
        interval = self.cfg.checkpoint.save_interval
        return bool(interval and step % interval == 0)

    def _long_step(self, step: int) -> bool:
        """Whether `step` evaluates or saves: the step watchdog gives it the long allowance."""
        return self._evaluates(step) or self._saves(step) or step == self.cfg.train.last_step

    def train(self) -> ExitCode:
        """Run to train.last_step; returns the process exit code."""
        t = self.cfg.train
        batches = self.batches = Batches(lambda total, start: self.loader(self.train_ds, total,
                                                                          start),
                                         t.train_iters, t.global_batch_size, self.state)
        self.stop.install()
        # a no-op unless launch/ft_launch.py enabled it
        watchdog = self.watchdog = StepWatchdog.from_env()
        self.start()
        while self.state.step < t.last_step:
            # the profile window outside the watchdog: writing a trace is not a hung step
            with self.profile.step(self.state.step + 1), \
                    watchdog.expires(long=self._long_step(self.state.step + 1)):
                stop = self.step(batches)
            if stop in (ExitCode.NONFINITE, ExitCode.SPIKES, ExitCode.HARDWARE):
                with watchdog.expires(long=True):
                    self.saver.flush(self.state.step)  # an earlier save still writing
                return stop
            if stop == ExitCode.INTERRUPTED:
                with watchdog.expires(long=True):
                    self.save_unless_saved()
                self.log(f"stopped by {self.stop.signal_name or 'a signal on another rank'} at "
                         f"step {self.state.step}; rerun the same command to resume")
                return stop
        with watchdog.expires(long=True):
            self.save_unless_saved()
        return ExitCode.OK

    def save_unless_saved(self) -> None:
        """Collective, on the way out: this step's checkpoint, complete on disk."""
        if self.saved_at != self.state.step:
            self.save()
        self.saver.flush(self.state.step)

    def start(self) -> None:
        """Before the first step: train mode, step-0 diagnostics, the first metrics interval."""
        self.engine.train()
        if self.compile_note:
            self.log(self.compile_note)
        self.untimed(self.diagnose)  # at step 0: the gradients at init and F(x, theta_0)
        if self.healer:
            self.healer.start()
        self.restart_interval()

    def restart_interval(self) -> None:
        """A new metrics interval from now (at the start, and after a rollback)."""
        self.interval_start, self.interval_steps = time.perf_counter(), 0
        self.interval_skipped = 0

    def step(self, batches) -> Optional[ExitCode]:
        """One optimizer step as the run takes it, in this order: the fault points (and the
        healer's: a due data skip, a replica check), the step, the non-finite check, the spike
        verdict, metrics, diagnostics, evaluation, the periodic save, the agreed stop (and the
        completion of a background save, and the spike policy's action). Returns NONFINITE,
        SPIKES, HARDWARE or INTERRUPTED (not yet saved) to stop with, else None."""
        self.stragglers.begin_step()
        for point in ("kill_at_step", "hang", "slow_step"):
            self.faults.inject(point, self.rank, self.state.step + 1)
        early = self.healer.before_step() if self.healer else None
        if early is not None:  # rolled back before the step, or stopped
            return None if early == ROLLED_BACK else early
        loss, grad_norm = self.optimizer_step(batches)
        if not self.check_finite(loss, grad_norm):
            return self.stop_nonfinite()
        # a spike to roll back: this step's state is not saved
        discard = self.healer.after_step(loss, grad_norm) if self.healer else False
        self.log_train(loss, grad_norm)
        self.untimed(self.diagnose)
        if self._evaluates(self.state.step):
            self.untimed(self.validate)
        # no periodic save inside a run of skipped steps: keep_last must not prune good ones
        if self._saves(self.state.step) and not self.state.nonfinite_streak and not discard:
            self.untimed(self.save)
        return self.agree()

    def agree(self) -> Optional[ExitCode]:
        """Collective, one all-reduce at the end of every step: whether any rank was asked to
        stop (all stop at the same step), whether any is still writing a background
        checkpoint (once none is, every rank finalizes it here, at the same step), and under
        train.spike_policy=rollback what the step's spike verdict asks for (done here, after
        the step's timings end). Every logging.straggler_interval steps the straggler check
        gathers the steps' timings too."""
        self.stragglers.lap("logging")
        stop, writing, *healing = rank_max(self.device, self.stop.requested, self.saver.busy(),
                                           *(self.healer.flags() if self.healer else ()))
        self.stragglers.lap("wait")
        if self.saver.pending() and not writing:
            self.untimed(lambda: self.saver.finalize(self.state.step))
        self.stragglers.end_step(self.state.step)  # collective every straggler_interval steps
        code = self.healer.act(healing) if self.healer else None
        return code or (ExitCode.INTERRUPTED if stop else None)

    def optimizer_step(self, batches) -> Tuple[float, Optional[float]]:
        """The step itself; -> (loss, grad norm), both global."""
        loss = self.train_step(batches)
        if not self.started_steps:
            self.metrics.started(self.state.step + 1, self.compile_seconds())
            self.started_steps = True
        self.state.step += 1
        self.state.consumed_samples += self.cfg.train.global_batch_size
        self.interval_steps += 1
        norm = self.engine.get_global_grad_norm()
        return loss, (float(norm) if norm is not None else None)

    def compile_seconds(self) -> Optional[float]:
        """Seconds this process spent compiling blocks so far (None: train.compile=off)."""
        if self.cfg.train.compile == "off":
            return None
        from ..compat.dynamo import compile_seconds
        return compile_seconds()

    def stop_nonfinite(self) -> ExitCode:
        first = self.state.step - self.state.nonfinite_streak + 1
        self.log(f"stopped: steps {first}-{self.state.step} all had a non-finite loss or grad "
                 "norm; their updates were skipped and no checkpoint was written for them. "
                 "Check the data, lower train.lr or lengthen the warm-up, then rerun to resume "
                 "from the last checkpoint")
        return ExitCode.NONFINITE

    def log_train(self, loss: float, grad_norm: Optional[float]) -> None:
        """A metrics row every log_interval steps and at the last; tokens/s over the interval's
        step time only (evaluation, diagnostics and saves are not in it)."""
        t = self.cfg.train
        if self.state.step % t.log_interval and self.state.step != t.last_step:
            return
        seconds = time.perf_counter() - self.interval_start
        self.metrics.train(self.state.step, loss, self.engine.get_lr()[0], grad_norm,
                           t.global_batch_size * self.cfg.model.max_seq_len * self.interval_steps,
                           seconds, self.state.consumed_samples, self.interval_skipped)
        self.interval_start, self.interval_steps = time.perf_counter(), 0
        self.interval_skipped = 0

    def untimed(self, work: Callable[[], None]) -> None:
        """Run work that is not training (diagnostics, evaluation, saves) outside the metrics
        interval's time, so tokens/s measures the steps."""
        start = time.perf_counter()
        self.stragglers.pause()
        work()
        self.stragglers.resume()
        self.interval_start += time.perf_counter() - start

    def diagnose(self) -> None:
        interval = self.cfg.logging.diagnostics_interval
        if self.diagnostics is not None and self.state.step % interval == 0:
            self.metrics.diagnostics(self.diagnostics.measure(self.state.step))

    def validate(self) -> None:
        valid = self.evaluate()
        if valid is not None:
            self.metrics.valid(self.state.step, valid)
