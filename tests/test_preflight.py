"""What a run checks before it touches its run directory, and the optimizer's non-finite guard.
All in one process, no process group: each mistake costs seconds and writes nothing."""
import json
import os
import socket
import threading
import time

import pytest
import torch

from magneto_dist.config import TrainConfig, load_config
from magneto_dist.data.corpus import stdlib_sources
from magneto_dist.data.tokenizer_training import train_sentencepiece
from magneto_dist.training.engine import build_optimizer
from magneto_dist.checkpoint.resume import finished_message
from magneto_dist.training.preflight import PreflightError, RunLock
from magneto_dist.training.run import main


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "text.txt").write_text("\n".join(text for _, text in list(stdlib_sources())[:40]))
    return train_sentencepiece(str(d / "text.txt"), str(d / "spm"), vocab_size=400)


def test_unwritable_run_dir_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main("gpt", [f"logging.run_dir={blocker}/run"]) == 2
    assert (f"config error: logging.run_dir={blocker}/run cannot be written (Not a directory); "
            "choose a writable directory") in capsys.readouterr().err


def test_missing_data_prefix_is_one_line_exit_2(tmp_path, capsys, tokenizer_model):
    args = [f"data.prefixes=[{tmp_path}/none_text_document]",
            f"data.tokenizer_model={tokenizer_model}", f"logging.run_dir={tmp_path}/run"]
    assert main("gpt", args) == 2
    err = capsys.readouterr().err
    assert (f"data error: data prefix {tmp_path}/none_text_document: {tmp_path}/none_text_"
            "document.bin/.idx not found; create them with `python tools/preprocess_data.py") in err
    assert os.listdir(tmp_path / "run") == []  # nothing written


def test_tokenizer_that_is_not_sentencepiece_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "spm.model").write_text("garbage")
    args = [f"data.prefixes=[{tmp_path}/x_text_document]", f"data.tokenizer_model={tmp_path}/"
            "spm.model", f"logging.run_dir={tmp_path}/run"]
    assert main("gpt", args) == 2
    assert (f"data error: tokenizer model {tmp_path}/spm.model is not a sentencepiece model"
            in capsys.readouterr().err)


def test_an_unexpected_error_keeps_its_traceback_instead_of_becoming_a_data_error(
        tmp_path, monkeypatch, tokenizer_model):
    """Only the project's own errors become one line and exit 2/3 (never retried by the
    launcher); a bug (here a KeyError while preparing data) propagates with its traceback, and
    traceback and the script exits 1, which the launcher retries. It was printed as "data error"."""
    from magneto_dist.training import run as run_module

    def broken(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(run_module, "prepare_data", broken)
    args = [f"data.prefixes=[{tmp_path}/none_text_document]",
            f"data.tokenizer_model={tokenizer_model}", f"logging.run_dir={tmp_path}/run"]
    with pytest.raises(ValueError, match="a bug"):
        main("gpt", args)


def write_lock(run_dir, pid, host=None, age=0.0):
    path = run_dir / "run.lock"
    path.write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid,
                                "since": "then"}))
    if age:
        os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_run_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path):
    lock = RunLock(str(tmp_path))
    write_lock(tmp_path, os.getppid())  # a live process on this host
    with pytest.raises(PreflightError, match=rf"{tmp_path} is in use by pid {os.getppid()} on "
                       rf"{socket.gethostname()} \(since then; its lock was touched 0 s ago\); "
                       rf"stop that run or use another logging.run_dir. If no such run is "
                       rf"alive, delete {tmp_path}/run.lock \(a lock not touched for 30 s is "
                       rf"taken over\)"):
        lock.acquire()
    # a holder killed with -9 leaves its lock behind: a dead pid on this host is stale, and so
    # is this very process's pid (reused after the kill)
    for stale_pid in (2**22 + 7, os.getpid()):
        write_lock(tmp_path, stale_pid)
        warnings = []
        lock.acquire(log=warnings.append)
        assert "removing stale lock" in warnings[0] and "no such process" in warnings[0]
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
        lock.release()
        assert not (tmp_path / "run.lock").exists()


