"""Long sequences: tokens/s and the per-rank memory of a training step at a long sequence, one
layout after another in one run, with ratios against one rank.

    python tools/bench_long_context.py [--seq 4096] [--steps 3] [--layouts 1rank,tp2,tp2_sp,cp2]
        [overrides]

Each layout runs the real trainer (tools/bench_train.py's build_trainer: the one
`launch/pretrain_gpt.py` runs) on a small decoder (by default d=512, 8 layers, the built-in
corpus), its ranks started by torch.distributed.run on this machine, for --warmup untimed steps
and then --steps timed ones. Per rank it reports:
- tokens/s: the global batch's tokens over the median step time (every layout trains the same
  global batch, so the figures compare directly; the ranks of a layout share this machine's
  cores, so a multi-rank layout is measured for its memory and its overhead, not its speed-up);
- peak RSS: the rank's resident memory at its highest during the timed steps;
- step peak: that highest point above the resident memory just before the timed steps (Linux's
  peak counter is reset there through /proc/self/clear_refs): what one step allocates and frees,
  mostly activations, which is what sequence and context parallelism divide. The ranks run
  with glibc's mmap threshold fixed at 1 MiB (MALLOC_MMAP_THRESHOLD_): by default it grows
  after the first large free, and a freed activation then stays resident in the heap, so the
  resident set would keep the warm-up's peak and hide the step's.
The last lines give each layout's step peak per rank as a ratio to one rank's, beside the ideal
(1/TP with sequence parallelism, 1/CP with context parallelism; TP alone splits only the
activations inside its GEMMs' regions).
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

LAYOUTS = {  # name: (ranks, overrides)
    "1rank": (1, []),
    "tp2": (2, ["parallel.tensor_model_parallel_size=2"]),
    "tp2_sp": (2, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]),
    "cp2": (2, ["parallel.context_parallel_size=2"]),
}
# The ideal step peak per rank against one rank's: SP and CP divide every activation by the
# degree; TP alone divides only those inside its GEMMs' regions (heads, FFN columns, logits), so
# its share depends on the model and has no single figure.
IDEAL = {"1rank": 1.0, "tp2": None, "tp2_sp": 0.5, "cp2": 0.5}
# 8 layers of d=512: big enough that the layers' activations, not the logits over the 8,192
# tokens of the built-in vocabulary, make most of the step's peak, small enough for a CPU
MODEL = ["model.num_layers=8", "model.hidden_size=512", "model.num_heads=8",
         "model.ffn_hidden_size=2048", "train.micro_batch_size=1", "train.global_batch_size=1"]


def _resident_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def worker(args) -> None:
    """One rank of one layout: time the steps, measure memory, write this rank's figures."""
    import torch

    from bench_model import time_round  # beside this file
    from bench_train import build_trainer

    steps = args.warmup + args.steps
    cfg, dims, task, trainer, data = build_trainer(args.config, args.overrides, steps,
                                                   args.run_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    time_round(lambda: trainer.step(data), args.warmup, device)
    before = _resident_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set, to the current one
    times = [time_round(lambda: trainer.step(data), 1, device) for _ in range(args.steps)]
    peak = _resident_kib("VmHWM")
    trainer.metrics.close()
    rank = int(os.environ["RANK"])
    figures = {"tokens_s": cfg.train.global_batch_size * cfg.model.max_seq_len
               / statistics.median(times), "peak_mib": peak / 1024,
               "step_peak_mib": (peak - before) / 1024, "threads": torch.get_num_threads()}
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(figures, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(name: str, args) -> list:
    """Start the layout's ranks and return each rank's figures."""
    ranks, overrides = LAYOUTS[name]
    with tempfile.TemporaryDirectory(prefix=f"bench_long_context-{name}-") as tmp:
        out = os.path.join(tmp, "figures")
        os.makedirs(out)
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
               f"--master-port={_free_port()}", os.path.abspath(__file__), "--worker",
               f"--out={out}", f"--run-dir={tmp}/run", f"--config={args.config}",
               f"--steps={args.steps}", f"--warmup={args.warmup}",
               *MODEL, f"model.max_seq_len={args.seq}", *overrides, *args.overrides]
        started = time.monotonic()
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
        if done.returncode:
            sys.exit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        print(f"  {name}: {time.monotonic() - started:.0f} s", file=sys.stderr)
        figures = []
        for r in range(ranks):
            with open(os.path.join(out, f"rank{r}.json")) as f:
                figures.append(json.load(f))
        return figures


def report(results: dict, seq: int) -> None:
    print(f"sequence {seq}, global batch 1, one row per layout (the busiest rank's memory)")
    print(f"{'layout':<8}{'ranks':>6}{'threads':>8}{'tokens/s':>10}{'peak RSS MiB':>14}"
          f"{'step peak MiB':>15}{'vs 1rank':>10}{'ideal':>7}")
    reference = max(r["step_peak_mib"] for r in results["1rank"])
    for name, ranks in results.items():
        busiest = max(ranks, key=lambda r: r["step_peak_mib"])
        print(f"{name:<8}{len(ranks):>6}{busiest['threads']:>8}{ranks[0]['tokens_s']:>10,.0f}"
              f"{busiest['peak_mib']:>14,.0f}{busiest['step_peak_mib']:>15,.0f}"
              f"{busiest['step_peak_mib'] / reference:>10.2f}"
              f"{'-' if IDEAL[name] is None else format(IDEAL[name], '.2f'):>7}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/gpt_tiny_cpu.yaml")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--timeout", type=float, default=1800, help="seconds per layout")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    names = args.layouts.split(",")
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown or "1rank" not in names:
        sys.exit(f"--layouts={args.layouts}: choose from {', '.join(LAYOUTS)}, "
                 "1rank included (the reference)")
    report({name: run_layout(name, args) for name in names}, args.seq)


if __name__ == "__main__":
    main()
