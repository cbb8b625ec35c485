"""One node's part of resuming a tag in another layout, before any process group forms: its
local rank 0 converts the tag to the universal form, or verifies and reuses it, or waits for
another node's converter; its other local ranks wait for the result (reshard.universal_source).
Several of these at once on one tag directory are several nodes on a shared filesystem.

    python tests/dist/convert_worker.py CKPT_DIR TAG LOCAL_RANK
"""
import sys

from magneto_dist.checkpoint import reshard
from magneto_dist.checkpoint.tags import CheckpointDir
from magneto_dist.resilience.faults import faults_from_env

if __name__ == "__main__":
    ckpt_dir, tag, local_rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
    source = reshard.universal_source(CheckpointDir(ckpt_dir).tag(tag), local_rank,
                                      log=lambda line: print(line, flush=True),
                                      faults=faults_from_env())
    print(f"ready to load {source.label}", flush=True)
