"""torch 2.13's table of live process groups, which a process that builds layout after layout
empties between them (parallel/state.py destroy_subgroups).

torch.distributed keeps no public list of the groups it created; `distributed_c10d._world.pg_map`
(group -> backend and store) is the table destroy_process_group itself looks a group up in and
deletes it from. If a torch upgrade moves it, the check below fails at import, naming the
versions, instead of the groups silently staying alive (each gloo group keeps three threads).
"""
from __future__ import annotations

from typing import List

import torch.distributed as dist
from torch.distributed import distributed_c10d

from . import require_attribute, require_source

LIBRARY = "torch"


def live_process_groups() -> List[dist.ProcessGroup]:
    """Every process group of this process that has not been destroyed, the world's included."""
    return list(distributed_c10d._world.pg_map)


def check() -> None:
    """What this module relies on is still there (run at import)."""
    require_attribute(LIBRARY, distributed_c10d._world, "pg_map",
                      "torch.distributed's table of live groups (distributed_c10d._world.pg_map)")
    require_source(LIBRARY, dist.destroy_process_group, "del _world.pg_map[pg]",
                   "destroy_process_group's table of live groups (_world.pg_map)")


check()
