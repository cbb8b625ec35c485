"""Checkpoint conversion: time, peak memory and disk of tools/convert_checkpoint.py (--to
universal, safetensors, hf) beside DeepSpeed's own `python -m deepspeed.checkpoint.ds_to_universal`
on the same checkpoint; and what the content digests cost (checkpoint/integrity.py) beside the
save's own time.

    python tools/bench_convert.py [--input RUN/checkpoints/global_stepN] [--rounds 3]
    python tools/bench_convert.py --digests-only

Without --input, a checkpoint is made first: a d=768, 12-layer GPT (~90M parameters) trained for
one step in TP2 on 2 CPU ranks (about a minute). Rounds are interleaved (reference, universal,
safetensors, hf, reference, ...) and medians reported, since these machines are noisy; every
command is a fresh process, start-up included, as a user runs it.

Digests: the save's time and its "durable and digested" part come from the run's own log line
(rank 0's; each rank reads back its share of the files); the resume's check reads every file
once (what all ranks do together, each its share), timed here in one process, with the page
cache warm as right after a save; beside it, the same files through other hashes.
"""
import argparse
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib

from magneto_dist.checkpoint.tags import CheckpointDir, Tag
from magneto_dist.launch_env import ROOT


# ds_to_universal has no peak-memory report of its own: run it under a wrapper that prints one.
REFERENCE = ("import resource, runpy, sys; sys.argv = ['ds_to_universal'] + sys.argv[1:]; "
             "runpy.run_module('deepspeed.checkpoint.ds_to_universal', run_name='__main__'); "
             "print('peak RSS %.0f MiB' % (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss "
             "/ 1024))")
MODEL = ["model.num_layers=12", "model.hidden_size=768", "model.num_heads=12",
         "model.ffn_hidden_size=3072", "model.max_seq_len=64", "train.micro_batch_size=1",
         "train.global_batch_size=2", "train.train_iters=1", "logging.sample_prompt=",
         "logging.tensorboard=false", "parallel.tensor_model_parallel_size=2"]


def make_checkpoint(work: str) -> tuple:
    """-> (the tag directory, the run's save line: "saved checkpoint ... in X s (...)")."""
    run_dir = os.path.join(work, "run")
    cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "2",
           "launch/pretrain_gpt.py", *MODEL, f"logging.run_dir={run_dir}"]
    print("making a checkpoint:", " ".join(cmd[3:]), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    saved = [line for line in proc.stdout.splitlines() if "saved checkpoint" in line]
    return CheckpointDir.of_run(run_dir).at_step(1).path, saved[-1]


def hash_files(paths, make_hash) -> float:
    """Seconds to read and hash every file whole (8 MiB reads); make_hash() -> an object
    with update(bytes) and hexdigest()."""
    start = time.perf_counter()
    buffer = bytearray(8 * 2 ** 20)
    view = memoryview(buffer)
    for path in paths:
        running = make_hash()
        with open(path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(buffer)
                if not n:
                    break
                running.update(view[:n])
        running.hexdigest()
    return time.perf_counter() - start


def zlib_checksum(function):
    """zlib.crc32 / adler32 as a hash object."""
    class Running:
        def __init__(self):
            self.value = function(b"")

        def update(self, data):
            self.value = function(data, self.value)

        def hexdigest(self):
            return f"{self.value:08x}"
    return Running


def measure_digests(tag: str, save_line: str, rounds: int) -> None:
    """The digests' cost on save (the run's log) and on resume (all files once), as ratios of
    the save's time, and other hashes over the same files."""
    import xxhash

    saved = Tag.at(tag)
    paths = [os.path.join(tag, n) for n in sorted(saved.marker()["files"])]
    match = re.search(r" in ([0-9.]+) s \(.*durable and digested in ([0-9.]+) s\)", save_line)
    save, digest = (float(match.group(1)), float(match.group(2))) if match else (None, None)
    verify = []
    for _ in range(rounds):
        start = time.perf_counter()
        assert saved.damage(share=(0, 1)) is None
        verify.append(time.perf_counter() - start)
    verify = statistics.median(verify)
    if save:
        print(f"save (the run's log, rank 0 of 2): {save:.2f} s, of which durable + digests "
              f"{digest:.2f} s = x{digest / (save - digest):.2f} of the save without them")
        print(f"resume check, every file once (1 process): {verify:.2f} s = x{verify / save:.2f} "
              "of the save")
    else:
        print(f"resume check, every file once (1 process): {verify:.2f} s (no save time: "
              "--input was given)")
    for label, make_hash in [("xxh3_64 (chosen)", xxhash.xxh3_64),
                             ("zlib.crc32", zlib_checksum(zlib.crc32)),
                             ("zlib.adler32", zlib_checksum(zlib.adler32)),
                             ("sha256", hashlib.sha256), ("blake2b", hashlib.blake2b)]:
        seconds = statistics.median(hash_files(paths, make_hash) for _ in range(rounds))
        print(f"  read + {label:17s} {seconds:6.2f} s  {disk_mib(tag) / 1024 / seconds:5.2f} GiB/s")


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
    p.add_argument("--digests-only", action="store_true",
                   help="only the content digests' cost, not the conversions")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as work:
        tag, save_line = (args.input, "") if args.input else make_checkpoint(work)
        print(f"checkpoint {tag}: {disk_mib(tag):.0f} MiB on disk")
        measure_digests(tag, save_line, args.rounds)
        if args.digests_only:
            return 0
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
        reference = statistics.median(r[0] for r in results["ds_to_universal (reference)"])
        for name, rows in results.items():
            seconds = statistics.median(r[0] for r in rows)
            print(f"{name:30s} {seconds:6.1f} s  x{seconds / reference:.2f}  peak RSS "
                  f"{max(r[1] for r in rows):6.0f} MiB  output {rows[-1][2]:6.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