def test_a_lock_of_another_host_is_stale_once_its_heartbeat_stops(tmp_path):
    """Node loss across hosts: rank 0's node died, and the new rank 0 runs on another host,
    where the dead holder's pid cannot be checked. Such a lock was refused for ever (exit 2,
    never retried); now it is stale once it has not been touched for stale_after_s."""
    write_lock(tmp_path, 1, host="lost-node", age=31)  # the default limit: 30 s
    warnings = []
    lock = RunLock(str(tmp_path))
    lock.acquire(log=warnings.append)  # at once: older than the limit
    assert "removing stale lock" in warnings[-1] and "lost-node" in warnings[-1], warnings
    lock.release()
    # touched 1 s ago and never again: watched until it is stale_after_s old
    write_lock(tmp_path, 1, host="lost-node", age=1)
    quick = RunLock(str(tmp_path), heartbeat_s=0.5, stale_after_s=3)
    start = time.monotonic()
    quick.acquire(log=warnings.append)
    assert 1.5 < time.monotonic() - start < 6
    assert "watching it for up to 2 s" in warnings[-2] and "not touched for" in warnings[-1]
    quick.release()


def test_a_live_holder_on_another_host_is_refused_naming_it(tmp_path):
    path = write_lock(tmp_path, 4242, host="node-a")
    stop = threading.Event()

    def heartbeat():  # what node-a's rank 0 does
        while not stop.wait(0.3):
            os.utime(path)

    beater = threading.Thread(target=heartbeat)
    beater.start()
    try:
        with pytest.raises(PreflightError, match=r"in use by pid 4242 on node-a \(since then; "
                                                 r"its lock was touched 0 s ago\)"):
            RunLock(str(tmp_path), heartbeat_s=0.5, stale_after_s=3).acquire(log=lambda _: None)
    finally:
        stop.set()
        beater.join()


def test_the_holder_keeps_its_lock_fresh_and_leaves_a_taken_over_lock_alone(tmp_path):
    lock = RunLock(str(tmp_path), heartbeat_s=0.2, stale_after_s=1)
    lock.acquire()
    path = tmp_path / "run.lock"
    os.utime(path, (time.time() - 60, time.time() - 60))
    time.sleep(0.6)
    assert time.time() - path.stat().st_mtime < 0.5  # the heartbeat touched it
    # another run took the directory over (this one was frozen): its lock is not removed
    warnings = []
    lock.release()
    lock.acquire(log=warnings.append)
    write_lock(tmp_path, 99, host="other")
    time.sleep(0.5)
    assert any("now names" in w and "other" in w for w in warnings), warnings
    lock.release()
    assert json.loads(path.read_text())["host"] == "other"


def test_finished_message():
    ten = TrainConfig(train_iters=10)
    assert finished_message("r", "global_step8", 8, ten) is None
    assert finished_message("r", "global_step10", 10, ten) == (
        "run r is finished: global_step10 is at step 10, train.train_iters=10; nothing to do. "
        "Raise train.train_iters to train further, or use a new logging.run_dir")
    five = TrainConfig(train_iters=10, exit_at_step=5)
    assert "train.exit_at_step=5" in finished_message("r", "global_step5", 5, five)


def test_optimizer_skips_a_step_with_non_finite_gradients():
    """DeepSpeed without ZeRO applies a NaN gradient; the optimizer it is given then does not.
    Under ZeRO DeepSpeed's own optimizer skips such steps (tests/dist/test_guards.py), so the
    guard is not repeated there."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    assert not hasattr(build_optimizer(model, load_config(None, ["train.zero_stage=1"])),
                       "overflow")
    opt = build_optimizer(model, load_config(None, ["train.zero_stage=0"]))
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(2, 4)).sum().backward()
    model.weight.grad[0, 0] = float("nan")
    opt.step()
    assert opt.overflow  # what DeepSpeed's engine reads to hold the LR schedule
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not opt.state  # Adam's moments and step count untouched
    opt.zero_grad()
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert not opt.overflow
    assert not torch.equal(before[0], model.weight)


def _hold_lock(path, log, seconds):
    from magneto_dist.files import build_lock
    import time
    with build_lock(path):
        with open(log, "a") as f:
            f.write(f"in {time.monotonic()}\n")
        time.sleep(seconds)
        with open(log, "a") as f:
            f.write(f"out {time.monotonic()}\n")


def test_build_lock_lets_one_builder_in_at_a_time(tmp_path):
    """Two nodes' local rank 0 built the built-in corpus into the same files at once on a
    shared filesystem (two launchers on one machine hung); build_lock serializes them."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    log = tmp_path / "log"
    procs = [ctx.Process(target=_hold_lock, args=(str(tmp_path / "x.lock"), str(log), 0.5))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    events = [line.split()[0] for line in log.read_text().splitlines()]
    assert events == ["in", "out", "in", "out"]  # never both inside
