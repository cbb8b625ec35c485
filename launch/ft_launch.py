"""Fault-tolerant launcher: one command per node, torchrun's flags (see --help).

    python launch/ft_launch.py --nproc-per-node 2 launch/pretrain_gpt.py train.train_iters=400
    python launch/ft_launch.py --nnodes 2:4 --nproc-per-node 8 --rdzv-endpoint HOST:29400 \
        --step-timeout auto launch/pretrain_gpt.py --config configs/gpt_1.3b.yaml

Restarts the group from the newest complete checkpoint when a rank dies or hangs, continues
with fewer nodes when one is lost, stops cleanly on SIGTERM (exit 75: requeue), and records
every incident in RUN_DIR/restarts.jsonl.
"""
import sys


from magneto_dist.launcher.cli import main

if __name__ == "__main__":
    sys.exit(main())
