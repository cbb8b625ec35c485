"""Sweep norm schemes x depth x width x LR x seeds: verdicts, diagnostics, plots and a report.

    python tools/stability_sweep.py --config configs/stability/depth_lr_cpu.yaml [--jobs N]
        [--out runs/sweeps/NAME] [grid.depths=[6,24] grid.lrs=[1e-3,5e-3] model.hidden_size=128]
    python tools/stability_sweep.py --config ... --dry-run          # cells, memory, GPU-hours
    python tools/stability_sweep.py --config configs/stability/depth_width_cluster.yaml \\
        --cluster slurm --partition P --account A --time 4:00:00 [--nodes-per-cell N] \\
        [--gpus-per-node G] [--slurm key=value ...] [--jobs 64] [--detach]
    python tools/stability_sweep.py --config ... --report-only      # redraw from results.jsonl

Every cell is a real run of launch/pretrain_gpt.py (same model, data, optimizer, precision);
a cell on more than one GPU runs launch/ft_launch.py, one launcher per node. Without --cluster
the cells run in a local pool; with it, each cell is a job (submitit: Slurm, or its local
executor). Rerun the same command at any time: finished cells are not run again, live jobs
are re-attached, cells whose jobs died are resubmitted.
Writes OUT/results.jsonl, OUT/report.md, OUT/*.png, and OUT/cells/ and OUT/logs/ per cell.
"""
import argparse
import os
import signal
import sys
import time

from magneto_dist.errors import ConfigError
from magneto_dist.stability.cluster import ClusterOptions, ClusterRunner, parse_time
from magneto_dist.stability.cost import Assumptions, print_costs
from magneto_dist.stability.grid import load_sweep
from magneto_dist.stability.pool import SweepRunner, default_jobs, gpu_count, with_widths
from magneto_dist.stability.report import write_markdown
from magneto_dist.stability.plots import write_plots
from magneto_dist.stability.sweep import RESULTS, load_results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="overrides: grid.KEY=VALUE, verdict.KEY=VALUE, or any "
                                       "pretrain_gpt.py key SECTION.KEY=VALUE (every cell)")
    p.add_argument("--config", required=True, help="sweep YAML (configs/stability/)")
    p.add_argument("--jobs", type=int, default=None,
                   help="cells at once: local pool (default: one per GPU, else per core: "
                        f"{default_jobs()}); with --cluster, jobs queued or running at once")
    p.add_argument("--out", default=None, help="output directory (default runs/sweeps/NAME)")
    p.add_argument("--report-only", action="store_true", help="redraw from results.jsonl")
    p.add_argument("--retry-crashed", action="store_true", help="run crashed cells again")
    p.add_argument("--dry-run", action="store_true",
                   help="print the cells, their layout, memory per GPU and the GPU-hours")
    c = p.add_argument_group("cluster (each cell a job, through submitit)")
    c.add_argument("--cluster", choices=("slurm", "local"), default=None)
    c.add_argument("--partition", default=None)
    c.add_argument("--account", default=None)
    c.add_argument("--time", default="4:00:00", help="each job's time limit ([D-]H:MM:SS)")
    c.add_argument("--nodes-per-cell", type=int, default=1)
    c.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs of a cell per node (default 1; local: 1 if this machine has "
                        "GPUs, else 0: a CPU process)")
    c.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="an sbatch flag, verbatim (qos=high, constraint=h100, mem=0, "
                        "cpus-per-task=64, exclusive); repeatable")
    c.add_argument("--max-attempts", type=int, default=3,
                   help="submissions of a cell whose jobs end without a result")
    c.add_argument("--detach", action="store_true",
                   help="submit and exit; rerun to collect rows and submit more")
    c.add_argument("--cancel", action="store_true", help="cancel this sweep's live jobs")
    d = p.add_argument_group("cost (--dry-run)")
    d.add_argument("--device-tflops", type=float, default=Assumptions.device_tflops)
    d.add_argument("--mfu", type=float, default=Assumptions.mfu)
    p.add_argument("overrides", nargs="*")
    return p


