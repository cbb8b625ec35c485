import os

# One thread per process: several test processes and ranks share the 2 cores (DESIGN.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
