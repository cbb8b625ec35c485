"""What every entry point shares: where the checkout is (configs/ and launch/ live there), the
default config of each training script, the rank environment a launcher sets, and the CPU thread
rule. The run, the fault-tolerant launcher, the sweep and the tools all read these from here."""
from __future__ import annotations

import os
import socket
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
# The training scripts and the config each one runs without --config.
SCRIPTS = {"gpt": "launch/pretrain_gpt.py", "bert": "launch/pretrain_bert.py"}
DEFAULT_CONFIGS = {"gpt": "configs/gpt_tiny_cpu.yaml", "bert": "configs/bert_tiny_cpu.yaml"}


def default_config(task: str) -> str:
    """The absolute path of a training script's default config."""
    return os.path.join(ROOT, DEFAULT_CONFIGS[task])


def task_of_script(script: str) -> Optional[str]:
    """"gpt" or "bert" for a training script's path (any directory), else None."""
    name = os.path.basename(script)
    return next((task for task, path in SCRIPTS.items() if os.path.basename(path) == name), None)


class RankInfo:
    """The launcher's environment (deepspeed, torchrun and our supervisor all set these)."""

    def __init__(self):
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE",
                                                   os.environ.get("LOCAL_SIZE", 1)))

    def log(self, *args):
        if self.rank == 0:
            print(*args, flush=True)


def single_process_env() -> None:
    """Plain `python launch/...py` (no launcher): a world of one on a free local port, instead
    of DeepSpeed's fallback to MPI discovery."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def set_cpu_threads(ranks: RankInfo) -> None:
    """Ranks sharing a CPU split its cores; oversubscription made matmuls up to 20x slower."""
    import torch

    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, ranks.local_world_size)))
