"""Start-up cost: DeepSpeed's CPU shared-memory comm op (a ~30 s JIT build on a fresh machine,
used only by its inference path) is not built when a CPU run forms its process group."""
import os
import subprocess
import sys

SCRIPT = """
import os
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=os.environ["PORT"])
from magneto_dist.parallel.state import init_distributed
init_distributed()
import torch.distributed as dist
print("world", dist.get_world_size())
"""


def test_cpu_process_group_skips_the_shared_memory_op_build(tmp_path):
    from tests.dist.ranks import free_port

    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), PORT=str(free_port()))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world 1" in out.stdout
    assert "shm_comm" not in out.stdout + out.stderr
    assert not (tmp_path / "ext").exists()  # nothing compiled
