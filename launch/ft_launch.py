"""Fault-tolerant launcher: one command per node, torchrun's flags (see --help).

    python launch/ft_launch.py --nproc-per-node 2 launch/pretrain_gpt.py train.train_iters=400
    python launch/ft_launch.py --nnodes 2:4 --nproc-per-node 8 --rdzv-endpoint HOST:29400 \
        launch/pretrain_gpt.py --config configs/gpt_1.3b.yaml

Restarts the group from the newest complete checkpoint when a rank dies or hangs, continues
with fewer nodes when one is lost, stops cleanly on SIGTERM (exit 75: requeue), and records
every incident in RUN_DIR/restarts.jsonl.
"""
import signal
import sys

from magneto_dist.errors import ExitCode


def _stopped_while_importing(signum, frame):
    """SIGTERM in the seconds the imports take (before the launcher's own handler): no rank has
    started, nothing to save. Exit as any preempted launch does (75, requeue), not 143."""
    print(f"[ft_launch] stopped by {signal.Signals(signum).name} before any rank started: "
          f"nothing to save; exit {int(ExitCode.INTERRUPTED)} (requeue the job)",
          file=sys.stderr, flush=True)
    sys.exit(ExitCode.INTERRUPTED)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stopped_while_importing)
    from magneto_dist.launcher.cli import main

    sys.exit(main())
