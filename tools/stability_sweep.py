"""Sweep norm schemes x depth x learning rate x seeds; verdicts, diagnostics, plots and a report.

    python tools/stability_sweep.py --config configs/stability/depth_lr_cpu.yaml [--jobs N]
        [--out runs/sweeps/NAME] [grid.depths=[6,24] grid.lrs=[1e-3,5e-3] model.hidden_size=128]
    python tools/stability_sweep.py --config ... --report-only     # redraw from results.jsonl

Every cell is a real run of launch/pretrain_gpt.py (same model, data, optimizer, precision).
An interrupted sweep continues where it stopped: cells in results.jsonl are not run again.
Writes OUT/results.jsonl, OUT/report.md, OUT/*.png, and OUT/cells/ and OUT/logs/ per cell.
"""
import argparse
import os
import signal
import sys
import time


from magneto_dist.config import ConfigError
from magneto_dist.stability.grid import load_sweep
from magneto_dist.stability.report import write_markdown, write_plots
from magneto_dist.stability.pool import SweepRunner, default_jobs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="overrides: grid.KEY=VALUE, verdict.KEY=VALUE, or any "
                                       "pretrain_gpt.py key SECTION.KEY=VALUE (every cell)")
    p.add_argument("--config", required=True, help="sweep YAML (configs/stability/)")
    p.add_argument("--jobs", type=int, default=None,
                   help=f"cells at once (default: one per GPU, else per core: {default_jobs()})")
    p.add_argument("--out", default=None, help="output directory (default runs/sweeps/NAME)")
    p.add_argument("--report-only", action="store_true", help="redraw from results.jsonl")
    p.add_argument("--retry-crashed", action="store_true", help="run crashed cells again")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        p.error(f"--jobs={args.jobs} must be at least 1")
    try:
        sweep = load_sweep(args.config, args.overrides, args.out)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C, so the runner stops its cells before the sweep exits
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    start = time.monotonic()
    try:
        runner = SweepRunner(sweep, args.jobs or default_jobs(), args.retry_crashed)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.report_only:
        rows = runner.results()
        if not rows:
            print(f"error: no results in {runner.results_path}; run the sweep first",
                  file=sys.stderr)
            return 2
    else:
        print(f"sweep: {len(sweep.cells())} cells, {runner.jobs} at once -> {sweep.out_dir}")
        rows = runner.run()
    write_plots(rows, sweep.out_dir)
    report = write_markdown(rows, sweep.out_dir, os.path.basename(sweep.out_dir))
    wall = time.monotonic() - start
    cell_seconds = sum(r["seconds"] for r in rows)
    print(f"sweep: {len(rows)} cells ({sum(r['verdict'] == 'ok' for r in rows)} ok) in "
          f"{wall:.0f}s wall; the cells' own run time {cell_seconds:.0f}s in all, "
          f"{cell_seconds / runner.jobs:.0f}s if packed perfectly on {runner.jobs} slots")
    print(f"sweep: report {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
