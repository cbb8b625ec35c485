"""Profile windows: logging.profile_steps=A-B runs torch.profiler over steps A to B on every
rank (CPU activities, and CUDA's on a GPU; operator shapes; Python stacks with
logging.profile_stacks) and writes one Chrome trace per rank, RUN_DIR/profile/rankNNNNN.pt.
trace.json: `tensorboard --logdir RUN_DIR/profile` shows them with the PyTorch profiler plugin
(torch-tb-profiler; the name is its worker.pt.trace.json), and https://ui.perfetto.dev opens
each. Each step is marked ProfilerStep#N with the run's own step number, as the plugin's step
views expect.

With logging.memory_snapshot (CUDA only, config.validate says so on CPU), the caching
allocator's history is recorded over the window too (compat.cuda_memory) and dumped at its end
to rankNNNNN.memory.pickle, and, on an out-of-memory error in the window, to
rankNNNNN.oom.memory.pickle, the file named in the error's traceback (https://pytorch.org/
memory_viz draws both).

Outside the window nothing is made: no profiler, no directory, no recording; a step outside it
costs one comparison. A trace is written to a temporary name and renamed, so a window that a
resumed run profiles again replaces the earlier trace only with a whole one.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

PROFILE_DIR = "profile"           # in the run directory
# allocator events the history keeps (torchtitan's figure): each with its stack, tens of MB
MEMORY_HISTORY_ENTRIES = 100_000


def trace_path(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, PROFILE_DIR, f"rank{rank:05d}.pt.trace.json")


def snapshot_path(run_dir: str, rank: int, oom: bool = False) -> str:
    kind = "oom.memory" if oom else "memory"
    return os.path.join(run_dir, PROFILE_DIR, f"rank{rank:05d}.{kind}.pickle")


class NoWindow:
    """logging.profile_steps unset."""

    def step(self, step: int):
        """A context around step `step` of the loop."""
        return contextlib.nullcontext()

    def close(self) -> None:
        """The run ends: a window it did not finish is written as far as it got."""


NO_WINDOW = NoWindow()


class ProfileWindow(NoWindow):
    def __init__(self, first: int, last: int, run_dir: str, rank: int, stacks: bool,
                 memory: bool, log=print):
        self.first, self.last, self.run_dir, self.rank = first, last, run_dir, rank
        self.stacks, self.memory, self.log = stacks, memory, log
        self.profiler: Optional[torch.profiler.profile] = None  # while the window is open
        self.started_at: Optional[int] = None
        self.last_seen: Optional[int] = None
        self.done = False

    def step(self, step: int):
        if self.done or not self.first <= step <= self.last:
            return contextlib.nullcontext()
        return self._profiled(step)

    @contextlib.contextmanager
    def _profiled(self, step: int):
        if self.profiler is None:
            self._start(step)
        self.last_seen = step
        try:
            with torch.profiler.record_function(f"ProfilerStep#{step}"):
                yield
        except torch.OutOfMemoryError as err:
            self._finish(out_of_memory=err)
            raise
        except BaseException:
            self._finish()
            raise
        if step == self.last:
            self._finish()

    def close(self) -> None:
        if self.profiler is not None:
            self._finish()

    def _start(self, step: int) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        os.makedirs(os.path.join(self.run_dir, PROFILE_DIR), exist_ok=True)
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=True,
                                               with_stack=self.stacks)
        if self.memory:
            from ..compat.cuda_memory import start_recording
            start_recording(MEMORY_HISTORY_ENTRIES)
        self.profiler.start()
        self.started_at = step

    def _finish(self, out_of_memory: Optional[BaseException] = None) -> None:
        """Stop, write this rank's trace (and snapshot), and say where they are."""
        self.profiler.stop()
        path = trace_path(self.run_dir, self.rank)
        tmp = f"{path}.tmp-{os.getpid()}"
        self.profiler.export_chrome_trace(tmp)
        os.replace(tmp, path)
        self.profiler, self.done = None, True
        steps = f"{self.started_at}-{self.last_seen}"
        if self.memory:
            self._snapshot(out_of_memory)
        self.log(f"profile of steps {steps}: a Chrome trace per rank in "
                 f"{os.path.join(self.run_dir, PROFILE_DIR)} (rank 0's: {os.path.basename(path)}); "
                 f"`tensorboard --logdir {os.path.join(self.run_dir, PROFILE_DIR)}` (PyTorch "
                 "profiler plugin) or https://ui.perfetto.dev" + (
                     "; memory snapshots: https://pytorch.org/memory_viz" if self.memory else ""))

    def _snapshot(self, out_of_memory: Optional[BaseException]) -> None:
        from ..compat.cuda_memory import dump_snapshot, stop_recording
        path = snapshot_path(self.run_dir, self.rank, oom=out_of_memory is not None)
        tmp = f"{path}.tmp-{os.getpid()}"
        dump_snapshot(tmp)
        os.replace(tmp, path)
        stop_recording()
        if out_of_memory is not None:
            out_of_memory.add_note(f"rank {self.rank}'s memory snapshot at this error: {path} "
                                   "(open it at https://pytorch.org/memory_viz)")


def profile_window(logging, run_dir: str, rank: int, log=print):
    """The window logging.profile_steps asks for (logging: the config's LoggingConfig)."""
    window = logging.profile_window
    if window is None:
        return NO_WINDOW
    return ProfileWindow(*window, run_dir, rank, logging.profile_stacks, logging.memory_snapshot,
                         log)
