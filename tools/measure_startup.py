"""Measured host memory of each rank while it builds its shard of the model (parallelize()),
against the bound shard-only construction promises and the memory planner's figure.

    python tools/measure_startup.py --config configs/gpt_1.3b.yaml --ranks 2 \\
        parallel.tensor_model_parallel_size=2
    python tools/measure_startup.py --config configs/gpt_1.3b.yaml --ranks 2 --full-first \\
        parallel.tensor_model_parallel_size=2

Starts --ranks CPU ranks (torchrun --standalone, gloo); each builds the configured layout's
shard exactly as a training run does (meta-device skeleton, name-keyed init) and reports its
resident-memory growth from just before parallelize() to the high-water mark after it
(/proc/self/status VmRSS and VmHWM). --full-first builds the full fp32 model on every rank
first, as every rank did before shard-only construction, for comparison. Init only: no
optimizer, no step. The bound is 1.25 x the rank's shard + the largest single full parameter.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

GiB = 2 ** 30


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from magneto_dist.config import load_config, validate, with_vocab_size
    from magneto_dist.model import InitWeights, build_model, model_skeleton
    from magneto_dist.parallel.setup import parallelize
    from magneto_dist.parallel.state import init_distributed
    from magneto_dist.training.memory_plan import Layout, MemoryPlanner
    from magneto_dist.training.tasks import GPTTask

    torch.set_num_threads(1)
    cfg = with_vocab_size(load_config(args.config, args.overrides), args.vocab_size)
    dims = validate(cfg, int(os.environ["WORLD_SIZE"]))  # before any process group, as a run
    init_distributed()
    skeleton = model_skeleton(cfg.model)
    weights = InitWeights(skeleton, cfg.model, cfg.train.seed)
    largest = max(p.numel() for p in skeleton.parameters()) * 4
    full_model = sum(p.numel() * 4 for p in skeleton.parameters())  # before TP reshapes it
    task = GPTTask(cfg.model.vocab_size, tensor_parallel=dims.tp > 1)
    before = _status_kib("VmRSS") * 1024
    model = build_model(cfg.model, seed=cfg.train.seed) if args.full_first else skeleton
    par = parallelize(model, cfg, dims, None if args.full_first else weights,
                      pipeline_loss=task.pipeline_loss)
    del model
    peak = _status_kib("VmHWM") * 1024 - before
    shard = sum({p.data_ptr(): p.numel() * p.element_size()
                 for p in par.module.parameters()}.values())
    planned = MemoryPlanner(cfg.model, "fp32", cfg.model.max_seq_len).plan(
        Layout.of(cfg, dims))["startup_peak"]
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, {"rank": dist.get_rank(), "shard": shard, "peak": peak,
                                   "largest_param": largest, "planned": planned,
                                   "full_model": full_model,
                                   "layout": dims.describe()})
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(ranks, f)
    dist.barrier()
    dist.destroy_process_group()


def report(ranks, full_first: bool) -> int:
    r0 = ranks[0]
    print(f"{r0['layout']}, {'full model first (the old path)' if full_first else 'shard-only'}"
          f": full model {r0['full_model'] / GiB:.2f} GiB fp32, largest parameter "
          f"{r0['largest_param'] / GiB:.2f} GiB")
    print(f"{'rank':>4}{'shard GiB':>11}{'peak growth GiB':>17}{'bound GiB':>11}"
          f"{'peak / bound':>14}{'planner GiB':>13}")
    worst = 0.0
    for r in ranks:
        bound = 1.25 * r["shard"] + r["largest_param"]
        worst = max(worst, r["peak"] / bound)
        print(f"{r['rank']:>4}{r['shard'] / GiB:>11.2f}{r['peak'] / GiB:>17.2f}"
              f"{bound / GiB:>11.2f}{r['peak'] / bound:>14.2f}{r['planned'] / GiB:>13.2f}")
    print(f"peak / bound, worst rank: {worst:.2f} ({'within' if worst <= 1 else 'OVER'} the "
          "bound 1.25 x shard + largest full parameter)")
    return 0 if worst <= 1 or full_first else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=50257, help="the tokenizer's (GPT-2's)")
    ap.add_argument("--full-first", action="store_true", help="build the full model first")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ranks.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.ranks}", os.path.abspath(__file__), "--worker",
               "--out", out, "--config", args.config, "--vocab-size", str(args.vocab_size),
               *(["--full-first"] if args.full_first else []), *args.overrides]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        with open(out) as f:
            return report(json.load(f), args.full_first)


if __name__ == "__main__":
    raise SystemExit(main())
