import os
import sys

# One thread per process: several test processes and ranks share the machine's cores, and
# oversubscribed threads made small matmuls up to 20x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# DeepSpeed's CPU Adam (ZeRO-Offload cases) is a JIT-built extension. torch keeps one build per
# name in ~/.cache/torch_extensions, and every environment's build file names its own
# deepspeed sources, so two environments on one machine (worktrees, CI beside a checkout)
# rebuilt it in turn for each other (100-225 s a build here): one build per environment.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_launch_env(monkeypatch):
    """Each test starts without the world-of-one variables an earlier in-process run left in
    this process (launch_env.single_process_env sets RANK and a MASTER_PORT free at the time and
    keeps them while RANK is set): a later process group here listened on that stale port, which
    by then another xdist worker's rank held (EADDRINUSE in the Trainer test)."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def accelerate_process_group():
    """For a test that runs transformers' Trainer or lm-eval's hf model in this process: their
    accelerate state starts a default process group here (harmless in the user's own process),
    which would make every later test's own init_process_group fail; it is ended afterwards."""
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
