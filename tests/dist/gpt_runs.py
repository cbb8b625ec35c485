"""launch/pretrain_gpt.py as the tests run it: a tiny model, its arguments, its metrics."""
import json
import os
import pathlib
import shutil
import time

# A model small enough that a 10-step run costs ~1 s after start-up.
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_heads=4",
        "model.ffn_hidden_size=256", "model.max_seq_len=32", "data.builtin_vocab_size=1024",
        "train.micro_batch_size=4", "train.global_batch_size=8", "train.warmup_iters=2",
        "train.log_interval=1", "train.eval_interval=0", "logging.sample_prompt=",
        "logging.tensorboard=false"]


def read_metrics(run_dir, split="train"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if r["split"] == split]


def gpt(run_dir, cache_dir, *overrides):
    return ["launch/pretrain_gpt.py", *TINY, f"data.cache_dir={cache_dir}",
            f"logging.run_dir={run_dir}", *overrides]


def copy_tag(run_dir, to_run_dir, tag="global_step5"):
    """A copy of `run_dir`'s checkpoint `tag` as the only one of `to_run_dir` (a run there
    resumes it); -> the copied tag's directory."""
    tag_dir = pathlib.Path(to_run_dir) / "checkpoints" / tag
    shutil.copytree(pathlib.Path(run_dir) / "checkpoints" / tag, tag_dir)
    return tag_dir


def check_ok(results):
    for r in results:
        assert r.returncode == 0, r.output[-4000:]
    return results[0].output


def wait_for_steps(run_dir, proc, rows=3, timeout=180):
    """Until metrics.jsonl has `rows` rows; fails if the process exits or time runs out first."""
    deadline = time.monotonic() + timeout
    metrics = os.path.join(run_dir, "metrics.jsonl")
    while not (os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= rows):
        assert proc.poll() is None and time.monotonic() < deadline, "no training progress"
        time.sleep(0.2)
