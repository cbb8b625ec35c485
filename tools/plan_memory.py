"""Per-rank memory of a training config on a cluster, before asking for one.

    python tools/plan_memory.py --config configs/gpt_6.7b.yaml --nodes 2 --gpus-per-node 8
    python tools/plan_memory.py --config configs/gpt_1.3b.yaml --nodes 1 --gpus-per-node 8 \\
        --device-memory 80 --vocab-size 50257 train.micro_batch_size=8

Prints the configured layout's bytes per rank (parameters, gradients, optimizer state,
activations with and without recompute, the start-up peak, DeepSpeed's own estimate of the
model states; with checkpoint.async_save, the host memory of its copy of the rank's checkpoint
state) and then the other layouts of the same global batch that fit --device-memory,
least model parallelism first. Figures are for the busiest rank (the pipeline stage with the
most parameters); see magneto_dist/training/memory_plan.py for what is and is not counted.
"""
import argparse

from magneto_dist.config import ConfigError, load_config, validate, with_vocab_size
from magneto_dist.dims import LayoutError, ParallelDims, model_parallel_size, model_parallel_sizes
from magneto_dist.errors import ExitCode
from magneto_dist.training.memory_plan import (GiB, Layout, MemoryPlanner, candidate_layouts,
                                               deepspeed_estimate)


def vocabulary(cfg, override):
    """The vocabulary the run would have: --vocab-size, else the configured tokenizer's, else
    the built-in corpus tokenizer's (the run always takes it from its tokenizer)."""
    if override:
        return override, "--vocab-size"
    if cfg.data.prefixes:
        from magneto_dist.data.tokenizer import TokenizerSpec
        from magneto_dist.data.tokenizer_types import build_tokenizer
        tokenizer = build_tokenizer(TokenizerSpec.from_data_config(cfg.data))
        return tokenizer.vocab_size, tokenizer.setting
    return cfg.data.builtin_vocab_size, "the built-in corpus (pass --vocab-size for your data)"


def print_plan(cfg, planner: MemoryPlanner, layout: Layout) -> None:
    t = cfg.train
    p = planner.plan(layout)
    ds = deepspeed_estimate(p["params_per_rank"], p["largest_param"], layout.dims)
    print(f"{layout.describe()}: {p['params_per_rank'] / 1e6:,.1f}M parameters on the busiest "
          f"rank, {layout.dims.grad_accum} micro-batches of {layout.micro_batch} x "
          f"{cfg.model.max_seq_len} per step, {t.precision}")
    rows = [("parameters", p["parameters"]), ("gradients", p["gradients"]),
            (f"optimizer (ZeRO-{layout.dims.zero_stage})", p["optimizer"]),
            ("activations, no recompute", p["activations_no_recompute"]),
            ("activations, recompute", p["activations_recompute"]),
            *([("  of which ring attention buffers (CP)", p["cp_buffers"])]
              if layout.dims.cp > 1 else []),
            ("total (as configured)", p["total"]),
            ("start-up peak (fp32 shard + 1 param)", p["startup_peak"]),
            ("DeepSpeed estimator, model states", ds)]
    if cfg.checkpoint.async_save:  # host memory, not in the device total
        rows.append(("host copy, checkpoint.async_save", p["host_copy"]))
    for name, value in rows:
        print(f"  {name:<38}{value / GiB:>10.2f} GiB")


def bad_argument(args) -> str:
    """Why the device flags cannot describe a cluster, or "" (--nodes 0 divided by zero, and
    --nodes -1 printed a plan for -8 devices)."""
    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
        if value < 1:
            return f"{flag} {value}: must be at least 1"
    if args.device_memory <= 0:
        return f"--device-memory {args.device_memory:g}: GiB per device, more than 0"
    if args.top < 0:
        return f"--top {args.top}: the number of alternatives listed, 0 or more"
    return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--device-memory", type=float, default=80.0, help="GiB per device")
    ap.add_argument("--vocab-size", type=int, default=None)
    ap.add_argument("--top", type=int, default=10, help="alternatives listed")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    args = ap.parse_args(argv)
    problem = bad_argument(args)
    if problem:
        print(f"error: {problem}")
        return ExitCode.CONFIG
    world = args.nodes * args.gpus_per_node
    try:
        cfg = load_config(args.config, args.overrides)
        vocab, source = vocabulary(cfg, args.vocab_size)
        cfg = with_vocab_size(cfg, vocab)
        # every check a run makes, on the fewest devices the configured TP x PP needs (the
        # devices asked about may not fit it; the alternatives are listed all the same)
        validate(cfg, model_parallel_size(model_parallel_sizes(cfg)))
    except (ConfigError, ValueError) as err:
        print(f"config error: {err}")
        return 2
    t = cfg.train
    print(f"{args.config}: {args.nodes} node(s) x {args.gpus_per_node} devices of "
          f"{args.device_memory:g} GiB; vocabulary {vocab} ({source})\n")
    planner = MemoryPlanner(cfg.model, t.precision, cfg.model.max_seq_len)
    try:
        configured = Layout.of(cfg, ParallelDims.of(cfg, world))
        print_plan(cfg, planner, configured)
    except LayoutError as err:  # the alternatives below may still fit these devices
        print(f"the configured layout cannot run on {world} device(s): {err}")
    budget = args.device_memory * GiB
    fits = []
    for layout in candidate_layouts(cfg.model, world, args.gpus_per_node, t.micro_batch_size,
                                    t.global_batch_size, t.precision):
        total = planner.plan(layout)["total"]
        if total <= budget:
            fits.append((layout.recompute, layout.dims.model_parallel,
                         layout.dims.zero_stage, total, layout))
    print(f"\nlayouts that fit {args.device_memory:g} GiB ({len(fits)}; no recompute, least "
          "model parallelism and lowest ZeRO stage first):")
    for *_, total, layout in sorted(fits, key=lambda f: f[:3])[:args.top]:
        print(f"  {layout.describe():<40}{total / GiB:>8.2f} GiB")
    if not fits:
        print("  none: lower train.micro_batch_size, or use more devices")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