def cluster_options(args) -> ClusterOptions:
    for name in ("jobs", "nodes_per_cell", "max_attempts"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={value} must be at least 1")
    if args.gpus_per_node is not None and args.gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node={args.gpus_per_node} must be at least 0")
    extra = {}
    for item in args.slurm:
        key, sep, value = item.partition("=")
        if not key:
            raise ConfigError(f"--slurm {item!r}: give KEY=VALUE (or a bare KEY for a flag)")
        extra[key] = value if sep else True
    return ClusterOptions(args.cluster or "local", args.jobs, args.nodes_per_cell,
                          args.gpus_per_node, args.partition, args.account,
                          parse_time(args.time), extra, args.max_attempts, args.detach)


def run(args) -> int:
    opts = cluster_options(args)
    world = opts.nodes_per_cell * max(1, opts.gpus()) if args.cluster else 1
    gpus = opts.gpus() > 0 if args.cluster else gpu_count() > 0
    sweep = load_sweep(args.config, args.overrides, args.out, world_size=world, has_cuda=gpus)
    precision = sweep.cell_config(sweep.cells()[0]).train.precision
    if precision != "fp32" and not gpus and not (args.report_only or args.dry_run):
        print(f"WARNING: the cells train in {precision} without a GPU: {precision} on a CPU is "
              "very slow (use train.precision=fp32 here, or run on GPUs)", file=sys.stderr)
    if args.dry_run:
        print(f"sweep {sweep.name}: {len(sweep.cells())} cells -> {sweep.out_dir}\n")
        print_costs(sweep, opts.nodes_per_cell if args.cluster else 1,
                    opts.gpus() if args.cluster else 0,
                    args.jobs or (None if args.cluster else default_jobs()),
                    Assumptions(args.device_tflops, args.mfu))
        return 0
    start = time.monotonic()
    if args.report_only:  # read only: a sweep may be appending meanwhile
        rows, _ = with_widths(sweep, load_results(os.path.join(sweep.out_dir, RESULTS)))
        by_cell = {r["cell"]: r for r in rows}
        rows = [by_cell[c.name] for c in sweep.cells() if c.name in by_cell]
        if not rows:
            print(f"error: no results in {os.path.join(sweep.out_dir, RESULTS)}; run the sweep "
                  "first", file=sys.stderr)
            return 2
    elif args.cluster:
        runner = ClusterRunner(sweep, opts, args.retry_crashed)
        if args.cancel:
            print(f"sweep: cancelled {runner.cancel()} job(s)")
            return 0
        print(f"sweep: {len(sweep.cells())} cells as {args.cluster} jobs -> {sweep.out_dir}")
        rows = runner.run()
    else:
        runner = SweepRunner(sweep, args.jobs or default_jobs(), args.retry_crashed)
        print(f"sweep: {len(sweep.cells())} cells, {runner.jobs} at once -> {sweep.out_dir}")
        rows = runner.run()
    if not rows:
        return 0  # detached before any cell ended
    plots = write_plots(rows, sweep.out_dir)
    report = write_markdown(rows, sweep.out_dir, os.path.basename(sweep.out_dir), plots)
    wall = time.monotonic() - start
    print(f"sweep: {len(rows)} of {len(sweep.cells())} cells have results "
          f"({sum(r['verdict'] == 'ok' for r in rows)} ok); this run {wall:.0f}s wall, the "
          f"cells' own run time {sum(r['seconds'] for r in rows):.0f}s in all")
    print(f"sweep: report {report}")
    return 0


def main(argv=None) -> int:
    p = parser()
    args = p.parse_intermixed_args(argv)  # overrides and flags in any order
    if args.cancel and not args.cluster:
        p.error("--cancel needs --cluster (the local pool's cells end with the sweep)")
    # SIGTERM unwinds like Ctrl-C: the pool stops its cells; cluster jobs keep running
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    try:
        return run(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return int(err.exit_code)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
