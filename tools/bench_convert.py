"""Checkpoint conversion: time, peak memory and disk of tools/convert_checkpoint.py (--to
universal, safetensors, hf) beside DeepSpeed's own `python -m deepspeed.checkpoint.ds_to_universal`
on the same checkpoint.

    python tools/bench_convert.py [--input RUN/checkpoints/global_stepN] [--rounds 3]

Without --input, a checkpoint is made first: a d=768, 12-layer GPT (~90M parameters) trained for
one step in TP2 on 2 CPU ranks (about a minute). Rounds are interleaved (reference, universal,
safetensors, hf, reference, ...) and medians reported, since these machines are noisy; every
command is a fresh process, start-up included, as a user runs it.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
# ds_to_universal has no peak-memory report of its own: run it under a wrapper that prints one.
REFERENCE = ("import resource, runpy, sys; sys.argv = ['ds_to_universal'] + sys.argv[1:]; "
             "runpy.run_module('deepspeed.checkpoint.ds_to_universal', run_name='__main__'); "
             "print('peak RSS %.0f MiB' % (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss "
             "/ 1024))")
MODEL = ["model.num_layers=12", "model.hidden_size=768", "model.num_heads=12",
         "model.ffn_hidden_size=3072", "model.max_seq_len=64", "train.micro_batch_size=1",
         "train.global_batch_size=2", "train.train_iters=1", "logging.sample_prompt=",
         "logging.tensorboard=false", "parallel.tensor_model_parallel_size=2"]


def make_checkpoint(work: str) -> str:
    run_dir = os.path.join(work, "run")
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2",
           "launch/pretrain_gpt.py", *MODEL, f"logging.run_dir={run_dir}"]
    print("making a checkpoint:", " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    return os.path.join(run_dir, "checkpoints", "global_step1")


def disk_mib(path: str) -> float:
    return sum(os.path.getsize(os.path.join(r, n)) for r, _, names in os.walk(path)
               for n in names if not os.path.islink(os.path.join(r, n))) / 2 ** 20


def run(cmd, out: str) -> tuple:
    """-> (seconds, peak RSS MiB, output MiB)"""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    peak = float(proc.stdout.rsplit("peak RSS ", 1)[1].split()[0])
    return seconds, peak, disk_mib(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", help="checkpoint tag (default: make one)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as work:
        tag = args.input or make_checkpoint(work)
        out = os.path.join(work, "out")
        commands = {
            "ds_to_universal (reference)": [sys.executable, "-c", REFERENCE, "--input_folder", tag,
                                            "--output_folder", out, "--num_extract_workers", "1",
                                            "--num_merge_workers", "1"],
            "convert --to universal": [sys.executable, "tools/convert_checkpoint.py", "--input",
                                       tag, "--to", "universal", "--output", out],
            "convert --to safetensors": [sys.executable, "tools/convert_checkpoint.py", "--input",
                                         tag, "--to", "safetensors", "--output", out],
            "convert --to hf": [sys.executable, "tools/convert_checkpoint.py", "--input", tag,
                                "--to", "hf", "--output", out],
        }
        results = {name: [] for name in commands}
        for _ in range(args.rounds):
            for name, cmd in commands.items():
                results[name].append(run(cmd, out))
        print(f"checkpoint {tag}: {disk_mib(tag):.0f} MiB on disk")
        reference = statistics.median(r[0] for r in results["ds_to_universal (reference)"])
        for name, rows in results.items():
            seconds = statistics.median(r[0] for r in rows)
            print(f"{name:30s} {seconds:6.1f} s  x{seconds / reference:.2f}  peak RSS "
                  f"{max(r[1] for r in rows):6.0f} MiB  output {rows[-1][2]:6.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
