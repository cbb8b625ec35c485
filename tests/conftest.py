import os

# One thread per process: several test processes and ranks share the machine's cores, and
# oversubscribed threads made small matmuls up to 20x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
