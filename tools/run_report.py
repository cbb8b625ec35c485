"""One HTML page of a run, or of several side by side: loss and validation loss, learning rate,
grad norm, tokens/s and MFU against tokens trained, with restarts, loss spikes, stragglers and
skipped steps marked; the events, the layout and the config.

    python tools/run_report.py RUN_DIR [RUN_DIR ...] [--out DIR]

Reads each RUN_DIR's metrics.jsonl, config.yaml and restarts.jsonl (nothing else, so it runs
while the run trains, on any machine that sees the directory); writes DIR/report.html and its
PNG (default: RUN_DIR/report for one run, ./run_report for several).
"""
import argparse
import os
import sys

from magneto_dist.errors import MagnetoError
from magneto_dist.report.page import write_report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's logging.run_dir")
    p.add_argument("--out", default=None, help="where report.html goes")
    args = p.parse_args(argv)
    out = args.out or (os.path.join(args.run_dirs[0], "report") if len(args.run_dirs) == 1
                       else "run_report")
    try:
        path = write_report(args.run_dirs, out)
    except MagnetoError as err:
        print(f"{err.label}: {err}", file=sys.stderr)
        return int(err.exit_code)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
