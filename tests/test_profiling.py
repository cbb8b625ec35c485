"""Profile windows (training/profiling.py) in one process: nothing is made outside the window,
the trace holds the window's steps under the run's own step numbers, a window the run ends
inside of is still written, and an out-of-memory error names its memory snapshot."""
import json
import os

import pytest
import torch

from magneto_dist.config import load_config
from magneto_dist.training import profiling
from magneto_dist.training.profiling import NO_WINDOW, profile_window, trace_path


def window(tmp_path, steps, **overrides):
    cfg = load_config(None, [f"logging.profile_steps={steps}",
                             *[f"logging.{k}={v}" for k, v in overrides.items()]])
    return profile_window(cfg.logging, str(tmp_path), rank=3, log=lambda *a: None)


def work():
    x = torch.randn(16, 16, requires_grad=True)
    (x @ x).sum().backward()


def step_names(path):
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    return sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")})


def test_no_window_makes_nothing(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a profiler was made outside the window")

    monkeypatch.setattr(torch.profiler, "profile", forbidden)
    cfg = load_config(None, [])
    assert profile_window(cfg.logging, str(tmp_path), 0) is NO_WINDOW
    w = window(tmp_path, "4-5")
    for step in (1, 2, 3, 6, 7):  # outside 4-5: no profiler, no directory
        with w.step(step):
            work()
    w.close()
    assert os.listdir(tmp_path) == []


def test_the_trace_holds_the_window_s_steps_under_their_numbers(tmp_path):
    w = window(tmp_path, "2-3")
    for step in range(1, 6):
        with w.step(step):
            work()
    path = trace_path(str(tmp_path), 3)
    assert os.path.basename(path) == "rank00003.pt.trace.json"
    assert step_names(path) == ["ProfilerStep#2", "ProfilerStep#3"]
    with open(path) as f:
        names = {e.get("name") for e in json.load(f)["traceEvents"]}
    assert "aten::mm" in names  # the operators of those steps
    assert os.listdir(tmp_path / "profile") == ["rank00003.pt.trace.json"]  # no temporary left


def test_a_window_the_run_ends_inside_of_is_written(tmp_path):
    w = window(tmp_path, "2-9")
    for step in (1, 2, 3):
        with w.step(step):
            work()
    w.close()
    assert step_names(trace_path(str(tmp_path), 3)) == ["ProfilerStep#2", "ProfilerStep#3"]


def test_an_out_of_memory_error_in_the_window_names_its_snapshot(tmp_path, monkeypatch):
    """The CUDA allocator's calls are stood in for (no GPU here): the window records from its
    start, and an out-of-memory error dumps the snapshot and names the file in the error."""
    from magneto_dist.compat import cuda_memory

    calls = []
    monkeypatch.setattr(cuda_memory, "start_recording", lambda n: calls.append(("start", n)))
    monkeypatch.setattr(cuda_memory, "stop_recording", lambda: calls.append(("stop",)))
    monkeypatch.setattr(cuda_memory, "dump_snapshot",
                        lambda path: open(path, "wb").write(b"snapshot"))
    w = profiling.ProfileWindow(1, 3, str(tmp_path), 0, stacks=False, memory=True,
                                log=lambda *a: None)
    with w.step(1):
        work()
    with pytest.raises(torch.OutOfMemoryError) as caught:
        with w.step(2):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    oom = profiling.snapshot_path(str(tmp_path), 0, oom=True)
    assert os.path.isfile(oom) and os.path.basename(oom) == "rank00000.oom.memory.pickle"
    assert any(oom in note for note in caught.value.__notes__), caught.value.__notes__
    assert calls == [("start", profiling.MEMORY_HISTORY_ENTRIES), ("stop",)]
    assert step_names(trace_path(str(tmp_path), 0)) == ["ProfilerStep#1", "ProfilerStep#2"]
